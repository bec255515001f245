"""Tiny from-scratch parts (tokenizer + Llama LM) for tests and quick runs, and references.

They exercise the same loading code as real checkpoints (a transformers folder with
config.json, safetensors and a tokenizer with a chat template) in well under a second.
``per_token_cross_attention`` is the plain form of gated cross-attention that the real
block is checked (and measured) against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "what colour is the circle square triangle object shape where is the red green blue yellow purple orange",
    "how many objects are there is there a yes no top left right bottom small large describe the image",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( )",
    "you are a helpful assistant answer briefly python language text model picture",
]


def make_tiny_lm(folder: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, seed: int = 0) -> Path:
    """Write a tiny Llama-family causal LM + BPE tokenizer with a ChatML template to ``folder``."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def per_token_cross_attention(block: torch.nn.Module, h: torch.Tensor, memory: torch.Tensor,
                              image_of_token: torch.Tensor) -> torch.Tensor:
    """Gated cross-attention's attention term written the plain way: each token gets its own copy.

    ``memory`` is ``(n_images, M, D)`` for the whole batch and ``image_of_token`` ``(B, L)``
    a global image index (-1: no image yet). Every token gathers its image's memory into a
    ``(B, L, M, D)`` tensor and projects it, so keys and values are computed once per token.
    """
    b, n, d = h.shape
    hd = d // block.heads
    mem = memory[image_of_token.clamp(min=0)]  # (B, L, M, D)
    k, v = block.kv(mem.to(h.dtype)).chunk(2, dim=-1)
    q = block.q(block.ln_attn(h)).view(b, n, block.heads, hd)
    k = k.view(b, n, -1, block.heads, hd)
    v = v.view(b, n, -1, block.heads, hd)
    weights = torch.einsum("blhd,blmhd->blhm", q, k).mul(hd**-0.5).softmax(-1)
    attn = torch.einsum("blhm,blmhd->blhd", weights, v).reshape(b, n, d)
    return block.out(attn) * (image_of_token >= 0)[..., None].to(h.dtype)
