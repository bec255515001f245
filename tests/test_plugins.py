"""The general path never imports the synthetic world; its layout, objective and scorer are found by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chiasm.config import ConfigError, EvalConfig, ModelConfig, RunConfig, StageConfig, from_dict
from chiasm.eval.scorers import SCORERS
from chiasm.layout import LAYOUTS
from chiasm.model import VisionLanguageModel
from chiasm.registry import Registry
from chiasm.train.objectives import PREALIGN

SRC = Path(__file__).parents[1] / "src"


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout's sources; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_general_path_does_not_import_the_synthetic_package() -> None:
    out = _python(
        "import sys\n"
        "import chiasm.model, chiasm.train.trainer, chiasm.eval.evaluate, chiasm.chat, chiasm.cli, chiasm.processor\n"
        "from chiasm.config import RunConfig, ModelConfig, StageConfig, EvalConfig\n"
        "RunConfig(model=ModelConfig(image_layout='quadrants'), eval=EvalConfig(scorer='synthetic'),\n"
        "          stages=[StageConfig(name='p', data='d', objective='words')])\n"
        "print(sorted(m for m in sys.modules if m.startswith('chiasm.synthetic')))\n")
    assert out.strip() == "[]"  # the config knows the names without importing what they name


def test_a_saved_quadrant_model_loads_in_a_process_that_never_named_the_synthetic_package(
        tiny_model_config: ModelConfig, tmp_path: Path) -> None:
    model = VisionLanguageModel.build(dataclasses.replace(tiny_model_config, image_layout="quadrants"))
    folder = model.save(tmp_path / "m")
    out = _python(
        "import sys\n"
        "from chiasm.model import VisionLanguageModel\n"
        f"m = VisionLanguageModel.load({str(folder)!r})\n"
        "print(m.token_order)\n"
        "print('chiasm.synthetic.layout' in sys.modules, 'chiasm.synthetic.world' in sys.modules)\n")
    order, loaded = out.strip().splitlines()
    assert order == str(model.token_order) == str([0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
    assert loaded == "True False"  # the layout's module alone, not the world


def test_each_synthetic_name_is_registered_by_its_plugin_module() -> None:
    from chiasm.synthetic.answers import SyntheticScorer
    from chiasm.synthetic.layout import QuadrantLayout
    from chiasm.synthetic.word_targets import WordTargetObjective
    from chiasm.train.contrastive import ContrastiveObjective

    assert LAYOUTS.get("quadrants") is QuadrantLayout
    assert PREALIGN.get("words") is WordTargetObjective and PREALIGN.get("contrastive") is ContrastiveObjective
    assert SCORERS.get("synthetic") is SyntheticScorer
    assert LAYOUTS.names() == ["quadrants", "raster"]
    assert SCORERS.names() == ["exact", "iou", "synthetic", "vqa_soft"]


def test_plugin_table_lookup_errors_name_the_module() -> None:
    reg: Registry[object] = Registry("widget", plugins={"gone": "chiasm.no_such_module", "mute": "chiasm.tokens"})
    assert "gone" in reg and reg.names() == ["gone", "mute"]
    with pytest.raises(ImportError, match=r"widget 'gone' is provided by chiasm.no_such_module, which failed"):
        reg.get("gone")
    with pytest.raises(ImportError, match=r"widget 'mute' should be registered by chiasm.tokens, but importing"):
        reg.get("mute")
    with pytest.raises(KeyError, match=r"unknown widget 'other'; known: gone, mute"):
        reg.get("other")


def test_declare_adds_a_plugin_once() -> None:
    reg: Registry[object] = Registry("widget", plugins={"a": "pkg.a"})
    reg.declare("b", "pkg.b")
    reg.declare("b", "pkg.b")  # the same declaration again is harmless
    assert reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match=r"widget 'a' is already provided by pkg.a"):
        reg.declare("a", "pkg.other")

    @reg.register("c")
    class C:
        pass

    with pytest.raises(ValueError, match=r"widget 'c' is already provided by C"):
        reg.declare("c", "pkg.c")


@pytest.mark.parametrize(("cls", "data", "message"), [
    (ModelConfig, {"image_layout": "spiral"},
     r"image_layout: unknown image layout 'spiral'; known: quadrants, raster"),
    (EvalConfig, {"scorer": "fuzzy"}, r"scorer: unknown VQA scorer 'fuzzy'; known: exact, iou, synthetic, vqa_soft"),
    (StageConfig, {"name": "pre", "data": "d.json", "objective": "Words"},
     r"stage 'pre': objective: unknown objective 'Words'; known: contrastive, ctc, lm, words"),
])
def test_config_rejects_unknown_names_listing_the_known_ones(cls: type, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, data)


def test_a_run_config_names_the_synthetic_parts_exactly() -> None:
    cfg = from_dict(RunConfig, {"model": {"image_layout": "quadrants"}, "eval": {"scorer": "synthetic"},
                                "stages": [{"name": "p", "data": "d", "objective": "words"}]})
    assert (cfg.model.image_layout, cfg.eval.scorer, cfg.stages[0].objective) == ("quadrants", "synthetic", "words")


def test_the_worlds_former_import_path_names_the_same_objects() -> None:
    from chiasm.data import synthetic as former
    from chiasm.synthetic import world

    assert former.WorldFiles is world.WorldFiles and former.make_world is world.make_world
    assert all(getattr(former, name) is getattr(world, name) for name in former.__all__)
