"""A save cut at any point of its sequence leaves a checkpoint resume finds; bad disks are named."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chiasm.config import PolicyConfig, RunConfig, StageConfig
from chiasm.report.plots import read_metrics
from chiasm.train import checkpoint as ckpt
from chiasm.train.trainer import Interrupted, Trainer, _trim_metrics


class Killed(BaseException):
    """Stands for a kill: nothing in the save sequence catches it."""


def _state(value: float, step: int) -> tuple[dict[str, torch.Tensor], dict, ckpt.TrainState]:
    w = torch.nn.Parameter(torch.full((3, 2), value))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    return {"w": torch.full((3, 2), value)}, opt.state_dict(), ckpt.TrainState(0, step, False, 1)


def _save(folder: Path, value: float, step: int) -> None:
    params, opt, state = _state(value, step)
    ckpt.save_checkpoint(folder, params, {"w"}, opt, state)


def _kill_at(k: int):
    """A ``_step`` that lets ``k`` steps of the save sequence through and kills at the next one."""
    calls = iter(range(1000))

    def step(_name: str) -> None:
        if next(calls) == k:
            raise Killed
    return step


def _count_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    monkeypatch.setattr(ckpt, "_step", names.append)
    _save(tmp_path / "probe" / "checkpoint", 1.0, 1)
    _save(tmp_path / "probe" / "checkpoint", 2.0, 2)
    monkeypatch.undo()
    return names[len(names) // 2:]  # the second save: one with a previous checkpoint to replace


def test_a_kill_after_any_step_of_a_save_keeps_the_old_or_the_new_checkpoint(tmp_path, monkeypatch) -> None:
    steps = _count_steps(tmp_path, monkeypatch)
    assert {"write state.json.part", "rename folder -> old", "rename tmp -> folder"} <= set(steps)
    outcomes = []
    for k, name in enumerate(steps):
        folder = tmp_path / f"kill{k}" / "checkpoint"
        _save(folder, 1.0, 1)
        monkeypatch.setattr(ckpt, "_step", _kill_at(k))
        with pytest.raises(Killed):
            _save(folder, 2.0, 2)
        monkeypatch.undo()
        assert ckpt.recover(folder) == folder, name
        state = ckpt.read_state(folder)
        weights = load_file(str(folder / "model.safetensors"))["w"]
        assert state.step in (1, 2), name
        assert torch.equal(weights, torch.full((3, 2), float(state.step))), name  # files of one and the same save
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
        ckpt.load_optimizer_and_rng(folder, opt)
        outcomes.append(state.step)
        _save(folder, 3.0, 3)  # and the next save works over whatever the kill left
        assert ckpt.read_state(folder).step == 3 and sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]
    # Killed before the new state was whole: the old one; once it was whole: the new one.
    assert outcomes[0] == 1 and outcomes[-1] == 2


def test_a_kill_during_the_first_save_leaves_no_checkpoint_or_the_new_one(tmp_path, monkeypatch) -> None:
    names: list[str] = []
    monkeypatch.setattr(ckpt, "_step", names.append)
    _save(tmp_path / "probe" / "checkpoint", 2.0, 2)
    monkeypatch.undo()
    whole = names.index("rename state.json")  # from here on the new state is complete
    for k in range(len(names)):
        folder = tmp_path / f"first{k}" / "checkpoint"
        monkeypatch.setattr(ckpt, "_step", _kill_at(k))
        with pytest.raises(Killed):
            _save(folder, 2.0, 2)
        monkeypatch.undo()
        found = ckpt.recover(folder)
        if k < whole:
            assert found is None, names[k]
        else:
            assert found == folder and ckpt.read_state(folder).step == 2, names[k]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_is_one_error_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                code: int) -> None:
    folder = tmp_path / "run" / "checkpoint"
    _save(folder, 1.0, 1)
    real, calls = ckpt.save_file, []

    def save_file(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) == 2:  # the optimizer file, after the model file was written
            raise OSError(code, os.strerror(code), path)
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        _save(folder, 2.0, 2)
    message = str(err.value)
    assert "\n" not in message and os.strerror(code) in message
    assert str(folder.with_name("checkpoint.tmp") / "optimizer.safetensors") in message
    assert f"the last good checkpoint in {folder} is kept" in message
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]
    assert ckpt.read_state(folder).step == 1
    assert torch.equal(load_file(str(folder / "model.safetensors"))["w"], torch.full((3, 2), 1.0))


def test_a_real_write_error_from_safetensors_is_one_error_naming_the_file(tmp_path) -> None:
    """A file size limit makes the OS refuse the write as a full disk does (safetensors reports it as text)."""
    script = f"""
import resource, signal, sys
import torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_crash_safe import _save
from pathlib import Path
from chiasm.train import checkpoint as ckpt
folder = Path({str(tmp_path)!r}) / "checkpoint"
_save(folder, 1.0, 1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    _save(folder, 2.0, 2)
except ckpt.CheckpointWriteError as exc:
    print(exc)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = tmp_path / "checkpoint.tmp" / "model.safetensors"
    assert proc.stdout.strip() == (f"cannot write the checkpoint at {model}: File too large; the last good "
                                   f"checkpoint in {tmp_path / 'checkpoint'} is kept")
    assert ckpt.read_state(tmp_path / "checkpoint").step == 1 and not model.parent.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_one_error_naming_it(tmp_path) -> None:
    folder = tmp_path / "run" / "checkpoint"
    _save(folder, 1.0, 1)
    folder.parent.chmod(0o500)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="Permission denied") as err:
            _save(folder, 2.0, 2)
    finally:
        folder.parent.chmod(0o700)
    assert str(folder.with_name("checkpoint.tmp")) in str(err.value)
    assert ckpt.read_state(folder).step == 1


def test_a_cut_off_metrics_line_is_dropped_with_a_warning(tmp_path, caplog) -> None:
    path = tmp_path / "stages" / "align" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps({"stage": "align", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"stage": "align", "st')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
        _trim_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all(str(path) in w and "not whole JSON" in w for w in warned)


def test_training_resumes_after_a_kill_between_the_renames(tiny_model_config, tiny_world, tmp_path,
                                                           monkeypatch) -> None:
    """Killed after the old checkpoint was moved aside and before the new one took its place."""
    def config(out: Path) -> RunConfig:
        return RunConfig(model=tiny_model_config, output_dir=str(out), seed=3, precision="fp32", stages=[
            StageConfig(name="align", data=str(tiny_world.align), encoder=PolicyConfig(mode="frozen"), lr=1e-2,
                        batch_size=4, max_steps=4, checkpoint_every=1)])

    straight = Trainer(config(tmp_path / "a"), show_progress=False).run()
    renames = iter(range(100))

    def step(name: str) -> None:
        if name == "rename folder -> old" and next(renames) == 1:  # in the third save: step 3
            raise Killed

    monkeypatch.setattr(ckpt, "_step", step)
    with pytest.raises(Killed):
        Trainer(config(tmp_path / "b"), show_progress=False).run()
    monkeypatch.undo()
    assert not (tmp_path / "b" / "checkpoint").exists()
    resumed = Trainer(config(tmp_path / "b"), show_progress=False).run(resume=True)
    for (k, a), b in zip(straight.bridge.named_parameters(), resumed.bridge.parameters(), strict=True):
        assert torch.equal(a, b), k
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "stages" / "align" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("stop,expected", [(1, (0, 1, False)), (3, (0, 2, True))])
def test_resume_in_or_after_a_stage_draws_the_next_stages_lora_as_the_uninterrupted_run(
        tiny_model_config, tiny_world, tmp_path, stop: int, expected: tuple) -> None:
    """Killed in stage 1 or after its last checkpoint: stage 2's LoRA starts from the same RNG state.

    Nothing between the restored RNG and stage 2 may draw from it differently than in one go
    (the data loader's iterator, made at the first batch, has its own generator).
    """
    def config(out: Path) -> RunConfig:
        kw = {"encoder": PolicyConfig(mode="frozen"), "lr": 1e-2, "batch_size": 4, "max_steps": 2}
        return RunConfig(model=tiny_model_config, output_dir=str(out), seed=3, precision="fp32", stages=[
            StageConfig(name="align", data=str(tiny_world.align), checkpoint_every=1, **kw),
            StageConfig(name="instruct", data=str(tiny_world.instruct), checkpoint_every=0,
                        lm=PolicyConfig(mode="lora", lora_r=4, lora_alpha=8), **kw)])

    straight = Trainer(config(tmp_path / "a"), show_progress=False).run()
    with pytest.raises(Interrupted):
        Trainer(config(tmp_path / "b"), show_progress=False).run(stop_after_steps=stop)
    state = ckpt.read_state(tmp_path / "b" / "checkpoint")
    assert (state.stage_index, state.step, state.stage_done) == expected
    resumed = Trainer(config(tmp_path / "b"), show_progress=False).run(resume=True)
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
