"""configs/which_image.toml spells out the recipe that the seeing benchmark measured on which_image."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from chiasm.config import load_config

ROOT = Path(__file__).parents[1]


def test_which_image_toml_matches_the_benchmark_recipe(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("seeing_targets", ROOT / "benchmarks" / "seeing_targets.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    world = tmp_path / "which"
    built = bench.run_config(world / "train.json", world / "eval.json", tmp_path / "run", tiling=None, image_size=224,
                             steps=200, scorer="exact", max_new_tokens=8, grid=1, upsample=2,
                             prealign=(world / "captions.json", 20.0, 64), instruct_bridge="frozen")
    toml = load_config(ROOT / "configs" / "which_image.toml")
    assert toml.model == built.model
    assert [s.name for s in toml.stages] == [s.name for s in built.stages] == ["prealign", "instruct"]
    # Every stage field equal; the data files by name (the config's world folder is not the test's).
    assert [dataclasses.replace(s, data=Path(s.data).name) for s in toml.stages] == \
        [dataclasses.replace(s, data=Path(s.data).name) for s in built.stages]
    assert toml.stages[0].objective == "words" and toml.stages[1].bridge.mode == "frozen"
    assert (toml.eval.scorer, toml.eval.max_new_tokens, toml.precision) == ("exact", 8, "fp32")
