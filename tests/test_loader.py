"""The DataLoader path of LM stages: same batches as the up-front collator, exact resume, failed samples."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chiasm.config import ModelConfig, PolicyConfig, RunConfig, StageConfig, save_config
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError
from chiasm.features import FeatureCache
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import run_ranks
from chiasm.train.batches import collate, prepare
from chiasm.train.grouping import estimate_lengths, length_grouped_order, stage_order
from chiasm.train.loader import PlanBatchSampler, StageLoader
from chiasm.train.skips import read_skips
from chiasm.train.trainer import Interrupted, StagePlan, Trainer


def _stage(data: Path, **kw) -> StageConfig:
    frozen = PolicyConfig(mode="frozen")
    # The corrupt copies point at the world's images from another folder; a few skips of 32 are expected.
    base = {"batch_size": 4, "max_steps": 4, "checkpoint_every": 1, "lr": 1e-2, "allow_outside_image_root": True,
            "max_skip_fraction": 0.1}
    return StageConfig(name="instruct", data=str(data), encoder=frozen, lm=PolicyConfig(mode="lora", lora_r=4),
                       **{**base, **kw})


def _ids(batches) -> list[list[str]]:
    return [b.sample_ids for b in batches]


def _corrupt_world(world: WorldFiles, tmp: Path, bad_ids: tuple[str, ...]) -> Path:
    """A copy of the instruct file whose ``bad_ids`` samples point at an undecodable image."""
    broken = tmp / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    records = json.loads(world.instruct.read_text())
    for r in records:
        r["image"] = str(broken) if r["id"] in bad_ids else str(world.root / r["image"])
    out = tmp / "instruct.json"
    out.write_text(json.dumps(records))
    return out


def test_unpacked_batches_equal_the_up_front_collator(tiny_model, tiny_world, tmp_path) -> None:
    samples = load_llava(tiny_world.instruct).samples
    stage = _stage(tiny_world.instruct)
    plan = StagePlan(len(samples), stage, world=1, seed=5)
    cache = FeatureCache.build(tiny_model.encoder, [str(p) for s in samples for p in s.images],
                               cache_dir=tmp_path / "cache", show_progress=False)
    prepared, _ = prepare(samples, tiny_model)
    pad = tiny_model.tokenizer.pad_token_id
    for features in (cache, None):
        got = list(StageLoader(samples, tiny_model, stage, plan, features=features))
        assert len(got) == plan.total
        for step, batch in enumerate(got):
            ref = collate([prepared[i] for i in plan.indices(step, 0, 0)], pad, features=features, model=tiny_model)
            assert batch.sample_ids == [samples[i].id for i in plan.indices(step, 0, 0)]
            assert batch.position_ids is None and batch.image_paths == ref.image_paths
            for name in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(getattr(batch, name), getattr(ref, name)), name
            if features is None:
                assert batch.features is None and torch.equal(batch.pixels, ref.pixels)
            else:
                assert batch.pixels is None and torch.equal(batch.features, ref.features)


def test_ranks_read_disjoint_shares_and_a_resumed_sampler_continues_exactly() -> None:
    stage = StageConfig(name="s", data="x", batch_size=3, grad_accum=2, epochs=2)
    plan = StagePlan(40, stage, world=2, seed=1)
    per_rank = [list(PlanBatchSampler(plan, r)) for r in range(2)]
    assert len(per_rank[0]) == plan.total * 2 == 12
    for k in range(len(per_rank[0])):  # each (step, micro): the two ranks never share a sample
        assert not set(per_rank[0][k]) & set(per_rank[1][k])
    for step in range(plan.steps_per_epoch):  # one epoch: 24 distinct samples over ranks and micro-batches
        seen = [i for r in range(2) for m in range(2) for i in per_rank[r][step * 2 + m]]
        assert len(set(seen)) == 12
    assert list(PlanBatchSampler(plan, 1, start_step=2)) == per_rank[1][4:]


def test_two_workers_give_the_same_batches_and_resume_position(tiny_model, tiny_world) -> None:
    samples = load_llava(tiny_world.instruct).samples
    plan = StagePlan(len(samples), _stage(tiny_world.instruct, max_steps=6), world=1, seed=2)
    inline = list(StageLoader(samples, tiny_model, _stage(tiny_world.instruct, max_steps=6), plan))
    stage2 = _stage(tiny_world.instruct, max_steps=6, num_workers=2)
    workers = list(StageLoader(samples, tiny_model, stage2, plan))
    assert _ids(workers) == _ids(inline) and len(workers) == 6
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixels, b.pixels)
    resumed = list(StageLoader(samples, tiny_model, stage2, plan, start_step=4))
    assert _ids(resumed) == _ids(inline)[4:]


def test_data_error_keeps_file_and_sample_across_processes() -> None:
    err = pickle.loads(pickle.dumps(DataError("cannot decode image x.png", source="d.json", sample_id="s7")))
    assert (err.source, err.sample_id, err.message) == ("d.json", "s7", "cannot decode image x.png")
    assert str(err) == "[file d.json, sample 's7'] cannot decode image x.png"


@pytest.mark.parametrize("cached", [False, True])
def test_corrupt_image_in_a_worker_names_file_and_sample(tiny_model, tiny_world, tmp_path, cached) -> None:
    data = _corrupt_world(tiny_world, tmp_path, ("instruct-00003",))
    samples = load_llava(data, allow_outside_root=True).samples
    stage = _stage(data, num_workers=2, max_steps=8)
    plan = StagePlan(len(samples), stage, world=1, seed=0)
    cache = None
    if cached:
        owners = {str(p): (s.source, s.id) for s in samples for p in s.images}
        with pytest.raises(DataError, match=r"file .*instruct\.json, sample 'instruct-00003'.*broken\.png") as info:
            FeatureCache.build(tiny_model.encoder, list(owners), cache_dir=tmp_path / "c", show_progress=False,
                               owners=owners)
        assert info.value.sample_id == "instruct-00003"
        cache = FeatureCache.build(tiny_model.encoder, list(owners), cache_dir=tmp_path / "c", show_progress=False,
                                   on_error="skip", owners=owners)
    with pytest.raises(DataError, match=r"file .*instruct\.json, sample 'instruct-00003'.*broken\.png") as info:
        list(StageLoader(samples, tiny_model, stage, plan, features=cache))
    assert info.value.sample_id == "instruct-00003" and info.value.source == str(data)
    skip = _stage(data, num_workers=2, max_steps=8, on_error="skip")
    loader = StageLoader(samples, tiny_model, skip, plan, features=cache)
    batches = list(loader)
    assert [e["sample"] for e in loader.skipped] == ["instruct-00003"]
    assert "broken.png" in loader.skipped[0]["error"]
    assert sum(len(b.sample_ids) for b in batches) == 8 * 4 - 1  # the batch went on without it
    bad_step = loader.skipped[0]["step"]
    assert len(batches[bad_step].sample_ids) == 3 and batches[bad_step].input_ids.shape[0] == 3


def _run(model_cfg: ModelConfig, stage: StageConfig, out: Path) -> RunConfig:
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=3, precision="fp32")


def test_skipped_samples_are_counted_logged_and_written(tiny_model_config, tiny_world, tmp_path) -> None:
    data = _corrupt_world(tiny_world, tmp_path, ("instruct-00003", "instruct-00011"))
    # Without the feature cache the images are decoded in the loader (a cache build would drop them up front).
    stage = _stage(data, on_error="skip", max_steps=8, num_workers=2, feature_cache=False)
    trainer = Trainer(_run(tiny_model_config, stage, tmp_path / "run"), show_progress=False)
    trainer.run()
    assert sorted(e["sample"] for e in trainer.skipped["instruct"]) == ["instruct-00003", "instruct-00011"]
    written = read_skips(tmp_path / "run/stages/instruct/skipped.jsonl")  # the stage's one skip file
    assert [(r["id"], r["step"], r["reason"]) for r in written] == [
        (e["sample"], e["step"], e["error"]) for e in trainer.skipped["instruct"]]
    assert not (tmp_path / "run/stages/instruct/skipped.json").exists()
    recs = [json.loads(x) for x in (tmp_path / "run/stages/instruct/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs][-1] == 2 and recs[0]["skipped"] <= recs[-1]["skipped"]


def test_resumed_run_with_workers_grouping_and_packing_matches_uninterrupted(tiny_model_config, tiny_world,
                                                                           tmp_path) -> None:
    stage = _stage(tiny_world.instruct, max_steps=5, num_workers=2, group_by_length=2, pack_length=256)
    straight = Trainer(_run(tiny_model_config, stage, tmp_path / "a"), show_progress=False).run()
    cfg = _run(tiny_model_config, stage, tmp_path / "b")
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=3)
    resumed = Trainer(cfg, show_progress=False).run(resume=True)
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = dict(resumed.named_parameters())
    assert any("lora_" in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "stages/instruct/metrics.jsonl").read_text().splitlines()]
              for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_length_grouping_sorts_within_mega_batches_and_stays_a_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (64,), generator=g).tolist()
    order = length_grouped_order(lengths, micro_batch=4, mega_batch=16, seed=9)
    perm = torch.randperm(64, generator=g).tolist()
    out = order(perm, 0)
    assert sorted(out) == list(range(64)) and out == order(list(perm), 0)  # deterministic
    assert out != order(perm, 1)  # another epoch, another shuffle of the micro-batches
    for m in range(4):
        mega = perm[m * 16 : (m + 1) * 16]
        got = out[m * 16 : (m + 1) * 16]
        assert sorted(got) == sorted(mega)  # samples never leave their mega-batch
        ranked = sorted(mega, key=lambda i: (-lengths[i], i))
        chunks = {tuple(sorted(ranked[k : k + 4])) for k in range(0, 16, 4)}
        assert {tuple(sorted(got[k : k + 4])) for k in range(0, 16, 4)} == chunks
    with pytest.raises(ValueError, match="not a multiple of the micro-batch 4"):
        length_grouped_order(lengths, micro_batch=4, mega_batch=10, seed=0)


def test_estimated_lengths_follow_the_tokenised_lengths(tiny_model, tiny_world) -> None:
    samples = load_llava(tiny_world.instruct).samples
    est = estimate_lengths(samples, tiny_model.tokenizer, tiny_model.tokens_per_image)
    prepared, _ = prepare(samples, tiny_model)
    real = [len(p.encoded.input_ids) for p in prepared]
    # The chat template adds the same few tokens per turn: the estimate is off by a constant.
    overhead = {r - e for r, e in zip(real, est, strict=True)}
    assert len(overhead) == 1 and overhead.pop() > 0



def test_a_resumed_run_keeps_the_skips_recorded_before_its_checkpoint(tiny_model_config, tiny_world,
                                                                     tmp_path) -> None:
    stage = _stage(tiny_world.instruct, on_error="skip", max_steps=6, feature_cache=False)
    plan = StagePlan(32, stage, world=1, seed=3 * 1000)  # the trainer's seed for stage 0 of seed 3
    ids = [r["id"] for r in json.loads(tiny_world.instruct.read_text())]
    bad = (ids[plan.indices(0, 0, 0)[1]], ids[plan.indices(4, 0, 0)[2]])  # one before the stop, one after
    data = _corrupt_world(tiny_world, tmp_path, bad)
    stage.data = str(data)
    straight = Trainer(_run(tiny_model_config, stage, tmp_path / "a"), show_progress=False)
    straight.run()
    assert [(e["step"], e["sample"]) for e in straight.skipped["instruct"]] == [(0, bad[0]), (4, bad[1])]
    cfg = _run(tiny_model_config, stage, tmp_path / "b")
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=3)
    resumed = Trainer(cfg, show_progress=False)
    resumed.run(resume=True)
    assert resumed.skipped["instruct"] == straight.skipped["instruct"]
    skip_file = "stages/instruct/skipped.jsonl"
    assert read_skips(tmp_path / "b" / skip_file) == read_skips(tmp_path / "a" / skip_file)
    last = json.loads((tmp_path / "b/stages/instruct/metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"] == 2


def test_ddp_ranks_skip_pack_and_share_the_cache_like_one_process(tiny_model_config, tiny_world, tmp_path) -> None:
    """torchrun with 2 gloo ranks x batch 4 == one process with batch 4 x 2 accumulation steps, with two
    workers per rank, packed rows, a sharded feature cache and two corrupt samples skipped."""
    data = _corrupt_world(tiny_world, tmp_path, ("instruct-00003", "instruct-00020"))
    kw = {"on_error": "skip", "max_steps": 4, "checkpoint_every": 0, "num_workers": 2, "pack_length": 300}
    ddp_cfg = _run(tiny_model_config, _stage(data, **kw), tmp_path / "ddp")
    save_config(ddp_cfg, tmp_path / "ddp.json")
    run_ranks(["-m", "chiasm.cli", "train", "--config", str(tmp_path / "ddp.json"), "--no-eval"], timeout=280)
    single = Trainer(_run(tiny_model_config, _stage(data, grad_accum=2, **kw), tmp_path / "single"),
                     show_progress=False)
    model = single.run()
    ddp_bridge = load_file(str(tmp_path / "ddp" / "model" / "bridge.safetensors"))
    for k, v in model.bridge.state_dict().items():
        torch.testing.assert_close(ddp_bridge[k], v, rtol=1e-4, atol=1e-5)
    # The cache build found both corrupt samples (whichever rank's shard held them) before training.
    for run in ("ddp", "single"):
        lines = (tmp_path / run / "stages/instruct/skipped.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["id"] for x in lines) == ["instruct-00003", "instruct-00020"], run
    shards = sorted(p.name for p in (tmp_path / "ddp" / "cache").glob("features-*/shard-*.npy"))
    assert shards == ["shard-00000-of-00002.npy", "shard-00001-of-00002.npy"]
    last = [json.loads(x) for x in (tmp_path / "ddp/stages/instruct/metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["skipped"] == 0  # none left for the loader to meet


def test_negative_data_path_options_are_named(tiny_model, tiny_world) -> None:
    samples = load_llava(tiny_world.instruct).samples
    plan = StagePlan(len(samples), _stage(tiny_world.instruct), world=1, seed=0)
    with pytest.raises(ValueError, match=r"pack_length \(0\) and num_workers \(-1\) must be 0 or more"):
        StageLoader(samples, tiny_model, _stage(tiny_world.instruct, num_workers=-1), plan)
    with pytest.raises(ValueError, match="group_by_length is a number of optimizer steps \\(0: off\\), not -2"):
        stage_order(_stage(tiny_world.instruct, group_by_length=-2), samples, tiny_model, 1, 0)


def test_length_grouping_cuts_the_padding_of_a_real_stage(tiny_model, tiny_world) -> None:
    samples = load_llava(tiny_world.instruct).samples
    real = [len(p.encoded.input_ids) for p in prepare(samples, tiny_model)[0]]
    stage = _stage(tiny_world.instruct, max_steps=None, epochs=1.0, group_by_length=4)

    def padding(plan: StagePlan) -> int:
        batches = [[real[i] for i in plan.indices(s, 0, 0)] for s in range(plan.total)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    plain = StagePlan(32, stage, world=1, seed=4)
    grouped = StagePlan(32, stage, world=1, seed=4, order=stage_order(stage, samples, tiny_model, 1, 4))
    assert sorted(i for s in range(8) for i in grouped.indices(s, 0, 0)) == list(range(32))
    assert padding(grouped) < padding(plain) / 2


def test_estimated_lengths_count_the_tiles_of_each_image(tiny_model_config, tmp_path) -> None:
    """Tiled images of different shapes: the estimate still follows the real lengths up to a constant."""
    from dataclasses import replace

    from PIL import Image

    from chiasm.config import TilingConfig
    from chiasm.data.sample import Sample, Turn
    from chiasm.model import VisionLanguageModel

    model = VisionLanguageModel.build(replace(tiny_model_config, tiling=TilingConfig(max_tiles=4)))
    samples = []
    for k, size in enumerate([(64, 64), (256, 128), (128, 128), (40, 120)]):
        Image.new("RGB", size, (k * 40, 90, 90)).save(tmp_path / f"{k}.png")
        samples.append(Sample(f"s{k}", [Turn("human", "<image>\nWhat is it?"), Turn("gpt", "a box")],
                              [tmp_path / f"{k}.png"]))
    conv = model.processor.conversation
    est = estimate_lengths(samples, model.tokenizer, model.tokens_per_image, lambda s: sum(conv.image_lengths(s)))
    real = [len(p.encoded.input_ids) for p in model.processor.prepare(samples)[0]]
    assert len({r - e for r, e in zip(real, est, strict=True)}) == 1
    assert len(set(real)) == 4  # 1, 3, 5 and 3 views plus separators: the lengths differ
