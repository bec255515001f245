"""The demo's verdict: one PASS/MISS line per target and a non-zero exit when one is missed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from chiasm import demo
from chiasm.cli import main
from chiasm.demo import DemoTargets, check_targets, format_checks

MET = {
    "vqa": {"overall": 0.905, "n": 200, "per_type": {"colour": 0.9, "count": 0.875, "existence": 0.875,
                                                      "position": 0.925, "shape": 0.95}},
    "blank": {"overall": 0.235, "n": 200, "per_type": {}},
    "chance": {"overall": 0.36, "per_type": {}},
    "retention": {"ppl_ratio": 1.003},
    "stage_retention": {"align": {"ppl_ratio": 1.0}, "instruct": {"ppl_ratio": 1.0033}},
    "vqa_paraphrased": {"overall": 0.9, "n": 200, "per_type": {"colour": 0.9, "count": 0.85, "existence": 0.9,
                                                               "position": 0.9, "shape": 0.95}},
}


def _with(**changes: object) -> dict:
    results = copy.deepcopy(MET)
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = results
        for k in keys:
            node = node[k]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return results


def test_a_demo_that_meets_every_target_passes_each() -> None:
    checks = check_targets(MET)
    assert [(c.name, c.passed) for c in checks] == [("VQA overall", True), ("VQA per question type", True),
                                                    ("perplexity rise after instruct", True),
                                                    ("blank-image accuracy", True),
                                                    ("VQA in other words overall", True),
                                                    ("VQA in other words per question type", True)]
    assert checks[0].detail == "90.5% (target >= 90%)"
    assert checks[1].detail == "lowest count 87.5% (target >= 80% each)"
    assert checks[2].detail == "+0.3% (target <= +5%)"
    assert checks[3].detail == "23.5% (target <= chance 36.0% + 10% = 46.0%)"
    assert format_checks(checks).splitlines()[-1] == "demo met every target"


def test_values_exactly_on_a_target_meet_it() -> None:
    edge = _with(vqa__overall=180 / 200, vqa__per_type={"a": 32 / 40, "b": 1.0},
                 stage_retention__instruct={"ppl_ratio": 1.05}, blank__overall=0.46)
    assert all(c.passed for c in check_targets(edge))


@pytest.mark.parametrize(("changes", "missed", "detail"), [
    ({"vqa__overall": 0.895}, "VQA overall", "89.5% (target >= 90%)"),
    ({"vqa__per_type": {"colour": 0.95, "count": 0.775, "shape": 0.7}}, "VQA per question type",
     "count 77.5%, shape 70.0% (target >= 80% each)"),
    ({"stage_retention__instruct": {"ppl_ratio": 1.063}}, "perplexity rise after instruct", "+6.3% (target <= +5%)"),
    ({"blank__overall": 0.47}, "blank-image accuracy", "47.0% (target <= chance 36.0% + 10% = 46.0%)"),
])
def test_each_missed_target_is_named(changes: dict, missed: str, detail: str) -> None:
    checks = check_targets(_with(**changes))
    assert [c.name for c in checks if not c.passed] == [missed]
    assert next(c for c in checks if c.name == missed).detail == detail
    lines = format_checks(checks).splitlines()
    assert f"MISS  {missed}: {detail}" in lines
    assert lines[-1] == f"demo missed 1 target(s): {missed}"


def test_missing_measurements_are_misses_and_retention_falls_back_to_the_final_model() -> None:
    checks = check_targets({})
    assert not any(c.passed for c in checks) and {c.detail for c in checks} == {"not measured"}
    fallback = check_targets(_with(stage_retention=None, retention={"ppl_ratio": 1.08}))
    assert [c.name for c in fallback if not c.passed] == ["perplexity rise after instruct"]


def test_targets_are_configurable_in_one_place() -> None:
    strict = DemoTargets(vqa_overall=0.95, vqa_per_type=0.9)
    assert [c.name for c in check_targets(MET, strict) if not c.passed] == [
        "VQA overall", "VQA per question type", "VQA in other words overall", "VQA in other words per question type"]


@pytest.mark.parametrize(("results", "code"), [(MET, 0), (_with(vqa__overall=0.5), 1)])
def test_chiasm_demo_exits_non_zero_on_a_miss(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                              tmp_path: Path, results: dict, code: int) -> None:
    seen = {}

    def fake_run_demo(out: Path, size: demo.DemoSize, *, precision: str) -> dict:
        seen.update(out=out, n_train=size.n_train, precision=precision)
        return results

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), "--n-train", "16", "--precision", "fp32"]) == code
    assert seen == {"out": tmp_path, "n_train": 16, "precision": "fp32"}
    out = capsys.readouterr().out.splitlines()
    assert out[:6] == [f"{'PASS' if c.passed else 'MISS'}  {c.name}: {c.detail}" for c in check_targets(results)]
