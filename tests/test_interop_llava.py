"""LLaVA checkpoints in and out, with transformers' ``LlavaForConditionalGeneration`` as the reference.

Import: a LLaVA folder read by chiasm gives the same input ids (chat template, image tokens
expanded), the same pixels and the same logits as transformers on it. Export: the folder
written for a chiasm model loads with ``AutoModelForImageTextToText``/``AutoProcessor`` and
computes chiasm's logits and greedy tokens. Round trip, training from an imported folder, and
the refusals with their messages.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextConfig

from chiasm.chat import ask
from chiasm.cli import main
from chiasm.config import BridgeConfig, ConfigError, EncoderConfig, LMConfig, ModelConfig, RunConfig, load_config
from chiasm.content_parts import to_parts
from chiasm.data.sample import Sample, Turn
from chiasm.errors import ModelFolderError
from chiasm.interop import NotRepresentable
from chiasm.interop.export_hf import KEEPS_FORMAT, export_llava
from chiasm.interop.llava import import_llava
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_llava, make_tiny_lm, make_tiny_vision_tower
from chiasm.train.init_from import resolve_init_from
from chiasm.train.trainer import Trainer

QUESTION = "What colour is the circle?"
ANSWER = "red"
TOL = 1e-4


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square noise image, so that resize and crop (or padding) all matter."""
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module", params=[
    {"tower": "clip"}, {"tower": "siglip"},
    # A tokenizer that adds BOS (as Llama's) under a template that writes none; a projector without biases.
    {"tower": "clip", "bos": True, "multimodal_projector_bias": False}], ids=["clip", "siglip", "bos-nobias"])
def llava_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava"), **request.param)


@pytest.fixture(scope="module")
def clip_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava-clip"))


def _sample(image: Path, answer: str | None = None) -> Sample:
    turns = [Turn("human", f"<image>\n{QUESTION}")] + ([Turn("gpt", answer)] if answer else [])
    return Sample("s", turns, images=[image])


def _hf_inputs(processor, image: Path, answer: str | None = None) -> dict:
    """transformers' processor on the same conversation, in its typed-content form."""
    conv = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": QUESTION}]}]
    if answer:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(conv, add_generation_prompt=answer is None, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _assert_same(model: VisionLanguageModel, reference, processor, image: Path, answer: str | None) -> None:
    """Ids, pixels and logits of chiasm and of the reference agree (logits over chiasm's vocabulary)."""
    batch = model.processor([_sample(image, answer)], for_generation=answer is None)
    inputs = _hf_inputs(processor, image, answer)
    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()
    assert torch.equal(batch.pixels, inputs["pixel_values"])
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask, pixels=batch.pixels, return_logits=True).logits
        theirs = reference(**inputs).logits
    vocab = ours.shape[-1]
    assert (ours - theirs[..., :vocab]).abs().max() < TOL
    # Rows a vocabulary grew by (to hold the image token) never win: their logit is the mean one.
    assert bool((theirs[..., vocab:] < theirs[..., :vocab].max(-1, keepdim=True).values).all())


# ---- import -----------------------------------------------------------------------------
def test_import_matches_transformers(llava_dir: Path, image_path: Path, tmp_path: Path) -> None:
    model = import_llava(llava_dir)
    reference = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir, backend="pil")
    _assert_same(model, reference, processor, image_path, answer=None)  # the generation prompt
    _assert_same(model, reference, processor, image_path, answer=ANSWER)  # a whole training conversation
    # LLaVA's generation prompt ends "ASSISTANT:" while its answers follow "ASSISTANT: ": chiasm takes
    # the template's prompt, so the space stays in the answer's first token, as in training.
    prompt = model.tokenizer.decode(model.processor([_sample(image_path)], for_generation=True).input_ids[0])
    assert prompt.endswith("ASSISTANT:")
    adds_bos = model.tokenizer("a")["input_ids"][0] == model.tokenizer.bos_token_id  # as transformers' processor
    assert prompt.startswith(model.tokenizer.bos_token) == adds_bos
    # Export writes the same conversation format back: transformers reads chiasm's ids from it.
    out = export_llava(model, tmp_path / "hf")
    exported = AutoModelForImageTextToText.from_pretrained(out).eval()
    _assert_same(model, exported, AutoProcessor.from_pretrained(out), image_path, answer=ANSWER)


def test_import_cli_writes_a_model_folder_that_chats_and_trains(clip_llava_dir: Path, image_path: Path,
                                                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "imported"
    assert main(["import", "--format", "llava", str(clip_llava_dir), str(out)]) == 0
    model = VisionLanguageModel.load(out)
    assert model.config.bridge.name == "mlp" and model.config.encoder.feature_layer == -2
    assert model.config.lm.source == str(out.resolve() / "lm")  # the base LM that evaluation compares against
    reference = AutoModelForImageTextToText.from_pretrained(clip_llava_dir).eval()
    _assert_same(model, reference, AutoProcessor.from_pretrained(clip_llava_dir, backend="pil"), image_path, None)
    capsys.readouterr()
    assert main(["chat", "--model", str(out), "--image", str(image_path), "--max-new-tokens", "3", QUESTION]) == 0
    assert capsys.readouterr().out == ask(model, QUESTION, [image_path], max_new_tokens=3) + "\n"
    # A second import into the same folder is refused: the model written there stays untouched.
    assert main(["import", "--format", "llava", str(clip_llava_dir), str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err

    shutil.copy(image_path, tmp_path / "noise.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": str(i), "image": "noise.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]} for i in range(2)]))
    run = tmp_path / "run.toml"
    run.write_text(f'init_from = "{out}"\noutput_dir = "{tmp_path / "run"}"\nprecision = "fp32"\n'
                   f'[[stages]]\nname = "instruct"\ndata = "{data}"\nmax_steps = 1\nbatch_size = 2\nlr = 0.01\n'
                   '[stages.lm]\nmode = "lora"\nlora_r = 4\n')
    cfg = load_config(run)
    trainer = Trainer(cfg, show_progress=False)
    assert cfg.model == model.config  # the run records the model it trains
    before = trainer.model.bridge.fc2.weight.detach().clone()
    trained = trainer.run()
    assert not torch.equal(before, trained.bridge.fc2.weight)
    assert any("lora_" in n and p.requires_grad for n, p in trained.lm.named_parameters())
    # The run folder's resolved config.json starts the same run again; another [model] beside init_from does not.
    assert resolve_again(tmp_path / "run" / "config.json").model == model.config
    cfg.model = replace(model.config, system_prompt="Answer briefly.")
    with pytest.raises(ConfigError, match=r"^init_from: \[model\] differs from the model config in .*; leave "):
        resolve_init_from(cfg)


def resolve_again(config_json: Path) -> RunConfig:
    cfg = load_config(config_json)
    resolve_init_from(cfg)
    return cfg


# ---- export -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    return {"lm": make_tiny_lm(root / "lm"), "clip": make_tiny_vision_tower(root / "clip"),
            "siglip": make_tiny_vision_tower(root / "siglip", family="siglip")}


def _chiasm_model(parts: dict[str, Path], tower: str, bridge: str, **encoder_options) -> VisionLanguageModel:
    torch.manual_seed(1)
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(parts[tower]), feature_layer=-2,
                                            options=encoder_options),
                      bridge=BridgeConfig(name=bridge), lm=LMConfig(source=str(parts["lm"])))
    return VisionLanguageModel.build(cfg).eval()


@pytest.mark.parametrize(("tower", "bridge", "pad"), [("clip", "mlp", False), ("clip", "linear", False),
                                                      ("siglip", "mlp", False), ("clip", "mlp", True)])
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(parts, image_path: Path, tmp_path: Path,
                                                                      tower: str, bridge: str, pad: bool) -> None:
    model = _chiasm_model(parts, tower, bridge, **({"pad_to_square": True} if pad else {}))
    out = export_llava(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and (out / "model.safetensors").is_file()
    assert config["vision_feature_select_strategy"] == {"clip": "default", "siglip": "full"}[tower]
    reference, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(out)
    assert "<image>" in processor.chat_template
    _assert_same(model, reference.eval(), processor, image_path, answer=None)
    _assert_same(model, reference, processor, image_path, answer=ANSWER)
    batch = model.processor([_sample(image_path)], for_generation=True)
    ours = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=8)[0]
    inputs = _hf_inputs(processor, image_path)
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    stop = set(reference.generation_config.eos_token_id)
    assert ours == [t for t in theirs.tolist()[: len(ours)]] and (len(ours) == 8 or int(theirs[len(ours)]) in stop)


def test_export_keeps_the_system_prompt(parts, image_path: Path, tmp_path: Path) -> None:
    model = _chiasm_model(parts, "clip", "mlp")
    model.config = replace(model.config, system_prompt='Answer in "one" word.')
    out = export_llava(model, tmp_path / "hf")
    batch = model.processor([_sample(image_path)], for_generation=True)
    assert 'Answer in "one" word.' in model.tokenizer.decode(batch.input_ids[0])
    _assert_same(model, AutoModelForImageTextToText.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out),
                 image_path, answer=None)


def test_content_parts_round_trip() -> None:
    parts = to_parts("Compare <image>\n and\n<image>: which is red?")
    assert parts == [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                     {"type": "image"}, {"type": "text", "text": ": which is red?"}]
    assert to_parts("no image here ") == [{"type": "text", "text": "no image here "}]  # no image: untouched


def test_round_trip_import_export_import(clip_llava_dir: Path, image_path: Path, tmp_path: Path) -> None:
    first = import_llava(clip_llava_dir)
    out = export_llava(first, tmp_path / "again")
    before = json.loads((clip_llava_dir / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length"):
        assert after[key] == before[key]
    assert after["text_config"]["vocab_size"] == before["text_config"]["vocab_size"]  # the token was inside already
    second = import_llava(out)
    reference = AutoModelForImageTextToText.from_pretrained(clip_llava_dir).eval()
    _assert_same(second, reference, AutoProcessor.from_pretrained(clip_llava_dir, backend="pil"), image_path, ANSWER)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---- refusals ---------------------------------------------------------------------------
def _config_only(src: Path, dst: Path, **changes) -> Path:
    """A folder with ``src``'s config.json changed: import reads and refuses it before any weight."""
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("changes", "message"), [
    ({"vision_feature_layer": [-2, -5]},
     "vision_feature_layer [-2, -5]: several tower layers concatenated; chiasm's encoder reads one layer"),
    ({"vision_feature_select_strategy": "full"},
     "vision_feature_select_strategy 'full' with a clip_vision_model tower keeps the class token beside the patch "
     "grid; chiasm's encoder gives the patch grid alone ('default')"),
    ({"projector_hidden_act": "quick_gelu"}, "projector_hidden_act 'quick_gelu': chiasm's mlp bridge uses GELU"),
])
def test_import_refuses_what_chiasm_cannot_represent(clip_llava_dir: Path, tmp_path: Path, changes: dict,
                                                     message: str) -> None:
    folder = _config_only(clip_llava_dir, tmp_path / "bad", **changes)
    with pytest.raises(NotRepresentable) as err:
        import_llava(folder)
    assert str(err.value) == f"{folder} cannot be imported: {message}"


def test_import_refuses_llava_next_anyres(clip_llava_dir: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((clip_llava_dir / "config.json").read_text())
    folder = tmp_path / "next"
    LlavaNextConfig(vision_config=config["vision_config"], text_config=config["text_config"],
                    image_grid_pinpoints=[[32, 32], [32, 64]]).save_pretrained(folder)
    assert main(["import", "--format", "llava", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "image_grid_pinpoints [[32, 32], [32, 64]]...: LLaVA-NeXT's anyres tiling" in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_folder_without_image_processor(clip_llava_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-processor"
    shutil.copytree(clip_llava_dir, folder, ignore=shutil.ignore_patterns("processor_config.json"))
    with pytest.raises(ModelFolderError, match=r"cannot load it from this folder: Can't load image processor"):
        import_llava(folder)


def test_export_refuses_other_bridges_and_encoders(tiny_model_config: ModelConfig, tmp_path: Path, capsys) -> None:
    tiny_model_config.bridge = BridgeConfig(name="qformer", options={"num_queries": 4})
    saved = VisionLanguageModel.build(tiny_model_config).save(tmp_path / "model")
    assert main(["export", str(saved), "--format", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"chiasm: error: {KEEPS_FORMAT}: encoder 'tiny-vit': a LLaVA checkpoint's vision tower is a " \
           "transformers CLIP or SigLIP tower (encoder 'hf-vision'); bridge 'qformer': LLaVA's projector is " \
           "linear -> GELU -> linear; only the 'linear' and 'mlp' bridges map onto it" in err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_mlp_options_the_projector_lacks(parts, tmp_path: Path) -> None:
    model = _chiasm_model(parts, "clip", "mlp")
    cfg = ModelConfig(encoder=model.config.encoder, bridge=BridgeConfig(name="mlp", options={"norm": True,
                                                                                             "pos_dim": 8}),
                      lm=model.config.lm, image_layout="raster")
    with pytest.raises(NotRepresentable) as err:
        export_llava(VisionLanguageModel.build(cfg), tmp_path / "hf")
    assert str(err.value) == (f"{KEEPS_FORMAT}: bridge option norm = true (a LayerNorm before the projector); "
                              "bridge option pos_dim = 8 (grid position codes beside the features)")
