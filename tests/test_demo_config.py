"""configs/demo.toml spells out exactly the recipe that `chiasm demo` runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chiasm.config import StageConfig, load_config
from chiasm.demo import DemoSize, demo_config, demo_world


def test_demo_toml_matches_demo_recipe(tmp_path: Path) -> None:
    size = DemoSize(n_train=8, n_eval=1)
    built = demo_config(tmp_path / "run", demo_world(tmp_path / "world", size), size)
    toml = load_config(Path(__file__).parents[1] / "configs" / "demo.toml")
    assert toml.model == built.model
    assert len(toml.stages) == len(built.stages)
    for a, b in zip(toml.stages, built.stages, strict=True):
        for field in dataclasses.fields(StageConfig):
            if field.name not in ("data", "epochs"):
                assert getattr(a, field.name) == getattr(b, field.name), (a.name, field.name)
        assert Path(a.data).name == Path(b.data).name
    assert toml.eval.scorer == built.eval.scorer == "synthetic"
    assert [s.epochs for s in toml.stages] == [DemoSize().prealign_epochs, DemoSize().align_epochs,
                                               DemoSize().instruct_epochs]
