"""The frozen-encoder feature cache: exact round trip, per-rank shards, bounded reads, never stale."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from chiasm import features as features_module
from chiasm.config import PolicyConfig, RunConfig, StageConfig
from chiasm.data.images import load_image
from chiasm.features import FeatureCache, MemmapFeatureCache, _fingerprint
from chiasm.train.trainer import Trainer


def _paths(world) -> list[str]:
    return sorted(str(p) for p in (world.image_dir / "train").glob("*.png"))


def _encoded(encoder, paths: list[str]) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad():
        return encoder(torch.stack([encoder.preprocessing(load_image(Path(p))) for p in paths]))


def _close(cached: torch.Tensor, encoded: torch.Tensor) -> None:
    """Equal up to the fp16 rounding of the stored rows (half an fp16 step: 2^-11 relative)."""
    torch.testing.assert_close(cached, encoded, rtol=2**-11, atol=1e-4)


def _count_calls(encoder) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    forward = encoder.forward
    encoder.forward = lambda x: calls.append((threading.current_thread().name, x.shape[0])) or forward(x)
    return calls


def test_round_trip_equals_the_encoder_output(tiny_model, tiny_world, tmp_path) -> None:
    paths = _paths(tiny_world)
    cache = FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False, batch_size=5)
    assert isinstance(cache, MemmapFeatureCache)
    ask = [paths[7], paths[0], paths[7], paths[30]]
    _close(cache.lookup(ask), _encoded(tiny_model.encoder, ask))
    in_memory = FeatureCache.build(tiny_model.encoder, paths, cache_dir=None, show_progress=False)
    assert torch.equal(in_memory.lookup(ask), cache.lookup(ask))
    assert cache.lookup([]).shape == (0, 16, 32)
    with pytest.raises(KeyError, match="is not in the feature cache"):
        cache.lookup([str(tmp_path / "other.png")])
    # A worker gets the cache by pickling: the file names travel, never the mapped rows.
    cache.lookup(paths)
    assert len(pickle.dumps(cache)) < 20_000 and torch.equal(pickle.loads(pickle.dumps(cache)).lookup(ask),
                                                             cache.lookup(ask))


def test_each_rank_encodes_only_its_own_shard(tiny_model, tiny_world, tmp_path) -> None:
    paths = _paths(tiny_world)
    calls = _count_calls(tiny_model.encoder)
    barrier = threading.Barrier(2)
    built: dict[int, FeatureCache] = {}

    def rank(r: int) -> None:
        built[r] = FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False, rank=r,
                                      world=2, sync=barrier.wait, batch_size=4)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_rank = {name: sum(n for who, n in calls if who == name) for name in ("rank0", "rank1")}
    assert per_rank == {"rank0": 16, "rank1": 16}
    folder = next(tmp_path.glob("features-*"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.json", "shard-00000-of-00002.json", "shard-00000-of-00002.npy", "shard-00001-of-00002.json",
        "shard-00001-of-00002.npy"]
    assert np.load(folder / "shard-00001-of-00002.npy", mmap_mode="r").shape == (16, 16, 32)
    expected = _encoded(tiny_model.encoder, paths)
    for r in range(2):
        _close(built[r].lookup(paths), expected)
    # A later single-process run reuses the two shards without encoding anything.
    calls.clear()
    again = FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    assert calls == [] and torch.equal(again.lookup(paths), built[0].lookup(paths))


def test_a_rank_that_cannot_see_the_other_shards_encodes_them_itself(tiny_model, tiny_world, tmp_path,
                                                                    caplog) -> None:
    paths = _paths(tiny_world)
    calls = _count_calls(tiny_model.encoder)
    with caplog.at_level(logging.WARNING, logger="chiasm.features"):
        cache = FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False, rank=1,
                                   world=2)
    assert sum(n for _, n in calls) == 32 and "shard 0 of 2 not found" in caplog.text
    _close(cache.lookup(paths), _encoded(tiny_model.encoder, paths))


def _mapped_rss_kb(file: Path) -> int:
    """Resident kB of this process's mappings of ``file`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.endswith(str(file))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_a_lookup_touches_only_the_rows_asked_and_keeps_none_mapped(tmp_path, monkeypatch) -> None:
    n, rows = 300, (49, 256)  # 300 rows of 49 x 256 fp16 = 25 kB each, 7.5 MB in all
    folder = tmp_path / "features-0"
    folder.mkdir()
    file = folder / "shard.npy"
    data = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=(n, *rows))
    data[:] = np.arange(n, dtype=np.float16)[:, None, None]
    data.flush()
    del data
    paths = [f"img{i}.png" for i in range(n)]
    # Sensitivity of the measure: a plain memory map read in full keeps the whole file resident.
    plain = np.load(file, mmap_mode="r")
    assert float(plain.astype(np.float32).sum()) > 0 and _mapped_rss_kb(file) > n * 24
    del plain
    # Which pages a lookup reads: with the release switched off, only the asked rows' neighbourhood.
    monkeypatch.setattr(features_module, "_release", lambda *a: None)
    cache = MemmapFeatureCache(folder, paths, [0], [file])
    got = cache.lookup(["img5.png", "img250.png", "img17.png"])
    assert got[:, 0, 0].tolist() == [5.0, 250.0, 17.0] and got.shape == (3, *rows)
    assert 0 < _mapped_rss_kb(file) <= 3 * (25 + 2 * 64)  # three rows plus at most one fault-around window each
    monkeypatch.undo()
    # With it (the default), nothing stays mapped after a lookup, even after reading every row.
    cache = MemmapFeatureCache(folder, paths, [0], [file])
    assert cache.lookup(paths)[:, 0, 0].tolist() == [float(np.float16(i)) for i in range(n)]
    assert _mapped_rss_kb(file) < 2 * 64


def test_a_stale_cache_is_never_reused(tiny_model, tiny_world, tmp_path) -> None:
    paths = _paths(tiny_world)[:6]
    calls = _count_calls(tiny_model.encoder)
    FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    assert sum(n for _, n in calls) == 6  # the second build reused the first
    with torch.no_grad():
        list(tiny_model.encoder.parameters())[-1].add_(0.5)  # new weights, if only the last ones: new fingerprint
    cache = FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    assert sum(n for _, n in calls) == 12 and len(list(tmp_path.glob("features-*"))) == 2
    _close(cache.lookup(paths), _encoded(tiny_model.encoder, paths))
    calls.clear()
    # An image rewritten in place (new mtime) is a new image list: encoded again.
    image = Path(paths[2])
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
        assert sum(n for _, n in calls) == 6
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    # A shard whose completion mark is missing (a killed writer) is rebuilt, not read.
    folder = tmp_path / f"features-{_fingerprint(tiny_model.encoder, sorted(paths), tiny_model.encoder.preprocessing)}"
    for name in ("index.json", "shard-00000-of-00001.json"):
        (folder / name).unlink()
    FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    assert sum(n for _, n in calls) == 12
    index = json.loads((folder / "index.json").read_text())
    assert index["paths"] == sorted(paths) and index["world"] == 1 and index["dtype"] == "float16"


def _align_run(model_cfg, world, out: Path, cache: bool) -> RunConfig:
    frozen = PolicyConfig(mode="frozen")
    stage = StageConfig(name="align", data=str(world.align), encoder=frozen, lm=frozen, lr=1e-2, batch_size=4,
                        max_steps=3, feature_cache=cache)
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=3, precision="fp32")


def test_cache_off_gives_the_same_loss_and_runs_the_encoder_every_step(tiny_model_config, tiny_world,
                                                                        tmp_path) -> None:
    losses, encoded = {}, {}
    for cache in (True, False):
        trainer = Trainer(_align_run(tiny_model_config, tiny_world, tmp_path / str(cache), cache),
                          show_progress=False)
        calls = _count_calls(trainer.model.encoder)
        trainer.run()
        encoded[cache] = sum(n for _, n in calls)
        recs = (tmp_path / str(cache) / "stages/align/metrics.jsonl").read_text().splitlines()
        losses[cache] = [json.loads(x)["loss"] for x in recs]
    assert encoded == {True: 32, False: 3 * 4}  # every image once, or each step's four images
    assert not (tmp_path / "False" / "cache").exists()
    # The cache keeps fp16 features, so the two runs differ by fp16 rounding only.
    np.testing.assert_allclose(losses[False], losses[True], rtol=2e-3)


def test_pre_alignment_refuses_to_run_without_the_cache(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _align_run(tiny_model_config, tiny_world, tmp_path / "run", cache=False)
    cfg.stages[0].objective = "contrastive"
    with pytest.raises(ValueError, match="objective 'contrastive' reads cached features; it needs feature_cache"):
        Trainer(cfg, show_progress=False).run()
