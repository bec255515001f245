"""Tiny from-scratch parts (tokenizer + Llama LM) for tests and quick runs.

They exercise the same loading code as real checkpoints (a transformers folder with
config.json, safetensors and a tokenizer with a chat template) in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def make_tiny_vision_tower(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer CLIP vision tower (32 px, 8 px patches) to ``folder``.

    It loads through the ``hf-vision`` encoder like a hub checkpoint, for tests of a trainable
    transformers tower (e.g. read at ``feature_layer = -2``).
    """
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
