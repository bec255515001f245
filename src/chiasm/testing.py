"""Tiny from-scratch parts (tokenizer + causal LM) for tests and quick runs.

They exercise the same loading code as real checkpoints (a transformers folder with
config.json, safetensors, generation_config.json and a tokenizer with a chat template) in
well under a second. Besides the default Llama + ChatML pair, the LM can be of any family in
``LM_FAMILIES`` (Qwen2/3, Mistral, Phi-3's fused ``qkv_proj``, Gemma 2/3 with their scaled
embeddings and soft-capped logits, OLMo/OLMo2, GPT-NeoX), the tokenizer can follow the chat
conventions of others (Gemma's turns without a system role, Qwen3's think blocks,
Llama-3's ``<|eot_id|>``, Mistral's ``[INST]``, Phi-3's ``<|end|>``, OLMo 2's Tulu turns),
and the vision tower can be of any family in ``TOWER_FAMILIES``, so that family-specific
behaviour is tested without any download.

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
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Siglip2ImageProcessorPil,
    SiglipImageProcessorPil,
    ViTImageProcessorPil,
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

# Mistral's conventions: user turns in [INST] ... [/INST], the answer closed by the EOS, no
# system role and no generation prompt (the answer follows [/INST] directly).
MISTRAL_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Phi-3's conventions: <|user|> / <|assistant|> headers and <|end|> closing each turn, while the
# tokenizer's EOS is <|endoftext|>.
PHI3_LIKE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# OLMo 2's (Tulu) conventions: <|user|> / <|assistant|> headers, the answer closed by the EOS.
TULU_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
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
    "mistral": ChatStyle(MISTRAL_LIKE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", pad="<unk>",
                         bos="<s>"),
    "phi3": ChatStyle(PHI3_LIKE, ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
                      eos="<|endoftext|>", pad="<|endoftext|>", bos="<|endoftext|>",
                      generation_eos=("<|end|>", "<|endoftext|>")),
    "tulu": ChatStyle(TULU_LIKE, ("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"),
                      eos="<|endoftext|>", pad="<|pad|>", bos="<|endoftext|>"),
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


# transformers model_type -> what a tiny config of that family needs beyond the shared sizes.
# Gemma's real head_dim (256) and sliding windows (4096) are scaled down so the tiny model
# still exercises them; the Gemma 3 text model mixes sliding and full attention layers.
LM_FAMILIES: dict[str, dict[str, object]] = {
    "llama": {"tie_word_embeddings": True},
    "gpt_neox": {},
    "phi3": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 64},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo": {},
    "olmo2": {},
}
_NO_KV_HEADS = {"gpt_neox"}  # families with one key/value head per query head only


def make_tiny_lm(folder: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, seed: int = 0, family: str = "llama", chat: str = "chatml") -> Path:
    """Write a tiny causal LM of ``family`` (a key of ``LM_FAMILIES``) + a tokenizer in ``chat`` style."""
    if family not in LM_FAMILIES:
        raise ValueError(f"unknown tiny LM family {family!r}; known: {', '.join(LM_FAMILIES)}")
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fast = make_tiny_tokenizer(chat)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    ids = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    extra = dict(LM_FAMILIES[family])
    if family not in _NO_KV_HEADS:
        extra["num_key_value_heads"] = kv_heads
    if "layer_types" in extra:
        extra["layer_types"] = [extra["layer_types"][i % 2] for i in range(layers)]
    config = AutoConfig.for_model(family, vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                                  **ids, **extra)
    lm = AutoModelForCausalLM.from_config(config)
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


_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "patch_size": 8}
# family -> (model_type, config sizes beyond _TOWER, the image processor saved beside it). Each
# keeps its family's quirks: DINOv2's config image_size (here 64) is not the processor's crop
# (32, as 518 vs 224 in the real checkpoints), and SigLIP2 (NaFlex) has no image_size at all.
_SQUARE = {"size": {"height": 32, "width": 32}}
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_BIT = (BitImageProcessorPil, {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, **_IMAGENET})
TOWER_FAMILIES: dict[str, tuple[str, dict[str, object], tuple[type, dict[str, object]]]] = {
    "clip": ("clip_vision_model", {"image_size": 32},
             (CLIPImageProcessorPil, {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})),
    "siglip": ("siglip_vision_model", {"image_size": 32}, (SiglipImageProcessorPil, _SQUARE)),
    "siglip2": ("siglip2_vision_model", {"num_patches": 16},
                (Siglip2ImageProcessorPil, {"patch_size": 8, "max_num_patches": 16})),
    "dinov2": ("dinov2", {"image_size": 64}, _BIT),
    "dinov2_with_registers": ("dinov2_with_registers", {"image_size": 64, "num_register_tokens": 2}, _BIT),
    "vit": ("vit", {"image_size": 32}, (ViTImageProcessorPil, _SQUARE)),
}


def make_tiny_vision_tower(folder: str | Path, *, seed: int = 0, family: str = "clip", full: bool = False) -> Path:
    """Write a randomly initialised 2-layer vision tower of ``family`` (8 px patches) and its image processor.

    It loads through the ``hf-vision`` encoder like a hub checkpoint, for tests of a trainable
    transformers tower (e.g. read at ``feature_layer = -2``). ``full`` (CLIP only) writes a whole
    ``CLIPModel`` (text and image towers), as the hub's CLIP checkpoints are.
    """
    if family not in TOWER_FAMILIES:
        raise ValueError(f"unknown tiny tower family {family!r}; known: {', '.join(TOWER_FAMILIES)}")
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    model_type, sizes, (processor, processor_args) = TOWER_FAMILIES[family]
    torch.manual_seed(seed)
    vision = AutoConfig.for_model(model_type, **_TOWER, **sizes)
    if full:
        if family != "clip":
            raise ValueError("full = True writes a whole CLIPModel; it needs family 'clip'")
        text = {k: v for k, v in _TOWER.items() if k != "patch_size"}
        text.update(vocab_size=99, bos_token_id=0, eos_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = AutoModel.from_config(vision)
    model.save_pretrained(folder, safe_serialization=True)
    processor(**processor_args).save_pretrained(folder)
    return folder


# LLaVA-1.5's conversation format ("USER: <image>\nquestion ASSISTANT: answer</s>") as a template over
# content parts, the way transformers' multimodal processors take them: images first, then the text.
LLAVA_LIKE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ part['text'] }}{% endif %}{{ ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_tiny_llava(folder: str | Path, *, tower: str = "clip", bos: bool = False, seed: int = 0,
                    **config: object) -> Path:
    """Write a randomly initialised ``LlavaForConditionalGeneration`` folder with its processor.

    A 2-layer ``tower`` ("clip": class token, read with strategy "default"; "siglip": none, "full")
    of ``TOWER_FAMILIES``, LLaVA-1.5's projector, a 2-layer Llama whose vocabulary holds
    ``<image>``, and :data:`LLAVA_LIKE` as the chat template. ``bos``: the tokenizer puts its BOS
    before every text, as Llama's does (the template writes none). ``config`` overrides
    ``LlavaConfig`` fields (e.g. ``vision_feature_layer``), to write settings that are refused.
    """
    from chiasm.interop.towers import LEADING_TOKENS, strategy_for
    from chiasm.tokens import add_image_token

    if tower not in ("clip", "siglip"):
        raise ValueError(f"a tiny LLaVA has a 'clip' or 'siglip' tower, not {tower!r}")
    folder = Path(folder)
    tok = make_tiny_tokenizer("chatml")
    tok.chat_template = None  # the processor carries the multimodal template
    tok.add_bos_token = bos
    image_id = add_image_token(tok)
    model_type, sizes, (processor, processor_args) = TOWER_FAMILIES[tower]
    vision = AutoConfig.for_model(model_type, **_TOWER, **sizes)
    text = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    settings = {"image_token_index": image_id, "image_seq_length": 16, "vision_feature_layer": -2,
                "vision_feature_select_strategy": strategy_for(model_type), **config}
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, **settings)).save_pretrained(
        folder, safe_serialization=True)
    LlavaProcessor(image_processor=processor(**processor_args), tokenizer=tok, patch_size=_TOWER["patch_size"],
                   chat_template=LLAVA_LIKE, vision_feature_select_strategy=settings["vision_feature_select_strategy"],
                   num_additional_image_tokens=LEADING_TOKENS[model_type]).save_pretrained(folder)
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


def randomise_lora(module: torch.nn.Module, *, std: float) -> None:
    """Draw every LoRA ``B`` matrix of ``module`` from N(0, std) (the global RNG).

    LoRA's B starts at zero, so a fresh adapter leaves the model's outputs unchanged, and a
    test of what adapters do (caching, dropout, merging) would see nothing to compare.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
