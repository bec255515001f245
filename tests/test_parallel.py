"""Two gloo processes under torchrun: DDP with parameters that get no gradient, FSDP2 against DDP.

Every run goes through one torchrun launch (``tests/dist_worker.py``), which takes a few
seconds per config on a CPU instead of a launch per test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chiasm.config import (
    BridgeConfig,
    EncoderConfig,
    LMConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    StageConfig,
    load_config,
    save_config,
)
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import make_tiny_vision_tower, run_ranks
from chiasm.train.trainer import StagePlan

FROZEN = PolicyConfig(mode="frozen")
LORA = PolicyConfig(mode="lora", lora_r=4, lora_alpha=8)
FULL = PolicyConfig(mode="full")


def _stage(name: str, world: WorldFiles, *, encoder: PolicyConfig = FROZEN, lm: PolicyConfig = FROZEN,
           steps: int = 3, data: Path | None = None, **kw) -> StageConfig:
    data = data or (world.instruct if name == "instruct" else world.align)
    return StageConfig(name=name, data=str(data), encoder=encoder, lm=lm, lr=1e-2, batch_size=2, max_steps=steps,
                       checkpoint_every=0, **kw)


def _write(folder: Path, name: str, model: ModelConfig, stages: list[StageConfig], **run_kw) -> str:
    cfg = RunConfig(model=copy.deepcopy(model), stages=stages, output_dir=str(folder / name), seed=3,
                    precision="fp32", **run_kw)
    save_config(cfg, folder / f"{name}.json")
    return str(folder / f"{name}.json")


@pytest.fixture(scope="module")
def runs(tiny_lm_dir: Path, tiny_world: WorldFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train every config below with 2 gloo ranks; return the folder of run folders and weights."""
    root = tmp_path_factory.mktemp("parallel")
    base = ModelConfig(encoder=EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32}),
                       bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(tiny_lm_dir)))
    tower = copy.deepcopy(base)
    tower.encoder = EncoderConfig(name="hf-vision", source=str(make_tiny_vision_tower(root / "clip")),
                                  feature_layer=-2, image_size=32)
    expert = copy.deepcopy(base)
    expert.bridge = BridgeConfig(name="visual_expert")
    checkpointed = dataclasses.replace(expert, gradient_checkpointing=True)  # recomputed sharded layers
    # A contrastive pre-alignment stage wraps the bridge alone, the next ones the whole model.
    three = [_stage("prealign", tiny_world, steps=2, objective="contrastive", phrase_span=2),
             _stage("align", tiny_world, steps=2), _stage("instruct", tiny_world, lm=FULL, steps=2)]
    # Every other conversation without its image: some micro-batches leave the trainable encoder
    # and the bridge out on one rank and not on the other.
    mixed = _text_only_every_other(tiny_world, root / "mixed.json")
    textmix = [_stage("instruct", tiny_world, encoder=FULL, lm=LORA, data=mixed, steps=4,
                      image_root=str(tiny_world.instruct.parent))]
    # LoRA with self-replay rows (the LM run again outside the model's forward) and accumulation.
    replay = [_stage("instruct", tiny_world, lm=LORA, grad_accum=2, text_replay=2, replay_tokens=12, replay_pool=5)]
    resumable = [dataclasses.replace(s, checkpoint_every=1) for s in three]
    specs = [
        _write(root, "tower_ddp", tower, [_stage("instruct", tiny_world, encoder=FULL)]),
        _write(root, "tower_fsdp", tower, [_stage("instruct", tiny_world, encoder=FULL)], strategy="fsdp"),
        _write(root, "expert_lora_ddp", expert, [_stage("instruct", tiny_world, lm=LORA)]),
        _write(root, "expert_full_fsdp", checkpointed, [_stage("instruct", tiny_world, lm=FULL)], strategy="fsdp"),
        _write(root, "three_ddp", base, three),
        _write(root, "three_fsdp", base, three, strategy="fsdp"),
        _write(root, "three_fsdp_resumed", base, resumable, strategy="fsdp") + "@5",
        _write(root, "textmix_ddp", base, textmix),
        _write(root, "textmix_fsdp", base, textmix, strategy="fsdp"),
        _write(root, "lora_ddp", base, replay),
        _write(root, "lora_fsdp", base, replay, strategy="fsdp"),
    ]
    run_ranks([str(Path(__file__).parent / "dist_worker.py"), str(root), *specs], timeout=600)
    return root


def _text_only_every_other(world: WorldFiles, out: Path) -> Path:
    records = json.loads(world.instruct.read_text())
    for i, rec in enumerate(records):
        image = rec.pop("image")
        if i % 2:
            rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
        else:
            rec["image"] = image  # under the stage's image_root, the world's folder
    out.write_text(json.dumps(records))
    return out


def _weights(root: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(root / f"{name}.rank0.safetensors")), load_file(str(root / f"{name}.rank1.safetensors"))


def _losses(root: Path, name: str, stage: str = "instruct") -> list[float]:
    lines = (root / name / "stages" / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def _assert_ranks_equal(root: Path, name: str) -> dict[str, torch.Tensor]:
    a, b = _weights(root, name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: ranks differ at {k}"
    return a


@pytest.mark.parametrize("name", ["tower_ddp", "tower_fsdp", "expert_lora_ddp", "expert_full_fsdp"])
def test_parameters_without_gradient_train_on_two_ranks(runs: Path, name: str, tiny_lm_dir: Path) -> None:
    """A tower read at layer -2 (its last layer gets no gradient) and visual experts train in step."""
    weights = _assert_ranks_equal(runs, name)
    losses = _losses(runs, name)
    assert len(losses) == 3 and all(x > 0 for x in losses)
    initial = load_file(str(tiny_lm_dir / "model.safetensors"))
    if name.startswith("tower"):
        # The last tower layer reaches no loss and stays as loaded; the layer below it trains.
        tower = load_file(str(runs / "clip" / "model.safetensors"))
        last, below = "encoder.layers.1.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight"
        assert torch.equal(weights["encoder.tower.encoder.layers.1.mlp.fc1.weight"], tower[last])
        assert not torch.equal(weights["encoder.tower.encoder.layers.0.mlp.fc1.weight"], tower[below])
    else:
        # The first layer's experts train; the text path of a LoRA-trained LM keeps its base weights.
        start = initial["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(weights["bridge.experts.0.mlp.up_proj.weight"], start)
        if name == "expert_lora_ddp":
            base = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
            assert torch.equal(weights[base], initial["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("ddp,fsdp", [("three_ddp", "three_fsdp"), ("lora_ddp", "lora_fsdp"),
                                      ("textmix_ddp", "textmix_fsdp")])
def test_fsdp_matches_ddp_step_by_step(runs: Path, ddp: str, fsdp: str) -> None:
    """Same data, same seed: FSDP's loss per step and final weights are DDP's within float tolerance."""
    stages = ["prealign", "align", "instruct"] if ddp == "three_ddp" else ["instruct"]
    for stage in stages:
        torch.testing.assert_close(torch.tensor(_losses(runs, fsdp, stage)), torch.tensor(_losses(runs, ddp, stage)),
                                   rtol=1e-4, atol=1e-6)
    a = _assert_ranks_equal(runs, ddp)
    b = _assert_ranks_equal(runs, fsdp)
    assert a.keys() == b.keys()
    # Adam divides by the gradient's own size, so a near-zero gradient summed in another order can
    # move its weight by a visible fraction of one step (lr 1e-2): 1% of a step is allowed.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_some_rank_meets_a_batch_without_images(runs: Path) -> None:
    """The mixed-data runs above do exercise a rank whose whole batch has no image."""
    cfg = load_config(runs / "textmix_ddp.json")
    stage = cfg.stages[0]
    records = json.loads(Path(stage.data).read_text())
    plan = StagePlan(len(records), stage, world=2, seed=cfg.seed * 1000)
    batches = [plan.indices(step, 0, rank) for step in range(plan.total) for rank in (0, 1)]
    assert any(all("image" not in records[i] for i in b) for b in batches)
    assert any(any("image" in records[i] for i in b) for b in batches)


def test_fsdp_resume_matches_uninterrupted_run(runs: Path) -> None:
    """Killed after step 5 (one step into the last stage) and resumed from the gathered checkpoint."""
    state = json.loads((runs / "three_fsdp_resumed" / "checkpoint" / "state.json").read_text())
    assert (state["stage_index"], state["step"], state["stage_done"]) == (2, 2, True)
    opt = load_file(str(runs / "three_fsdp_resumed" / "checkpoint" / "optimizer.safetensors"))
    ckpt = load_file(str(runs / "three_fsdp_resumed" / "checkpoint" / "model.safetensors"))
    final = _assert_ranks_equal(runs, "three_fsdp_resumed")
    for k, v in ckpt.items():  # whole tensors, as one process writes them
        assert v.shape == final[k].shape, k
    assert any(k.endswith("exp_avg") for k in opt)
    straight = _weights(runs, "three_fsdp")[0]
    for k in straight:
        torch.testing.assert_close(final[k], straight[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert _losses(runs, "three_fsdp_resumed") == pytest.approx(_losses(runs, "three_fsdp"), rel=1e-5)
