"""A transformers tower is fed exactly what its own image processor would feed it.

Tiny randomly initialised CLIP, SigLIP, ViT and DINOv2 towers are saved with an image
processor config of the kind each family ships (shortest-edge resize + centre crop, or a
square resize; CLIP, ImageNet or half normalisation; bicubic or bilinear), and chiasm's pixels
are compared with transformers' processor output for the same PIL image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chiasm.config import ConfigError, EncoderConfig
from chiasm.encoders import build_encoder
from chiasm.encoders.preprocessing import NORMALISATIONS, ImagePreprocessing, pad_to_square

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}


def _save(kind: str, folder: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "clip":  # CLIP: shortest edge then centre crop, OpenAI statistics, bicubic
        tf.CLIPVisionModel(tf.CLIPVisionConfig(**SIZES)).save_pretrained(folder)
        tf.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
            folder)
    elif kind == "siglip":  # SigLIP: square resize, no crop, mean = std = 0.5, bicubic
        tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIZES)).save_pretrained(folder)
        tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "vit":  # ViT: square resize, bilinear
        tf.ViTModel(tf.ViTConfig(**SIZES)).save_pretrained(folder)
        tf.ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=2).save_pretrained(folder)
    elif kind == "dinov2":  # DINOv2: BiT processor, shortest edge + crop, ImageNet statistics
        tf.Dinov2Model(tf.Dinov2Config(**SIZES)).save_pretrained(folder)
        tf.BitImageProcessorPil(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32},
                                image_mean=list(NORMALISATIONS["imagenet"][0]),
                                image_std=list(NORMALISATIONS["imagenet"][1])).save_pretrained(folder)


KINDS = ["clip", "siglip", "vit", "dinov2"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-towers")
    for kind in KINDS:
        _save(kind, root / kind)
    return {kind: root / kind for kind in KINDS}


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resampling filters give visibly different results on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


def _reference(folder: Path, image: Image.Image) -> torch.Tensor:
    from transformers import AutoImageProcessor

    # The PIL backend: the one chiasm follows (the torchvision one antialiases differently).
    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return proc(image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(57, 41), (30, 70), (32, 32)])
def test_pixels_match_the_towers_own_image_processor(towers: dict[str, Path], kind: str,
                                                     shape: tuple[int, int]) -> None:
    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers[kind])))
    image = _photo(*shape)
    ours = enc.preprocess(image)
    ref = _reference(towers[kind], image)
    assert ours.shape == ref.shape == (3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_the_steps_read_from_each_family(towers: dict[str, Path]) -> None:
    prep = {k: build_encoder(EncoderConfig(name="hf-vision", source=str(towers[k]))).preprocessing for k in KINDS}
    assert (prep["clip"].resize, prep["clip"].size, prep["clip"].crop) == ("shortest_edge", (40,), (32, 32))
    assert prep["clip"].mean == pytest.approx(NORMALISATIONS["clip"][0])
    assert (prep["siglip"].resize, prep["siglip"].size, prep["siglip"].crop) == ("exact", (32, 32), None)
    assert prep["siglip"].mean == (0.5, 0.5, 0.5) and prep["siglip"].resample == "bicubic"
    assert prep["vit"].resample == "bilinear"
    assert prep["dinov2"].std == pytest.approx(NORMALISATIONS["imagenet"][1]) and prep["dinov2"].crop == (32, 32)


def test_bilinear_and_bicubic_differ_so_the_resample_is_really_read(towers: dict[str, Path]) -> None:
    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers["vit"])))
    image = _photo(57, 41)
    bicubic = ImagePreprocessing(**{**enc.preprocessing.to_dict(), "resample": "bicubic"})(image)
    assert (bicubic - enc.preprocess(image)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pad_to_square_pads_with_the_mean_colour_before_the_processor(towers: dict[str, Path], kind: str) -> None:
    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers[kind]), options={"pad_to_square": True}))
    mean = enc.preprocessing.mean
    image = _photo(60, 24)
    # LLaVA-1.5: expand to a square of the longer side, the image centred, the rest the mean colour.
    canvas = Image.new("RGB", (60, 60), tuple(int(m * 255) for m in mean))
    canvas.paste(image, (0, 18))
    torch.testing.assert_close(enc.preprocess(image), _reference(towers[kind], canvas), rtol=1e-5, atol=1e-5)
    assert pad_to_square(image, (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)
    # The whole picture survives: without padding CLIP's centre crop cuts the sides off.
    plain = build_encoder(EncoderConfig(name="hf-vision", source=str(towers[kind]))).preprocess(image)
    assert not torch.allclose(plain, enc.preprocess(image))


def test_explicit_normalisation_overrides_and_is_checked(towers: dict[str, Path]) -> None:
    src = str(towers["clip"])
    enc = build_encoder(EncoderConfig(name="hf-vision", source=src, options={"mean": [0.1, 0.2, 0.3],
                                                                            "std": [0.3, 0.2, 0.1]}))
    assert enc.preprocessing.mean == (0.1, 0.2, 0.3) and enc.preprocessing.crop == (32, 32)
    with pytest.raises(ValueError, match="mean and std go together"):
        build_encoder(EncoderConfig(name="hf-vision", source=src, options={"mean": [0.1, 0.2, 0.3]}))
    with pytest.raises(ConfigError, match=r"'clipp' is not one of \['clip', 'imagenet', 'half'\]"):
        build_encoder(EncoderConfig(name="hf-vision", source=src, options={"normalize": "clipp"}))


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
def test_image_size_other_than_the_towers_interpolates_or_is_refused(towers: dict[str, Path], kind: str) -> None:
    from transformers import AutoModel

    src = str(towers[kind])
    with pytest.raises(ValueError, match=r"image_size 48 differs from the tower's 32 px.*interpolate_pos_encoding"):
        build_encoder(EncoderConfig(name="hf-vision", source=src, image_size=48))
    enc = build_encoder(EncoderConfig(name="hf-vision", source=src, image_size=48,
                                      options={"interpolate_pos_encoding": True})).eval()
    assert enc.image_size == 48 and enc.grid() == (6, 6)
    pixels = enc.preprocess(_photo(70, 50))
    assert pixels.shape == (3, 48, 48)
    with torch.no_grad():
        ours = enc(pixels[None])
        tower = AutoModel.from_pretrained(src).eval()
        hidden = tower(pixel_values=pixels[None], interpolate_pos_encoding=True,
                       output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, hidden[:, -36:], rtol=1e-5, atol=1e-5)


def test_dinov2_features_skip_the_class_token(towers: dict[str, Path]) -> None:
    from transformers import Dinov2Model

    enc = build_encoder(EncoderConfig(name="hf-vision", source=str(towers["dinov2"]))).eval()
    pixels = enc.preprocess(_photo(40, 40))[None]
    with torch.no_grad():
        ref = Dinov2Model.from_pretrained(towers["dinov2"]).eval()(pixel_values=pixels,
                                                                   output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(enc(pixels), ref[:, 1:], rtol=1e-5, atol=1e-5)
