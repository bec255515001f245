"""``--resume`` with a changed config: allowed changes apply and are recorded, the rest are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chiasm.config import BridgeConfig, PolicyConfig, RunConfig, StageConfig, save_config, to_dict
from chiasm.report.plots import read_metrics
from chiasm.train import checkpoint as ckpt
from chiasm.train.resume_config import HISTORY, Change, ResumeConfigError, check_resume, diff
from chiasm.train.trainer import Interrupted, Trainer, lr_at

FROZEN = PolicyConfig(mode="frozen")


def _config(model, world, out: Path, **align_kw) -> RunConfig:
    kw = {"encoder": FROZEN, "lm": FROZEN, "lr": 1e-2, "batch_size": 4, "max_steps": 4, "checkpoint_every": 1,
          "warmup_ratio": 0.0, "min_lr_ratio": 0.1, **align_kw}
    return RunConfig(model=dataclasses.replace(model), output_dir=str(out), seed=3, precision="fp32", stages=[
        StageConfig(name="align", data=str(world.align), **kw),
        StageConfig(name="instruct", data=str(world.instruct), encoder=FROZEN,
                    lm=PolicyConfig(mode="lora", lora_r=4, lora_alpha=8), lr=1e-2, batch_size=4, max_steps=2),
    ])


def _saved(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(to_dict(cfg)))


def test_diff_names_every_changed_leaf(tiny_model_config, tiny_world, tmp_path) -> None:
    old = _config(tiny_model_config, tiny_world, tmp_path)
    new = _config(tiny_model_config, tiny_world, tmp_path, lr=5e-3)
    new.model.bridge = BridgeConfig(name="linear")
    new.stages.append(dataclasses.replace(new.stages[1], name="extra"))
    changes = diff(_saved(old), _saved(new))
    assert [str(c) for c in changes[:2]] == ['model.bridge.name: "mlp" -> "linear"', "stages[0].lr: 0.01 -> 0.005"]
    assert changes[2].key == "stages[2]" and str(changes[2]).startswith("stages[2]: (absent) -> {")


@pytest.mark.parametrize("state,edit,refused", [
    # model, seed and the policy of the stage in progress shape the weights so far
    ((0, 2, False), lambda c: setattr(c.model.bridge, "name", "linear"), 'model.bridge.name: "mlp" -> "linear"'),
    ((0, 2, False), lambda c: setattr(c, "seed", 4), "seed: 3 -> 4"),
    ((1, 1, False), lambda c: setattr(c.stages[1].lm, "lora_r", 8), "stages[1].lm.lora_r: 4 -> 8"),
    ((0, 2, False), lambda c: setattr(c.stages[0], "data", "other.json"), "stages[0].data:"),
    # a finished stage cannot change, not even its lr or length
    ((1, 1, False), lambda c: setattr(c.stages[0], "lr", 1e-3), "stages[0].lr: 0.01 -> 0.001 (this stage is finished"),
    ((0, 4, True), lambda c: setattr(c.stages[0], "max_steps", 8), "stages[0].max_steps: 4 -> 8 (this stage is fin"),
    ((0, 3, False), lambda c: setattr(c.stages[0], "max_steps", 2), "(the stage is already at step 3)"),
    ((1, 1, False), lambda c: c.stages.pop(1), "stages[1]: {"),
    # another global batch per step would show each step other samples
    ((0, 2, False), lambda c: setattr(c.stages[0], "batch_size", 8), "global batch (batch_size x grad_accum x "
                                                                     "processes): 4 -> 8"),
])
def test_changes_the_weights_depend_on_are_refused(tiny_model_config, tiny_world, tmp_path, state, edit,
                                                   refused) -> None:
    saved = _saved(_config(tiny_model_config, tiny_world, tmp_path))
    new = _config(tiny_model_config, tiny_world, tmp_path)
    edit(new)
    with pytest.raises(ResumeConfigError) as err:
        check_resume(saved, new, ckpt.TrainState(*state, 1), 1, tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 'run'}: cannot resume with this config")
    assert refused in str(err.value)


@pytest.mark.parametrize("state,edit,key", [
    ((0, 2, False), lambda c: setattr(c.stages[0], "lr", 5e-3), "stages[0].lr"),
    ((0, 2, False), lambda c: setattr(c.stages[0].bridge, "lr", 5e-3), "stages[0].bridge.lr"),
    ((0, 2, False), lambda c: setattr(c.stages[0], "max_steps", 9), "stages[0].max_steps"),
    ((1, 1, False), lambda c: setattr(c.stages[0], "num_workers", 2), "stages[0].num_workers"),
    ((0, 4, True), lambda c: setattr(c.stages[1], "lm", FROZEN), "stages[1].lm.mode"),  # not started yet
    ((0, 2, False), lambda c: setattr(c.eval, "max_samples", 5), "eval.max_samples"),
    ((0, 2, False), lambda c: setattr(c.stages[0], "grad_accum", 2) or setattr(c.stages[0], "batch_size", 2),
     "stages[0].batch_size"),
])
def test_changes_from_the_resumed_step_on_are_allowed(tiny_model_config, tiny_world, tmp_path, state, edit,
                                                      key) -> None:
    saved = _saved(_config(tiny_model_config, tiny_world, tmp_path))
    new = _config(tiny_model_config, tiny_world, tmp_path)
    edit(new)
    changes = check_resume(saved, new, ckpt.TrainState(*state, 1), 1, tmp_path)
    assert key in [c.key for c in changes]


def test_two_ranks_resumed_by_one_with_twice_the_batch_see_the_same_samples(tiny_model_config, tiny_world,
                                                                            tmp_path) -> None:
    saved = _saved(_config(tiny_model_config, tiny_world, tmp_path, batch_size=2))
    new = _config(tiny_model_config, tiny_world, tmp_path)
    assert check_resume(saved, new, ckpt.TrainState(0, 2, False, 2), 1, tmp_path) == [
        Change("stages[0].batch_size", 2, 4)]
    with pytest.raises(ResumeConfigError, match=r"\(2 -> 1 processes\)"):
        check_resume(saved, _config(tiny_model_config, tiny_world, tmp_path, batch_size=2),
                     ckpt.TrainState(0, 2, False, 2), 1, tmp_path)


def test_resume_with_a_new_lr_and_more_steps(tiny_model_config, tiny_world, tmp_path) -> None:
    run = tmp_path / "run"
    first = _config(tiny_model_config, tiny_world, run)
    with pytest.raises(Interrupted):
        Trainer(first, show_progress=False).run(stop_after_steps=2)
    second = _config(tiny_model_config, tiny_world, run, lr=5e-3, max_steps=6)
    second.stages = second.stages[:1]
    trainer = Trainer(second, show_progress=False)
    seen = []
    trainer._checkpoint = lambda optimizer, state: seen.append([g["lr"] for g in optimizer.param_groups])
    trainer.run(resume=True)
    records = read_metrics(run / "stages" / "align" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # Steps 1-2 ran the old schedule; from step 3 the optimizer follows the new lr over 6 steps.
    assert [r["lr"] for r in records[:2]] == pytest.approx([1e-2 * lr_at(s, 4, 0, 0.1) for s in range(2)])
    new = [5e-3 * lr_at(s, 6, 0, 0.1) for s in range(2, 6)]
    assert [r["lr"] for r in records[2:]] == pytest.approx(new)
    assert [lrs[0] for lrs in seen] == pytest.approx(new) and all(len(set(lrs)) == 1 for lrs in seen)
    history = [json.loads(x) for x in (run / HISTORY).read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 2 and history[0]["stage_index"] == 0
    assert [(c["key"], c["old"], c["new"]) for c in history[0]["changes"]] == [
        ("stages[0].max_steps", 4, 6), ("stages[0].lr", 1e-2, 5e-3), ("stages[1]", _saved(first)["stages"][1], None)]
    saved = json.loads((run / "config.json").read_text())
    assert saved["stages"][0]["lr"] == 5e-3 and len(saved["stages"]) == 1


def test_a_refused_resume_trains_nothing_and_keeps_the_run_folder(tiny_model_config, tiny_world, tmp_path) -> None:
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        Trainer(_config(tiny_model_config, tiny_world, run), show_progress=False).run(stop_after_steps=2)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = _config(tiny_model_config, tiny_world, run)
    changed.model.bridge = BridgeConfig(name="linear")
    changed.stages[0].bridge = PolicyConfig(mode="lora")
    with pytest.raises(ResumeConfigError) as err:
        Trainer(changed, show_progress=False).run(resume=True)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{run}: cannot resume with this config; it differs from the run's config.json where the " \
                       "weights so far depend on it:"
    assert lines[1:3] == ['  model.bridge.name: "mlp" -> "linear" (the weights so far depend on it)',
                          '  stages[0].bridge.mode: "full" -> "lora" (the weights so far depend on it)']
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_command_refuses_a_changed_resume_with_exit_2_and_the_diff(tiny_model_config, tiny_world, tmp_path,
                                                                        capsys) -> None:
    from chiasm.cli import main

    run = tmp_path / "run"
    cfg = _config(tiny_model_config, tiny_world, run)
    cfg.stages = cfg.stages[:1]
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=1)
    cfg.seed = 9
    save_config(cfg, tmp_path / "changed.json")
    assert main(["train", "--config", str(tmp_path / "changed.json"), "--resume", "--no-eval"]) == 2
    err = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("chiasm: error: "))
    assert err[first].startswith(f"chiasm: error: {run}: cannot resume with this config")
    assert err[first + 1] == "  seed: 3 -> 9 (the weights so far depend on it)"
