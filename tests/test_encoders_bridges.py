"""Encoders (pixels -> grid features) and prefix bridges (features -> LM-width tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from chiasm.bridges import build_bridge
from chiasm.bridges.projectors import LinearBridge, MLPBridge
from chiasm.config import BridgeConfig, EncoderConfig
from chiasm.encoders import build_encoder
from chiasm.encoders.tiny_vit import TinyViT

TINY_VIT = EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32})


# ---- tiny-vit ---------------------------------------------------------------------------
def test_tiny_vit_shape_and_grid() -> None:
    enc = build_encoder(TINY_VIT)
    assert isinstance(enc, TinyViT)
    assert enc.grid() == (4, 4) and enc.dim == 32 and enc.image_size == 64
    out = enc(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 16, 32)
    assert torch.isfinite(out).all()


def test_tiny_vit_other_grid() -> None:
    enc = build_encoder(EncoderConfig(name="tiny-vit", image_size=48, options={"patch": 8, "dim": 16, "heads": 2}))
    assert enc.grid() == (6, 6)
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 16)
    assert len(enc.blocks()) == 2


def test_tiny_vit_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        build_encoder(EncoderConfig(name="tiny-vit", image_size=60, options={"patch": 16}))


def test_tiny_vit_rows_are_independent() -> None:
    """Each image's features depend on that image only (no mixing across the batch)."""
    enc = build_encoder(TINY_VIT).eval()
    x = torch.randn(2, 3, 64, 64)
    both = enc(x)
    torch.testing.assert_close(both[1:], enc(x[1:]), rtol=1e-5, atol=1e-5)


def test_preprocess_resizes_and_normalises() -> None:
    enc = build_encoder(TINY_VIT)
    colour = (255, 0, 51)
    # A non-square palette-free image of one colour: resizing keeps the colour exactly.
    t = enc.preprocess(Image.new("RGB", (50, 30), colour))
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    for c, v in enumerate(colour):
        expected = (v / 255 - enc.mean[c]) / enc.std[c]
        torch.testing.assert_close(t[c], torch.full((64, 64), expected))
    assert t.min() >= -1 and t.max() <= 1  # mean = std = 0.5 maps [0, 1] to [-1, 1]


def test_preprocess_converts_grey_and_rgba_to_rgb() -> None:
    enc = build_encoder(TINY_VIT)
    grey = enc.preprocess(Image.new("L", (64, 64), 128))
    assert grey.shape == (3, 64, 64)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba = enc.preprocess(Image.new("RGBA", (64, 64), (10, 20, 30, 0)))
    assert rgba.shape == (3, 64, 64)


def test_preprocess_uses_the_encoders_normalisation() -> None:
    enc = build_encoder(TINY_VIT)
    enc.mean, enc.std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    t = enc.preprocess(Image.new("RGB", (64, 64), (255, 255, 255)))
    for c in range(3):
        torch.testing.assert_close(t[c, 0, 0], torch.tensor((1 - enc.mean[c]) / enc.std[c]))


# ---- bridges ----------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 4), (2, 3), (1, 1)])
@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_prefix_bridge_tokens_and_shapes(name: str, grid: tuple[int, int]) -> None:
    bridge = build_bridge(BridgeConfig(name=name), 32, 64)
    n = grid[0] * grid[1]
    assert bridge.num_tokens(grid) == n
    out = bridge(torch.randn(5, n, 32), grid)
    assert out.shape == (5, bridge.num_tokens(grid), 64)


def test_bridge_classes_and_options() -> None:
    assert isinstance(build_bridge(BridgeConfig(name="linear"), 32, 64), LinearBridge)
    mlp = build_bridge(BridgeConfig(name="mlp", options={"hidden": 48, "norm": True}), 32, 64)
    assert isinstance(mlp, MLPBridge)
    assert isinstance(mlp.norm, nn.LayerNorm) and mlp.norm.normalized_shape == (32,)
    assert mlp.fc1.out_features == 48 and mlp.fc2.in_features == 48 and mlp.fc2.out_features == 64
    plain = build_bridge(BridgeConfig(name="mlp"), 32, 64)
    assert isinstance(plain.norm, nn.Identity) and plain.fc1.out_features == 64  # hidden defaults to lm_dim


def test_linear_bridge_is_per_token() -> None:
    bridge = build_bridge(BridgeConfig(name="linear"), 8, 16)
    x = torch.randn(2, 4, 8)
    out = bridge(x, (2, 2))
    torch.testing.assert_close(out, x @ bridge.proj.weight.T + bridge.proj.bias)


@pytest.mark.parametrize(
    "cfg",
    [BridgeConfig(name="mlp", options={"hiden": 48}), BridgeConfig(name="linear", options={"hidden": 48})],
)
def test_build_bridge_bad_option(cfg: BridgeConfig) -> None:
    with pytest.raises(ValueError, match=rf"bridge '{cfg.name}': bad options"):
        build_bridge(cfg, 32, 64)


# ---- hf-vision on tiny local towers -----------------------------------------------------
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(root / "bare")  # no image processor
    return {"clip": root / "clip", "siglip": root / "siglip", "bare": root / "bare"}


def _reference(kind: str, folder: Path, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    tower = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if kind == "clip" else hidden  # CLIP prepends a class token


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_shape_and_feature_layer(towers: dict[str, Path], kind: str) -> None:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    outs = {}
    for layer in (-1, -2, 0):  # 2 layers: hidden_states holds 3 entries
        enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers[kind]), feature_layer=layer)).eval()
        assert enc.grid() == (4, 4) and enc.dim == 32 and enc.image_size == 32
        with torch.no_grad():
            out = enc(pixels)
        assert out.shape == (2, 16, 32)
        torch.testing.assert_close(out, _reference(kind, towers[kind], pixels, layer), rtol=1e-5, atol=1e-5)
        outs[layer] = out
    # The layer choice matters: different layers give different features.
    assert not torch.allclose(outs[-1], outs[-2])
    assert not torch.allclose(outs[-2], outs[0])


def test_hf_vision_blocks_and_no_silent_normalisation(towers: dict[str, Path]) -> None:
    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers["clip"])))
    assert len(enc.blocks()) == 2
    assert enc.preprocess(Image.new("RGB", (20, 20))).shape == (3, 32, 32)
    # A tower folder with no image processor: an error, never a guessed mean = std = 0.5.
    with pytest.raises(ValueError, match=r"has no preprocessor_config\.json.*normalize"):
        build_encoder(EncoderConfig(name="hf-vision", source=str(towers["bare"])))
    half = build_encoder(EncoderConfig(name="hf-vision", source=str(towers["bare"]), options={"normalize": "half"}))
    assert half.preprocessing.mean == (0.5, 0.5, 0.5) and half.preprocessing.std == (0.5, 0.5, 0.5)


def test_hf_vision_reads_normalisation_from_processor(towers: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from transformers import CLIPImageProcessor

    folder = tmp_path / "clip"
    shutil.copytree(towers["clip"], folder)
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    CLIPImageProcessor(image_mean=mean, image_std=std, size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(folder)))
    assert enc.preprocessing.mean == pytest.approx(tuple(mean)) and enc.preprocessing.std == pytest.approx(tuple(std))


def test_hf_vision_needs_a_source() -> None:
    with pytest.raises(ValueError, match="needs `source`"):
        build_encoder(EncoderConfig(name="hf-vision"))
