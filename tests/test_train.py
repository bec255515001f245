"""The training engine: stages, policies, feature caching, resume and DDP."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chiasm.config import EvalConfig, ModelConfig, PolicyConfig, RunConfig, StageConfig, save_config
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import run_ranks
from chiasm.train.trainer import Interrupted, StagePlan, Trainer, cpu_has_native_bf16, lr_at, use_bf16


def _run_config(model_cfg: ModelConfig, world: WorldFiles, out: Path, prealign: bool = False, replay: int = 0,
                **stage_kw) -> RunConfig:
    frozen = PolicyConfig(mode="frozen")
    kw = {"batch_size": 4, "max_steps": 4, "checkpoint_every": 1, **stage_kw}
    first = [StageConfig(name="prealign", data=str(world.align), encoder=frozen, lm=frozen, lr=1e-2,
                         objective="contrastive", phrase_span=2, **kw)] if prealign else []
    return RunConfig(
        model=model_cfg,
        stages=[
            *first,
            StageConfig(name="align", data=str(world.align), encoder=frozen, lm=frozen, lr=1e-2, **kw),
            StageConfig(name="instruct", data=str(world.instruct), encoder=frozen,
                        lm=PolicyConfig(mode="lora", lora_r=4, lora_alpha=8), lr=1e-2, text_replay=replay,
                        replay_tokens=12, replay_pool=5, **kw),
        ],
        eval=EvalConfig(), output_dir=str(out), seed=3, precision="fp32")


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or n.startswith("bridge.")}


def test_lr_schedule_warmup_then_cosine() -> None:
    factors = [lr_at(s, 10, 2, 0.1) for s in range(10)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16(info)  # AVX-512 without the BF16 extension: bf16 would be emulated
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("fp32", torch.device("cpu"))


def test_stage_plan_covers_each_sample_once_per_epoch() -> None:
    stage = StageConfig(name="s", data="x", batch_size=3, grad_accum=2, epochs=1)
    plan = StagePlan(25, stage, world=2, seed=0)
    assert plan.steps_per_epoch == 2 and plan.total == 2
    seen = [i for step in range(2) for m in range(2) for r in range(2) for i in plan.indices(step, m, r)]
    assert len(seen) == len(set(seen)) == 24


def test_two_stages_train_and_log(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "run")
    trainer = Trainer(cfg, show_progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    model = trainer.run()
    # Stage counts: align trains only the bridge; instruct adds LoRA and keeps the LM base frozen.
    align, instruct = trainer.stage_counts["align"], trainer.stage_counts["instruct"]
    assert align["lm"]["trainable"] == 0 and align["encoder"]["trainable"] == 0 and align["bridge"]["frozen"] == 0
    assert instruct["lm"]["trainable"] > 0 and instruct["lm"]["frozen"] == align["lm"]["frozen"]
    # PEFT wraps the LM: map its names back (lm.base_model.model.X, *.base_layer.*) to compare.
    after = {n.replace("lm.base_model.model.", "lm.", 1).replace(".base_layer", ""): p
             for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    for name, old in before.items():
        changed = not torch.equal(after[name].detach(), old)
        assert changed == name.startswith("bridge."), name
    for stage in ("align", "instruct"):
        lines = (tmp_path / "run" / "stages" / stage / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["images_per_s"] > 0 for r in recs)
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "loss.png").exists()


def test_frozen_encoder_features_computed_once(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "run", max_steps=None, epochs=2.0)
    cfg.stages = cfg.stages[:1]
    trainer = Trainer(cfg, show_progress=False)
    calls = []
    forward = trainer.model.encoder.forward
    trainer.model.encoder.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    trainer.run()
    assert sum(calls) == 32  # 32 unique training images, two epochs, encoded once


def test_resume_after_kill_matches_uninterrupted_run(tiny_model_config, tiny_world, tmp_path) -> None:
    """Self-replay rows are redrawn at the resumed stage's start: they must come out the same."""
    straight = Trainer(_run_config(tiny_model_config, tiny_world, tmp_path / "a", replay=2),
                       show_progress=False).run()
    cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "b", replay=2)
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=6)  # killed in stage 2, after its step 2
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert (state["stage_index"], state["step"]) == (1, 2)
    resumed = Trainer(cfg, show_progress=False).run(resume=True)
    a, b = _trained(straight), _trained(resumed)
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/stages/instruct/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_has_no_pickles(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "run", max_steps=2)
    Trainer(cfg, show_progress=False).run()
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert files == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json"]
    opt = load_file(str(tmp_path / "run" / "checkpoint" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg") for k in opt)


def test_ddp_two_processes_match_gradient_accumulation(tiny_model_config, tiny_world, tmp_path) -> None:
    """torchrun with 2 gloo ranks x batch 4 == one process with batch 4 x 2 accumulation steps.

    The run starts with a contrastive stage, whose DDP wrapper holds only the bridge, and its
    instruct stage adds self-replay text, the same rows on every rank.
    """
    ddp_cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "ddp", prealign=True, replay=2, max_steps=3,
                          checkpoint_every=0)
    save_config(ddp_cfg, tmp_path / "ddp.json")
    run_ranks(["-m", "chiasm.cli", "train", "--config", str(tmp_path / "ddp.json"), "--no-eval"], timeout=280)
    single_cfg = _run_config(tiny_model_config, tiny_world, tmp_path / "single", prealign=True, replay=2,
                             max_steps=3, checkpoint_every=0, grad_accum=2)
    single = Trainer(single_cfg, show_progress=False).run()
    ddp_bridge = load_file(str(tmp_path / "ddp" / "model" / "bridge.safetensors"))
    for k, v in single.bridge.state_dict().items():
        torch.testing.assert_close(ddp_bridge[k], v, rtol=1e-4, atol=1e-5)
    # Only rank 0 writes: one metrics line per optimizer step, not one per rank.
    for stage in ("prealign", "align"):
        lines = (tmp_path / "ddp" / "stages" / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
