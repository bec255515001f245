"""A saved model folder: self-contained, in the dtype it was trained in, with clear loading errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chiasm.cli import main
from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.processor import Batch
from chiasm.synthetic.world import WorldFiles

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}


def _clip_tower(folder: Path) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _batch(model: VisionLanguageModel, world: WorldFiles, n: int = 2) -> Batch:
    return model.processor(load_llava(world.instruct).samples[:n])


def _logits(model: VisionLanguageModel, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask, pixels=batch.pixels).logits


def _perturb_bridge(model: VisionLanguageModel) -> None:
    with torch.no_grad():
        for p in model.bridge.parameters():
            p.add_(torch.randn_like(p) * 0.1)


# ---- self-contained --------------------------------------------------------------------
def test_folder_loads_with_the_tower_folder_gone(tiny_lm_dir: Path, tiny_world: WorldFiles, tmp_path: Path) -> None:
    tower = _clip_tower(tmp_path / "tower")
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(tower), feature_layer=-2),
                      lm=LMConfig(source=str(tiny_lm_dir)))
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    _perturb_bridge(model)
    batch = _batch(model, tiny_world)
    before = _logits(model, batch)
    folder = model.save(tmp_path / "model")
    assert (folder / "encoder" / "config.json").is_file()
    assert (folder / "encoder" / "preprocessor_config.json").is_file()
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["image"]["crop"] == [32, 32] and saved["image"]["size"] == [36]
    assert saved["tokens_per_image"] == 16
    tower.rename(tmp_path / "tower-moved")
    loaded = VisionLanguageModel.load(folder)
    assert loaded.config.encoder.source == str(tower)  # the config still says where it came from
    assert loaded.encoder.preprocessing == model.encoder.preprocessing
    again = loaded.processor(load_llava(tiny_world.instruct).samples[:2])
    assert torch.equal(again.pixels, batch.pixels)
    assert torch.equal(_logits(loaded, again), before)


def test_the_saved_processor_is_what_feeds_the_loaded_model(tiny_model: VisionLanguageModel,
                                                            tmp_path: Path) -> None:
    folder = tiny_model.save(tmp_path / "model")
    data = json.loads((folder / "processor_config.json").read_text())
    data["image"]["mean"] = [0.25, 0.5, 0.75]
    (folder / "processor_config.json").write_text(json.dumps(data))
    loaded = VisionLanguageModel.load(folder)
    assert loaded.processor.image.mean == (0.25, 0.5, 0.75)
    data["tokens_per_image"] = 9
    (folder / "processor_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="says 9 tokens per image, the saved encoder and bridge make 16"):
        VisionLanguageModel.load(folder)


# ---- sources: missing folders and hub ids without network ----------------------------------
@pytest.mark.parametrize("source", ["/no/such/tower", "./no-such-tower", "../no/such/tower", "~/no-such-tower-x"])
def test_a_missing_tower_folder_is_reported_as_a_folder(source: str) -> None:
    from chiasm.encoders import build_encoder

    with pytest.raises(FileNotFoundError, match=f"folder not found: {source}$"):
        build_encoder(EncoderConfig(name="hf-vision", source=source))


def test_a_missing_lm_folder_is_reported_as_a_folder(tiny_model_config: ModelConfig) -> None:
    cfg = replace(tiny_model_config, lm=LMConfig(source="/no/such/lm"))
    with pytest.raises(FileNotFoundError, match="language model source: folder not found: /no/such/lm"):
        VisionLanguageModel.build(cfg)


def test_hub_ids_without_network_say_how_to_use_a_local_copy(tmp_path: Path) -> None:
    # In a fresh process: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    code = """
import socket
attempts = []
def blocked(*args, **kwargs):  # no name lookup or connection may even be tried
    attempts.append(args[:2])
    raise OSError("blocked")
socket.socket.connect = socket.getaddrinfo = blocked
from chiasm.config import EncoderConfig
from chiasm.encoders import build_encoder
from chiasm.lm.loader import load_language_model
for load in (lambda: build_encoder(EncoderConfig(name="hf-vision", source="no-such-org/no-such-tower")),
             lambda: load_language_model("no-such-org/no-such-lm")):
    try:
        load()
    except FileNotFoundError as exc:
        print(exc if exc.__cause__ is None and exc.__suppress_context__ else "chained: " + str(exc))
print(f"connections tried: {attempts}")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    *lines, tried = [line for line in out.stdout.splitlines() if line]
    assert len(lines) == 2 and tried == "connections tried: []", out.stderr[-2000:]
    for line, (what, name) in zip(lines, [("vision tower", "no-such-org/no-such-tower"),
                                          ("language model", "no-such-org/no-such-lm")], strict=True):
        assert line.startswith(f"{what} '{name}' is not a local folder and could not be fetched (no network")
        assert f"hf download {name} --local-dir DIR" in line and "set the source to that folder" in line
        assert f"snapshot_download('{name}', local_dir=DIR)" in line and "with HF_HUB_OFFLINE=1" in line


def test_trust_remote_code_is_off_unless_asked(tiny_model_config: ModelConfig, monkeypatch) -> None:
    import transformers

    seen: list[object] = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    assert ModelConfig().lm.trust_remote_code is False and EncoderConfig().trust_remote_code is False
    VisionLanguageModel.build(tiny_model_config)
    default, seen[:] = list(seen), []
    VisionLanguageModel.build(replace(tiny_model_config, lm=replace(tiny_model_config.lm, trust_remote_code=True)))
    assert default and set(default) == {False}  # every config read (LM, tokenizer) without remote code
    assert seen and set(seen) == {True}


# ---- dtype and attention --------------------------------------------------------------------
def test_bf16_model_saves_and_loads_in_bf16(tiny_model_config: ModelConfig, tiny_world: WorldFiles,
                                            tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(replace(tiny_model_config, dtype="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in model.lm.parameters())
    assert all(p.dtype == torch.float32 for p in model.bridge.parameters())  # a prefix bridge stays fp32
    _perturb_bridge(model)
    batch = _batch(model, tiny_world)
    before = _logits(model, batch)
    assert before.dtype == torch.bfloat16
    folder = model.save(tmp_path / "model")
    assert json.loads((folder / "chiasm_config.json").read_text())["dtype"] == "bf16"
    with safe_open(str(folder / "lm" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = VisionLanguageModel.load(folder)
    assert loaded.config.dtype == "bf16" and loaded.base_lm.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded, batch), before)
    # An explicit dtype overrides the saved one.
    wide = VisionLanguageModel.load(folder, dtype="fp32")
    assert wide.config.dtype == "fp32" and wide.base_lm.dtype == torch.float32
    torch.testing.assert_close(_logits(wide, batch).float(), before.float(), rtol=0.05, atol=0.05)


def test_a_model_cast_after_building_records_its_real_dtype(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    tiny_model.lm.to(torch.bfloat16)
    folder = tiny_model.save(tmp_path / "model")
    assert json.loads((folder / "chiasm_config.json").read_text())["dtype"] == "bf16"
    assert VisionLanguageModel.load(folder).base_lm.dtype == torch.bfloat16


def test_cli_dtype_and_device_reach_load(tiny_model: VisionLanguageModel, tiny_world: WorldFiles, tmp_path: Path,
                                         monkeypatch, capsys) -> None:
    folder = tiny_model.save(tmp_path / "model")
    image = load_llava(tiny_world.eval).samples[0].images[0]
    loaded: list[VisionLanguageModel] = []
    original = VisionLanguageModel.load.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(VisionLanguageModel, "load", classmethod(spy))
    rc = main(["chat", "--model", str(folder), "--image", str(image), "--dtype", "bf16", "--device", "cpu",
               "--max-new-tokens", "2", "What colour is the circle?"])
    assert rc == 0 and capsys.readouterr().out.endswith("\n")
    assert loaded[-1].base_lm.dtype == torch.bfloat16 and loaded[-1].device == torch.device("cpu")
    rc = main(["eval", "--model", str(folder), "--dtype", "bf16", "--out", str(tmp_path / "eval")])
    assert rc == 0 and loaded[-1].base_lm.dtype == torch.bfloat16
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["chat", "--model", str(folder), "--dtype", "fp8", "hi"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_attn_implementation_is_used_saved_and_checked(tiny_model_config: ModelConfig, tmp_path: Path) -> None:
    model = VisionLanguageModel.build(replace(tiny_model_config, attn_implementation="eager"))
    assert model.base_lm.config._attn_implementation == "eager"
    loaded = VisionLanguageModel.load(model.save(tmp_path / "model"))
    assert loaded.config.attn_implementation == "eager" and loaded.base_lm.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash'; known: eager, sdpa, flex_attention"):
        VisionLanguageModel.build(replace(tiny_model_config, attn_implementation="flash"))


def test_flash_attention_without_its_package_is_a_clear_error(tiny_model_config: ModelConfig) -> None:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="'flash_attention_2' needs the 'flash_attn' package"):
        VisionLanguageModel.build(replace(tiny_model_config, attn_implementation="flash_attention_2"))


def test_tower_folder_copy_is_independent_of_the_original(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """Deleting the tower outright (not only renaming it) leaves the model folder loadable."""
    tower = _clip_tower(tmp_path / "tower")
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(tower)), lm=LMConfig(source=str(tiny_lm_dir)))
    folder = VisionLanguageModel.build(cfg).save(tmp_path / "model")
    shutil.rmtree(tower)
    assert VisionLanguageModel.load(folder).tokens_per_image == 16


@pytest.mark.parametrize("bridge", [BridgeConfig("gated_xattn", {"every": 1, "num_latents": 4, "heads": 4}),
                                    BridgeConfig("visual_expert")])
def test_in_lm_bridges_take_the_lms_dtype(tiny_model_config: ModelConfig, tiny_world: WorldFiles, tmp_path: Path,
                                          bridge: BridgeConfig) -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel.build(replace(tiny_model_config, bridge=bridge, dtype="bf16"))
    # Their modules run on the LM's bf16 hidden states, so they are bf16 too (a prefix bridge stays fp32).
    assert {p.dtype for p in model.bridge.parameters()} == {torch.bfloat16}
    batch = _batch(model, tiny_world)
    before = _logits(model, batch)
    loaded = VisionLanguageModel.load(model.save(tmp_path / "model"))
    assert {p.dtype for p in loaded.bridge.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(loaded, batch), before)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_dual_tower_keeps_only_its_image_side(family: str, tiny_lm_dir: Path, tiny_world: WorldFiles,
                                                tmp_path: Path) -> None:
    """Hub CLIP/SigLIP checkpoints are image + text models: the folder keeps the vision config alone."""
    import transformers as tf

    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    tower = tmp_path / "dual"
    torch.manual_seed(0)
    if family == "clip":
        tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=TOWER)).save_pretrained(tower)
        tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            tower)
    else:
        tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=TOWER)).save_pretrained(tower)
        tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tower)
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(tower)), lm=LMConfig(source=str(tiny_lm_dir)))
    model = VisionLanguageModel.build(cfg)
    _perturb_bridge(model)
    batch = _batch(model, tiny_world)
    before = _logits(model, batch)
    folder = model.save(tmp_path / "model")
    saved = json.loads((folder / "encoder" / "config.json").read_text())
    assert saved["model_type"] == f"{family}_vision_model"
    shutil.rmtree(tower)
    assert torch.equal(_logits(VisionLanguageModel.load(folder), batch), before)


def test_load_can_pick_another_attention_kernel(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    folder = tiny_model.save(tmp_path / "model")
    loaded = VisionLanguageModel.load(folder, attn_implementation="eager")
    assert loaded.config.attn_implementation == "eager" and loaded.base_lm.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown attn_implementation 'fast'"):
        VisionLanguageModel.load(folder, attn_implementation="fast")


def test_saving_over_an_older_folder_drops_its_tower_config(tiny_lm_dir: Path, tiny_model: VisionLanguageModel,
                                                            tmp_path: Path) -> None:
    tower = _clip_tower(tmp_path / "tower")
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(tower)), lm=LMConfig(source=str(tiny_lm_dir)))
    folder = VisionLanguageModel.build(cfg).save(tmp_path / "model")
    assert (folder / "encoder").is_dir()
    tiny_model.save(folder)
    assert not (folder / "encoder").exists()
    assert VisionLanguageModel.load(folder).config == tiny_model.config
