"""Two gloo processes with per-rank batch b train exactly as one process with batch 2b.

Same samples per step (StagePlan splits one global list across ranks), and the loss is the
mean over the global batch's supervised tokens (each rank's mean weighted by its token share),
so the per-step losses and the final weights agree to float tolerance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chiasm.config import ModelConfig, PolicyConfig, RunConfig, StageConfig, save_config
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import run_ranks
from chiasm.train.dist import token_weights
from chiasm.train.trainer import StagePlan, Trainer

FROZEN = PolicyConfig(mode="frozen")


def _config(model: ModelConfig, world: WorldFiles, out: Path, batch: int) -> RunConfig:
    kw = {"encoder": FROZEN, "lr": 1e-2, "batch_size": batch, "max_steps": 3, "checkpoint_every": 0}
    return RunConfig(model=dataclasses.replace(model), output_dir=str(out), seed=5, precision="fp32", stages=[
        StageConfig(name="align", data=str(world.align), lm=FROZEN, **kw),
        StageConfig(name="instruct", data=str(world.instruct), lm=PolicyConfig(mode="lora", lora_r=4, lora_alpha=8),
                    grad_accum=2, **kw),
    ])


def _losses(run: Path, stage: str) -> torch.Tensor:
    lines = (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(x)["loss"] for x in lines])


@pytest.mark.parametrize("accum", [1, 3])
def test_global_batch_of_a_step_does_not_depend_on_the_split(accum: int) -> None:
    """(2 ranks x batch b) and (1 rank x batch 2b): micro-batch k of step s holds the same samples."""
    two = StagePlan(50, StageConfig(name="s", data="x", batch_size=2, grad_accum=accum, epochs=2), world=2, seed=1)
    one = StagePlan(50, StageConfig(name="s", data="x", batch_size=4, grad_accum=accum, epochs=2), world=1, seed=1)
    assert two.total == one.total and two.steps_per_epoch == one.steps_per_epoch
    for step in range(one.total):
        for micro in range(accum):
            assert two.indices(step, micro, 0) + two.indices(step, micro, 1) == one.indices(step, micro, 0)


def test_token_weights_turn_a_mean_of_means_into_the_token_mean() -> None:
    tokens = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])]
    weights = token_weights([3, 1])
    assert weights == [1.5, 0.5] and token_weights([7]) == [1.0] and token_weights([0, 0]) == [1.0, 1.0]
    step_loss = sum(w * t.mean() for w, t in zip(weights, tokens, strict=True)) / len(tokens)
    assert float(step_loss) == pytest.approx(float(torch.cat(tokens).mean()))


def test_accumulation_equals_the_whole_batch_at_once(tiny_model_config, tiny_world, tmp_path) -> None:
    """One process: batch 2 x 2 accumulation steps trains as batch 4 (the mean over all tokens)."""
    runs = {}
    for batch, accum in ((2, 2), (4, 1)):
        cfg = _config(tiny_model_config, tiny_world, tmp_path / f"b{batch}", batch=batch)
        cfg.stages = [dataclasses.replace(cfg.stages[1], grad_accum=accum)]
        runs[batch] = Trainer(cfg, show_progress=False).run()
    torch.testing.assert_close(_losses(tmp_path / "b2", "instruct"), _losses(tmp_path / "b4", "instruct"),
                               rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(runs[2].named_parameters(), runs[4].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_two_gloo_ranks_equal_one_process_with_twice_the_batch(tiny_model_config, tiny_world, tmp_path) -> None:
    ddp = _config(tiny_model_config, tiny_world, tmp_path / "ddp", batch=2)
    save_config(ddp, tmp_path / "ddp.json")
    run_ranks([str(Path(__file__).parent / "dist_worker.py"), str(tmp_path), str(tmp_path / "ddp.json")],
              timeout=400)
    single = Trainer(_config(tiny_model_config, tiny_world, tmp_path / "single", batch=4), show_progress=False).run()
    # The samples of one micro-batch differ in length: a plain mean of the two ranks' means
    # would not be the global token mean, so this comparison sees the token weighting.
    records = json.loads(tiny_world.instruct.read_text())
    assert len({len(r["conversations"][1]["value"]) for r in records}) > 1
    for stage in ("align", "instruct"):
        torch.testing.assert_close(_losses(tmp_path / "ddp", stage), _losses(tmp_path / "single", stage),
                                   rtol=1e-5, atol=1e-6)
    rank0 = load_file(str(tmp_path / "ddp.rank0.safetensors"))
    mine = {n: p.detach() for n, p in single.named_parameters()}
    assert rank0.keys() == mine.keys()
    for k, v in mine.items():
        torch.testing.assert_close(rank0[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    rank1 = load_file(str(tmp_path / "ddp.rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
