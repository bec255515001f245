"""Every common transformers vision-tower family works as the encoder, checked against transformers itself.

Each family is a tiny randomly initialised checkpoint of the real class with its own image
processor, written once per module: CLIP (a vision-only folder and a whole CLIPModel),
SigLIP, SigLIP2 (NaFlex), DINOv2 (with and without register tokens), ViT. For each, the
pixels chiasm makes equal those of the tower's own processor, the features equal the
tower's hidden states at the chosen layer without its class/register tokens, the visual
token count follows, and a saved VLM loads to identical logits.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig
from chiasm.data.llava import load_llava
from chiasm.encoders import build_encoder
from chiasm.encoders.naflex import naflex_inputs
from chiasm.errors import ModelFolderError
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import make_tiny_vision_tower

# name -> (family, whole dual checkpoint, tokens before the patch grid: class + registers)
TOWERS = {
    "clip": ("clip", False, 1),
    "clip-full": ("clip", True, 1),
    "siglip": ("siglip", False, 0),
    "siglip2": ("siglip2", False, 0),
    "dinov2": ("dinov2", False, 1),
    "dinov2-registers": ("dinov2_with_registers", False, 3),
    "vit": ("vit", False, 1),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tower-families")
    return {name: make_tiny_vision_tower(root / name, family=family, full=full)
            for name, (family, full, _) in TOWERS.items()}


def _reference(folder: Path, image: Image.Image, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The tower's own processor inputs and hidden states at ``layer``, straight from transformers."""
    inputs = dict(AutoImageProcessor.from_pretrained(folder, backend="pil")(image, return_tensors="pt"))
    tower = AutoModel.from_pretrained(folder).eval()
    tower = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        return inputs, tower(**inputs, output_hidden_states=True).hidden_states[layer]


@pytest.mark.parametrize("layer", [-2, -1])
@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_features_match_transformers_and_round_trip(name: str, layer: int, towers: dict[str, Path],
                                                          tiny_lm_dir: Path, tiny_world: WorldFiles,
                                                          tmp_path: Path) -> None:
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(towers[name]), feature_layer=layer),
                      bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(tiny_lm_dir)))
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg).eval()
    samples = load_llava(tiny_world.instruct).samples[:2]
    image = Image.open(samples[0].images[0])
    inputs, hidden = _reference(towers[name], image, layer)
    prefix = TOWERS[name][2]

    pixels = model.processor.preprocess(image)[None]
    if name == "siglip2":  # a flat list of patches + their grid, as its NaFlex processor writes them
        ours = naflex_inputs(pixels, model.encoder.patch)
        assert all(torch.equal(ours[k], inputs[k]) for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask"))
    else:
        assert torch.equal(pixels, inputs["pixel_values"])
    with torch.no_grad():
        features = model.encode_images(pixels)
    h, w = model.encoder.grid()
    assert h * w == hidden.shape[1] - prefix == model.tokens_per_image
    assert features.shape == (1, h * w, hidden.shape[2]) and model.encoder.dim == hidden.shape[2]
    torch.testing.assert_close(features, hidden[:, prefix:], atol=1e-5, rtol=1e-5)

    batch = model.processor(samples)
    with torch.no_grad():
        for p in model.bridge.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        before = model(batch.input_ids, batch.attention_mask, pixels=batch.pixels, return_logits=True).logits
    folder = model.save(tmp_path / "model")
    saved = json.loads((folder / "encoder" / "config.json").read_text())
    assert "text_config" not in saved  # a dual checkpoint's image side only
    loaded = VisionLanguageModel.load(folder)
    again = loaded.processor(samples)
    assert torch.equal(again.pixels, batch.pixels)
    with torch.no_grad():
        after = loaded(again.input_ids, again.attention_mask, pixels=again.pixels, return_logits=True).logits
    assert torch.equal(after, before)


@pytest.mark.parametrize("name", ["dinov2", "siglip2"])
def test_towers_that_resize_their_position_table_run_at_another_size_unasked(name: str, towers: dict[str, Path],
                                                                            tiny_world: WorldFiles) -> None:
    encoder = build_encoder(EncoderConfig(name="hf-vision", source=str(towers[name]), image_size=48)).eval()
    assert encoder.grid() == (6, 6) and encoder.preprocessing.output_size == (48, 48)
    image = Image.open(load_llava(tiny_world.instruct).samples[0].images[0])
    pixels = encoder.preprocess(image)[None]
    tower = AutoModel.from_pretrained(towers[name]).eval()
    with torch.no_grad():
        if name == "siglip2":  # its own processor, given the budget of a 6 x 6 grid
            inputs = AutoImageProcessor.from_pretrained(towers[name], backend="pil", max_num_patches=36)(
                image, return_tensors="pt")
            torch.testing.assert_close(naflex_inputs(pixels, 8)["pixel_values"], inputs["pixel_values"])
        else:  # DINOv2 interpolates its position table to whatever it is given
            inputs = {"pixel_values": pixels}
        hidden = tower(**inputs, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(encoder(pixels), hidden[:, -36:], atol=1e-5, rtol=1e-5)


def test_dinov2_takes_its_processors_crop_not_its_position_table_size(towers: dict[str, Path]) -> None:
    # The config's image_size (64, as 518 in the real checkpoints) sizes the position table only.
    encoder = build_encoder(EncoderConfig(name="hf-vision", source=str(towers["dinov2"])))
    assert json.loads((towers["dinov2"] / "config.json").read_text())["image_size"] == 64
    assert encoder.image_size == 32 and encoder.grid() == (4, 4)


def test_siglip2_grid_is_the_largest_square_in_the_patch_budget(towers: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "siglip2"
    folder.mkdir()
    for f in towers["siglip2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "max_num_patches": 30}))
    assert build_encoder(EncoderConfig(name="hf-vision", source=str(folder))).grid() == (5, 5)
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "patch_size": 16}))
    with pytest.raises(ValueError) as err:
        build_encoder(EncoderConfig(name="hf-vision", source=str(folder)))
    assert str(err.value) == "the tower's image processor cuts 16 px patches, its config embeds 8 px patches"


def _remote_code_folder(folder: Path, auto_class: str) -> Path:
    """A checkpoint folder whose config names classes only its own (absent) Python files define."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_from_the_hub", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                          auto_class: "modeling_custom.CustomModel"}}))
    return folder


@pytest.mark.parametrize("part", ["encoder", "lm"])
def test_remote_code_is_refused_with_the_option_that_allows_it(part: str, tiny_model_config: ModelConfig,
                                                               tmp_path: Path) -> None:
    if part == "encoder":
        folder = _remote_code_folder(tmp_path / "custom", "AutoModel")
        cfg = replace(tiny_model_config, encoder=EncoderConfig(name="hf-vision", source=str(folder)))
        what, section = "vision tower", "[model.encoder]"
    else:
        folder = _remote_code_folder(tmp_path / "custom", "AutoModelForCausalLM")
        cfg = replace(tiny_model_config, lm=LMConfig(source=str(folder)))
        what, section = "language model", "[model.lm]"
    with pytest.raises(ModelFolderError) as err:
        VisionLanguageModel.build(cfg)
    assert str(err.value) == (
        f"{what} {folder}: its config needs Python code that comes with the model (auto_map), and chiasm runs such "
        f"code only when asked; if you trust that code, set trust_remote_code = true under {section}")
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_the_encoders_trust_remote_code_reaches_transformers(towers: dict[str, Path], monkeypatch) -> None:
    import transformers

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoImageProcessor):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for asked in (False, True):
        seen.clear()
        build_encoder(EncoderConfig(name="hf-vision", source=str(towers["clip"]), trust_remote_code=asked))
        assert {name for name, _ in seen} == {"AutoConfig", "AutoModel", "AutoImageProcessor"}
        assert {value for _, value in seen} == {asked}


def test_a_checkpoint_whose_weights_do_not_fit_the_tower_is_refused(towers: dict[str, Path], tmp_path: Path) -> None:
    # ViT weights under a CLIP config: transformers would run a randomly initialised CLIP tower.
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in towers["vit"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_bytes((towers["clip"] / "config.json").read_bytes())
    with pytest.raises(ModelFolderError, match=rf"^vision tower {folder}: \d+ of CLIPVisionModel's \d+ weights are "
                                               r"not in the checkpoint \(e\.g\. \S+\); it is not a "
                                               r"checkpoint of this tower$"):
        build_encoder(EncoderConfig(name="hf-vision", source=str(folder)))
