"""What the benchmarks share: model shapes, random-weight parts, synthetic batches, timing.

The benchmarks measure speed, not quality, so every part is built from a config with random
weights (no download) in the shape of a real checkpoint, and batches are token ids made up
directly: the same tensors reach every model that is compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from chiasm.bridges.base import build_bridge
from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig
from chiasm.encoders.base import build_encoder
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_tokenizer

ATTENTION = "sdpa"


@dataclass(frozen=True)
class TowerShape:
    """A ViT-style vision tower: ``family`` is "clip" (class token) or "siglip" (none)."""

    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int = 224
    patch: int = 16

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def normalize(self) -> str:
        """The normalisation the family's checkpoints were trained with (chiasm's encoder option)."""
        return {"clip": "clip", "siglip": "half"}[self.family]

    def config(self) -> PretrainedConfig:
        kinds = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
        if self.family not in kinds:
            raise ValueError(f"unknown tower family {self.family!r}; known: {sorted(kinds)}")
        return kinds[self.family](hidden_size=self.hidden, num_hidden_layers=self.layers,
                                  num_attention_heads=self.heads, intermediate_size=self.intermediate,
                                  image_size=self.image_size, patch_size=self.patch,
                                  attn_implementation=ATTENTION)


@dataclass(frozen=True)
class LMShape:
    """A decoder-only LM: ``family`` is "llama" (SmolLM2) or "qwen2"."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 100_000.0
    tie_embeddings: bool = True

    def config(self) -> PretrainedConfig:
        kinds = {"llama": LlamaConfig, "qwen2": Qwen2Config}
        if self.family not in kinds:
            raise ValueError(f"unknown LM family {self.family!r}; known: {sorted(kinds)}")
        return kinds[self.family](vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                                  num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                                  intermediate_size=self.intermediate, max_position_embeddings=8192,
                                  rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                                  tie_word_embeddings=self.tie_embeddings, attn_implementation=ATTENTION)


def build_vlm(tower: TowerShape, lm: LMShape, workdir: Path, *, seed: int = 0,
              feature_layer: int = -2) -> VisionLanguageModel:
    """chiasm's model from random weights: an ``hf-vision`` tower, the MLP bridge and the LM.

    The tower goes through chiasm's own encoder class (read from a folder holding only its
    config, ``pretrained = False``) so the benchmark times the code a real run uses.
    """
    torch.manual_seed(seed)
    tower_dir = workdir / f"tower-{tower.family}"
    tower.config().save_pretrained(tower_dir)
    enc_cfg = EncoderConfig(name="hf-vision", source=str(tower_dir), feature_layer=feature_layer,
                            image_size=tower.image_size, options={"pretrained": False, "normalize": tower.normalize})
    encoder = build_encoder(enc_cfg)
    language_model = AutoModelForCausalLM.from_config(lm.config(), dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()  # ids are made up directly: any tokenizer that knows <image> will do
    bridge_cfg = BridgeConfig(name="mlp")
    bridge = build_bridge(bridge_cfg, encoder.dim, lm.hidden)
    config = ModelConfig(encoder=enc_cfg, bridge=bridge_cfg, lm=LMConfig(source=f"random:{lm.family}"))
    model = VisionLanguageModel(config, encoder, bridge, language_model, tokenizer)
    if model.image_token_id >= lm.vocab:
        raise ValueError(f"image token id {model.image_token_id} lies outside the LM vocabulary ({lm.vocab})")
    return model


@dataclass
class SyntheticBatch:
    """Right-padded rows: a few text tokens, one image's placeholders, a question, an answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor

    def to(self, device: torch.device) -> SyntheticBatch:
        return SyntheticBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                        self.pixels)))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_supervised(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def synthetic_batch(rows: int, *, image_tokens: int, text_tokens: int, vocab: int, image_id: int,
                    image_size: int, pad_id: int = 0, seed: int = 0, vary: bool = True) -> SyntheticBatch:
    """Rows of varied text length (half to all of ``text_tokens``), the last third supervised.

    Ids are drawn from the whole vocabulary except the image placeholder; lengths vary so that
    padding and the attention mask take part as they do in real batches. ``vary=False`` gives
    every row ``text_tokens`` (prompts for generation, which need no padding).
    """
    if text_tokens < 6:
        raise ValueError(f"text_tokens must be at least 6 (prefix, question, answer), got {text_tokens}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(text_tokens // 2, text_tokens + 1, (rows,), generator=g).clamp(min=6).tolist()
    if not vary:
        lengths = [text_tokens] * rows
    width = image_tokens + max(lengths)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, n_text in enumerate(lengths):
        text = torch.randint(0, vocab, (n_text,), generator=g)
        text[text == image_id] = (image_id + 1) % vocab
        prefix, answer = 3, max(1, n_text // 3)
        row = torch.cat([text[:prefix], torch.full((image_tokens,), image_id), text[prefix:]])
        n = row.numel()
        ids[r, :n] = row
        mask[r, :n] = 1
        labels[r, n - answer : n] = row[n - answer :]
    pixels = torch.randn(rows, 3, image_size, image_size, generator=g)
    return SyntheticBatch(ids, mask, labels, pixels)


def resolve_device(name: str, *, cuda_available: bool | None = None) -> torch.device:
    """The asked device, or an error: a benchmark that silently ran elsewhere would mislead."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    device = torch.device(name)
    if device.type == "cuda" and not cuda_available:
        raise SystemExit(f"--device {name} was asked but CUDA is not available "
                         f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One optimizer step as chiasm's trainer takes it: autocast forward, backward, clip, AdamW."""

    def __init__(self, params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], *,
                 device: torch.device, bf16: bool, lr: float = 1e-4, grad_clip: float = 1.0):
        if not params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.params, self.loss_fn = params, loss_fn
        self.device, self.bf16, self.grad_clip = device, bf16, grad_clip
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def __call__(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def time_interleaved(steps: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn each round.

    Interleaving spreads a busy neighbour's load over every contender instead of charging it
    to whichever one happened to run during the busy minute.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def shape_dict(shape: TowerShape | LMShape) -> dict:
    return asdict(shape)
