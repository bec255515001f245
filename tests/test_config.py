"""Run configs: TOML/JSON into typed dataclasses, strict about keys and types, lossless on save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chiasm.config import (
    ConfigError,
    EncoderConfig,
    PolicyConfig,
    RunConfig,
    StageConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

TOML = """
output_dir = "runs/test"
seed = 3
precision = "fp32"

[model]
system_prompt = "Answer briefly."

[model.encoder]
name = "tiny-vit"
image_size = 64
options = { patch = 16, dim = 32 }

[model.bridge]
name = "mlp"
options = { hidden = 48, norm = true }

[model.lm]
source = "some/folder"

[[stages]]
name = "align"
data = "align.json"
lr = 1          # an int where a float is expected is fine
[stages.bridge]
mode = "full"

[[stages]]
name = "instruct"
data = "instruct.json"
batch_size = 4
on_error = "skip"
[stages.encoder]
mode = "last_n"
last_n = 1
[stages.lm]
mode = "lora"
lora_r = 4
lora_targets = ["q_proj", "v_proj"]
lr = 2e-4

[eval]
data = "eval.json"
max_samples = 10
"""


def _check_loaded(cfg: RunConfig) -> None:
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir == "runs/test" and cfg.seed == 3 and cfg.precision == "fp32"
    assert cfg.model.encoder == EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32})
    assert cfg.model.bridge.options == {"hidden": 48, "norm": True}
    assert cfg.model.lm.source == "some/folder"
    assert cfg.model.system_prompt == "Answer briefly."

    assert [type(s) for s in cfg.stages] == [StageConfig, StageConfig]
    align, instruct = cfg.stages
    assert align.name == "align" and align.data == "align.json"
    assert align.lr == 1.0 and isinstance(align.lr, float)
    assert isinstance(align.bridge, PolicyConfig) and align.bridge.mode == "full"
    assert align.encoder.mode == "frozen" and align.lm.mode == "frozen"  # defaults
    assert instruct.batch_size == 4 and instruct.on_error == "skip"
    assert instruct.encoder == PolicyConfig(mode="last_n", last_n=1)
    assert instruct.lm.mode == "lora" and instruct.lm.lora_r == 4 and instruct.lm.lr == 2e-4
    assert instruct.lm.lora_targets == ["q_proj", "v_proj"]
    assert instruct.bridge.mode == "full"  # the stage default for the bridge

    assert cfg.eval.data == "eval.json" and cfg.eval.max_samples == 10
    assert cfg.eval.batch_size == 16  # default


def test_toml_loads_nested_stages_and_policies(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    _check_loaded(load_config(path))


def test_json_loads_the_same_config(tmp_path: Path) -> None:
    import tomllib

    path = tmp_path / "run.json"
    path.write_text(json.dumps(tomllib.loads(TOML)))
    cfg = load_config(path)
    _check_loaded(cfg)
    toml_path = tmp_path / "run.toml"
    toml_path.write_text(TOML)
    assert cfg == load_config(toml_path)


def test_save_load_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "run.toml"
    src.write_text(TOML)
    cfg = load_config(src)
    out = tmp_path / "resolved.json"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert to_dict(again) == json.loads(out.read_text())
    # A config of defaults (and the one stage a run needs) also survives the trip.
    minimal = RunConfig(stages=[StageConfig(name="align", data="align.json")])
    save_config(minimal, out)
    assert load_config(out) == minimal


@pytest.mark.parametrize(
    ("data", "key", "where"),
    [
        ({"seeed": 1}, "seeed", "RunConfig:"),
        ({"model": {"encoder": {"nmae": "tiny-vit"}}}, "nmae", "RunConfig.model.encoder:"),
        ({"stages": [{"name": "a", "data": "x"}, {"name": "b", "data": "y", "lm": {"lora_rr": 4}}]},
         "lora_rr", "RunConfig.stages[1].lm:"),
    ],
)
def test_unknown_key_names_key_and_path(data: dict, key: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    msg = str(info.value)
    assert key in msg
    assert msg.startswith(where)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(TOML.replace("batch_size = 4", "batchsize = 4"))
    with pytest.raises(ConfigError, match=r"RunConfig\.stages\[1\].*batchsize"):
        load_config(path)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"seed": "zero"}, "RunConfig.seed"),
        ({"seed": 1.5}, "RunConfig.seed"),
        ({"seed": True}, "RunConfig.seed"),  # bool is an int subclass but not a number here
        ({"output_dir": 3}, "RunConfig.output_dir"),
        ({"eval": {"max_samples": "all"}}, "RunConfig.eval.max_samples"),
        ({"eval": {"batch_size": None}}, "RunConfig.eval.batch_size"),
        ({"model": "tiny"}, "RunConfig.model"),
        ({"model": {"encoder": {"options": 3}}}, "RunConfig.model.encoder.options"),
        ({"stages": {"name": "a"}}, "RunConfig.stages"),
        ({"stages": [{"name": "a", "data": "x", "lr": "fast"}]}, "RunConfig.stages[0].lr"),
        ({"stages": [{"name": "a", "data": "x", "lm": {"lora_targets": "q_proj"}}]},
         "RunConfig.stages[0].lm.lora_targets"),
    ],
)
def test_wrong_type_is_an_error(data: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    assert str(info.value).startswith(where)


@pytest.mark.parametrize(
    ("data", "bad"),
    [
        ({"precision": "fp16"}, "fp16"),
        ({"stages": [{"name": "a", "data": "x", "lm": {"mode": "partial"}}]}, "partial"),
        ({"stages": [{"name": "a", "data": "x", "on_error": "ignore"}]}, "ignore"),
    ],
)
def test_bad_literal_is_an_error(data: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=bad) as info:
        from_dict(RunConfig, data)
    assert "is not one of" in str(info.value)


def test_missing_required_stage_field() -> None:
    with pytest.raises(ConfigError, match=r"RunConfig\.stages\[0\].*data"):
        from_dict(RunConfig, {"stages": [{"name": "a"}]})


def test_config_error_is_a_value_error() -> None:
    # The CLI turns ValueErrors into a clean exit code; ConfigError must be one of them.
    assert issubclass(ConfigError, ValueError)
