"""Config values checked before anything is built: ranges, stage names, empty runs, one message for all."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

import chiasm.config as config_module
from chiasm.config import (
    ConfigError,
    EvalConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    StageConfig,
    load_config,
)
from chiasm.config_checks import RULES, check_run_config, check_values, numeric_fields, value_problems


def _run(**stage_kwargs) -> RunConfig:
    return RunConfig(stages=[StageConfig(name="align", data="align.json", **stage_kwargs)])


def _config_dataclasses() -> list[type]:
    return [cls for _, cls in inspect.getmembers(config_module, inspect.isclass)
            if dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__]


def test_every_numeric_field_has_a_rule() -> None:
    # A numeric field added to any config dataclass without a rule fails here.
    classes = _config_dataclasses()
    assert {"RunConfig", "StageConfig", "PolicyConfig", "ModelConfig", "EncoderConfig", "EvalConfig"} <= {
        c.__name__ for c in classes}
    fields = {(cls.__name__, name) for cls in classes for name in numeric_fields(cls)}
    missing = sorted(fields - set(RULES))
    assert not missing, f"numeric config fields without a value rule: {missing}"
    stale = sorted(set(RULES) - fields)
    assert not stale, f"rules for fields that are not numeric config fields: {stale}"


def test_defaults_pass_and_each_default_lies_in_its_rule() -> None:
    check_run_config(_run())
    check_values(EvalConfig(), "eval")
    for cls in _config_dataclasses():
        for f in dataclasses.fields(cls):
            if (cls.__name__, f.name) in RULES and f.default not in (dataclasses.MISSING, None):
                assert RULES[cls.__name__, f.name].ok(f.default), (cls.__name__, f.name, f.default)


@pytest.mark.parametrize(
    ("cfg", "line"),
    [
        (_run(lr=0.0), "stages[0].lr: must be > 0, got 0.0"),
        (_run(lr=-1e-3), "stages[0].lr: must be > 0, got -0.001"),
        (_run(lm=PolicyConfig(mode="lora", lr=0.0)), "stages[0].lm.lr: must be > 0, got 0.0"),
        (_run(weight_decay=-0.1), "stages[0].weight_decay: must be >= 0, got -0.1"),
        (_run(batch_size=0), "stages[0].batch_size: must be >= 1, got 0"),
        (_run(grad_accum=0), "stages[0].grad_accum: must be >= 1, got 0"),
        (_run(epochs=0.0), "stages[0].epochs: must be > 0, got 0.0"),
        (_run(max_steps=0), "stages[0].max_steps: must be >= 1, got 0"),
        (_run(warmup_ratio=1.5), "stages[0].warmup_ratio: must be in [0, 1], got 1.5"),
        (_run(min_lr_ratio=-0.1), "stages[0].min_lr_ratio: must be in [0, 1], got -0.1"),
        (_run(grad_clip=0.0), "stages[0].grad_clip: must be > 0, got 0.0"),
        (_run(checkpoint_every=-1), "stages[0].checkpoint_every: must be >= 0, got -1"),
        (_run(temperature=0.0), "stages[0].temperature: must be > 0, got 0.0"),
        (_run(lm=PolicyConfig(mode="lora", lora_r=0)), "stages[0].lm.lora_r: must be >= 1, got 0"),
        (_run(lm=PolicyConfig(mode="lora", lora_alpha=0)), "stages[0].lm.lora_alpha: must be > 0, got 0"),
        (_run(lm=PolicyConfig(mode="lora", lora_dropout=1.0)), "stages[0].lm.lora_dropout: must be in [0, 1), got 1.0"),
        (_run(encoder=PolicyConfig(mode="last_n", last_n=0)), "stages[0].encoder.last_n: must be >= 1, got 0"),
        (_run(replay_tokens=0), "stages[0].replay_tokens: must be >= 1, got 0"),
        (_run(num_workers=-1), "stages[0].num_workers: must be >= 0, got -1"),
        (_run(pack_length=-8), "stages[0].pack_length: must be >= 0, got -8"),
        (_run(group_by_length=-1), "stages[0].group_by_length: must be >= 0, got -1"),
        (_run(max_skip_fraction=1.5), "stages[0].max_skip_fraction: must be in [0, 1], got 1.5"),
        (_run(max_image_pixels=0), "stages[0].max_image_pixels: must be >= 1, got 0"),
        (RunConfig(stages=_run().stages, model=ModelConfig(max_length=0)), "model.max_length: must be >= 1, got 0"),
        (RunConfig(stages=_run().stages, eval=EvalConfig(batch_size=0)), "eval.batch_size: must be >= 1, got 0"),
        (RunConfig(stages=_run().stages, eval=EvalConfig(max_new_tokens=0)),
         "eval.max_new_tokens: must be >= 1, got 0"),
        (RunConfig(stages=_run().stages, eval=EvalConfig(retention_tokens=100)),
         "eval.retention_tokens: must be >= 256, got 100"),
        (RunConfig(stages=_run().stages, seed=-1), "seed: must be >= 0, got -1"),
    ],
)
def test_out_of_range_value_is_named_with_its_key_path(cfg: RunConfig, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_run_config(cfg)
    assert str(info.value) == f"config: {line}"


def test_none_means_default_and_passes() -> None:
    check_run_config(_run(max_steps=None, grad_clip=None, lm=PolicyConfig(mode="lora", lr=None)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match=rf"^config: stages\[0\]\.weight_decay: must be a finite number, got {bad}$"):
        check_run_config(_run(weight_decay=bad))
    # Even where the rule would take any value (a NaN passes every comparison test it is given).
    assert value_problems(_run(lr=bad)) == [f"stages[0].lr: must be a finite number, got {bad}"]


def test_a_number_field_holding_no_number_is_named() -> None:
    # Configs built in Python skip the file loader's type checks.
    cfg = _run(batch_size="4", lr=True)  # type: ignore[arg-type]
    assert value_problems(cfg) == ["stages[0].batch_size: must be a number, got '4'",
                                   "stages[0].lr: must be a number, got True"]


def test_nan_in_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[[stages]]\nname = "a"\ndata = "a.json"\nlr = nan\n')
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr: must be a finite number, got nan"):
        load_config(path)


def test_no_stages_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^config: stages: a run needs at least one stage"):
        check_run_config(RunConfig())


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_config_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the config file is empty; a run needs [model] and at least one [[stages]]"


def test_empty_json_config_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="the config file is empty"):
        load_config(path)


def test_config_with_a_model_but_no_stages_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model.bridge]\nname = "mlp"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: stages: a run needs at least one stage ([[stages]] with name and data)"


@pytest.mark.parametrize(
    ("names", "line"),
    [
        (["a", "a"], "stages[1].name: 'a' is already the name of stages[0]"),
        (["a", "../escape"], "stages[1].name: '../escape' is not a safe folder name"),
        (["a/b"], "stages[0].name: 'a/b' is not a safe folder name"),
        ([".."], "stages[0].name: '..' is not a safe folder name"),
        ([""], "stages[0].name: '' is not a safe folder name"),
        (["with space"], "stages[0].name: 'with space' is not a safe folder name"),
    ],
)
def test_stage_names_unique_and_safe_as_folders(names: list[str], line: str) -> None:
    cfg = RunConfig(stages=[StageConfig(name=n, data="d.json") for n in names])
    with pytest.raises(ConfigError) as info:
        check_run_config(cfg)
    assert str(info.value).startswith(f"config: {line}")


def test_good_stage_names_pass() -> None:
    check_run_config(RunConfig(stages=[StageConfig(name=n, data="d.json") for n in ("align", "stage-2", "v1.5_x")]))


def test_replay_settings_that_contradict_each_other() -> None:
    lora = PolicyConfig(mode="lora")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.text_replay: set to 2, but .*needs objective 'lm' and "
                                          r"an LM that trains \(got objective 'lm', lm.mode 'frozen'\)"):
        check_run_config(_run(text_replay=2))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.replay_pool: must hold one step's replay rows "
                                          r"\(text_replay = 4\), got 2"):
        check_run_config(_run(lm=lora, text_replay=4, replay_pool=2))
    check_run_config(_run(lm=lora, text_replay=2, replay_pool=8))


def test_empty_data_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^config: stages\[0\]\.data: must name a data file"):
        check_run_config(RunConfig(stages=[StageConfig(name="a", data=" ")]))


def test_every_problem_in_one_message(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "model": {"bridge": {"name": "mlpp"}},
        "stages": [{"name": "a", "data": "a.json", "lr": 0.0},
                   {"name": "a", "data": "b.json", "batch_size": 0, "lm": {"mode": "lora", "lora_dropout": 1.5}}],
        "eval": {"max_new_tokens": 0},
    }))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 6 problems:"
    assert lines[1].startswith("  RunConfig.model: unknown bridge 'mlpp'; known: ")
    assert lines[2:] == [
        "  stages[1].name: 'a' is already the name of stages[0]",
        "  stages[0].lr: must be > 0, got 0.0",
        "  stages[1].lm.lora_dropout: must be in [0, 1), got 1.5",
        "  stages[1].batch_size: must be >= 1, got 0",
        "  eval.max_new_tokens: must be >= 1, got 0",
    ]


def test_trainer_checks_a_config_built_in_python_before_building_the_model(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from chiasm.model import VisionLanguageModel
    from chiasm.train.trainer import Trainer

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(VisionLanguageModel, "build", never)
    cfg = _run(lr=0.0, batch_size=0)
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, show_progress=False)
    assert str(info.value).splitlines() == ["config: 2 problems:", "  stages[0].batch_size: must be >= 1, got 0",
                                            "  stages[0].lr: must be > 0, got 0.0"]
    assert not (tmp_path / "run").exists()  # nothing written either
