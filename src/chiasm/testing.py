"""Tiny from-scratch parts (tokenizer + causal LM) for tests and quick runs.

They exercise the same loading code as real checkpoints (a transformers folder with
config.json, safetensors, generation_config.json and a tokenizer with a chat template) in
well under a second. Besides the default Llama + ChatML pair, the LM can take the layout of
other families (GPT-NeoX's fused ``query_key_value``, Phi-3's fused ``qkv_proj``) and the
tokenizer the chat conventions of others (Gemma's turns without a system role, Qwen3's
think blocks, Llama-3's ``<|eot_id|>``), so that family-specific behaviour is tested
without any download.

``per_token_cross_attention`` is the plain form of gated cross-attention that the real
block is checked (and measured) against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's conventions: no system role (an error, as in Gemma 1/2), strictly alternating turns,
# the assistant called "model", trimmed contents and <end_of_turn> closing every turn.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Qwen3's conventions: ChatML, but an assistant turn after the last user message is rendered
# with a (possibly empty) think block, earlier ones without: rendering is not incremental.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama-3's conventions: header tokens around the role, <|eot_id|> closing a turn while the
# tokenizer's EOS is <|end_of_text|> (as in the base checkpoints' tokenizer).
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatStyle:
    """A chat template with the special tokens it needs and the ids ``generate`` stops on."""

    template: str
    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str
    generation_eos: tuple[str, ...] = ()  # generation_config.eos_token_id; () leaves it to the LM config
    plain_tokens: tuple[str, ...] = field(default=())  # added as ordinary (non-special) tokens


CHAT_STYLES: dict[str, ChatStyle] = {
    "chatml": ChatStyle(CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                        pad="<|endoftext|>", bos="<|endoftext|>"),
    "gemma": ChatStyle(GEMMA_LIKE, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), eos="<eos>",
                       pad="<pad>", bos="<bos>", generation_eos=("<eos>", "<end_of_turn>")),
    "qwen3": ChatStyle(QWEN3_LIKE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                       pad="<|endoftext|>", bos="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
                       plain_tokens=("<think>", "</think>")),
    "llama3": ChatStyle(LLAMA3_LIKE, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"), eos="<|end_of_text|>",
                        pad="<|end_of_text|>", bos="<|begin_of_text|>"),
}

_CORPUS = [
    "what colour is the circle square triangle object shape where is the red green blue yellow purple orange",
    "how many objects are there is there a yes no top left right bottom small large describe the image",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( )",
    "you are a helpful assistant answer briefly python language text model picture",
]


def make_tiny_tokenizer(chat: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (400 words) with the special tokens and template of ``chat``."""
    style = CHAT_STYLES[chat]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(style.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=style.eos, pad_token=style.pad,
                                   bos_token=style.bos)
    if style.plain_tokens:
        fast.add_tokens(list(style.plain_tokens))
    fast.chat_template = style.template
    return fast


def make_tiny_lm(folder: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, seed: int = 0, family: str = "llama", chat: str = "chatml") -> Path:
    """Write a tiny causal LM of ``family`` (llama, gpt_neox, phi3) + a tokenizer in ``chat`` style."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fast = make_tiny_tokenizer(chat)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    ids = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    if family == "llama":
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
            tie_word_embeddings=True, **ids))
    elif family == "gpt_neox":
        lm = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=512, **ids))
    elif family == "phi3":
        lm = Phi3ForCausalLM(Phi3Config(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, **ids))
    else:
        raise ValueError(f"unknown tiny LM family {family!r}; known: llama, gpt_neox, phi3")
    style = CHAT_STYLES[chat]
    if style.generation_eos:
        lm.generation_config = GenerationConfig(
            bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id,
            eos_token_id=[fast.convert_tokens_to_ids(t) for t in style.generation_eos])
    lm.save_pretrained(folder, safe_serialization=True)
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


def make_tiny_vision_tower(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer CLIP vision tower (32 px, 8 px patches) and its image processor.

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
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def run_ranks(args: list[str], *, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone`` with ``args`` on ``nproc`` CPU ranks and check that it succeeded.

    Each rank runs one thread (several ranks share this machine's cores) and finds this
    checkout's sources first, so the multi-process tests exercise the code under test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def spread_weights(model: torch.nn.Module, *, seed: int = 1, std: float = 0.5) -> torch.nn.Module:
    """Redraw every matrix of ``model`` with a wide spread and open every zero-initialised gate.

    A freshly built tiny model greedily repeats one token whatever it is shown, which would
    let a generation test pass with rows mixed up or images ignored. Wide random weights
    make every answer depend on its prompt and images token by token.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.rsplit(".", 1)[-1].startswith("gate_"):
                p.fill_(1.0)
    return model
