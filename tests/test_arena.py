"""The bridge arena in quick mode: every bridge trained, evaluated and tabulated."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from chiasm.arena import DEFAULT_BRIDGES
from chiasm.bridges import BRIDGES
from chiasm.cli import main


def test_arena_covers_every_bridge() -> None:
    assert set(DEFAULT_BRIDGES) == set(BRIDGES.names())


def test_quick_arena_writes_table_json_and_plots(tmp_path: Path, capsys) -> None:
    assert main(["arena", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "arena.json").read_text())
    assert [r["bridge"] for r in rows] == list(DEFAULT_BRIDGES)
    tokens = {r["bridge"]: r["visual_tokens"] for r in rows}
    assert tokens["mlp"] == 16 and tokens["pixel_shuffle"] == 4 and tokens["resampler"] == 4
    assert tokens["gated_xattn"] == 1
    for r in rows:
        assert 0 <= r["vqa"] <= 1 and r["bridge_params"] > 0 and r["trainable_params"] >= r["bridge_params"]
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_mb"] >= 0 and r["ppl_ratio"] > 0
    table = (tmp_path / "arena.md").read_text()
    assert all(f"| {name} |" in table for name in DEFAULT_BRIDGES)
    assert "| qformer |" in capsys.readouterr().out
    for png in ("accuracy_vs_tokens.png", "accuracy_vs_time.png"):
        assert Image.open(tmp_path / png).size[0] > 100


def test_arena_shares_feature_cache_and_base_lm_results(tmp_path: Path, monkeypatch) -> None:
    import chiasm.eval.evaluate as ev

    entered = []
    real = ev.BaseLM

    class CountingBaseLM(real):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(ev, "BaseLM", CountingBaseLM)
    assert main(["arena", "--quick", "--out", str(tmp_path), "--bridges", "mlp,pooling,resampler"]) == 0
    assert len(entered) == 1  # the base LM's perplexity and answers: once, not per bridge
    assert len(list((tmp_path / "cache").glob("features-*/index.json"))) == 1
    assert not list(tmp_path.glob("*/cache/features-*"))
    base_ppl = {json.loads((tmp_path / b / "eval.json").read_text())["retention"]["base_ppl"]
                for b in ("mlp", "pooling", "resampler")}
    assert len(base_ppl) == 1


def test_arena_rejects_unknown_bridge(tmp_path: Path, capsys) -> None:
    assert main(["arena", "--quick", "--out", str(tmp_path), "--bridges", "mlp,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_real_arena_compares_bridges_on_the_native_grid_in_raster_order(tmp_path: Path) -> None:
    from chiasm.arena import arena_model
    from chiasm.demo import DemoSize, demo_config
    from chiasm.synthetic.world import WorldFiles

    world = WorldFiles(tmp_path, tmp_path / "images", tmp_path / "a.json", tmp_path / "i.json", tmp_path / "e.json")
    demo = demo_config(tmp_path, world, DemoSize()).model
    model = arena_model(demo)
    assert demo.encoder.options["grid"] == [2, 2] and demo.image_layout == "quadrants"
    assert "grid" not in model.encoder.options and model.image_layout == "raster"
    assert model.encoder.options["extra_blocks"] == demo.encoder.options["extra_blocks"]
    assert model.encoder.image_size == demo.encoder.image_size and model.lm == demo.lm
