"""SIGKILL ``chiasm train`` at random instants (many inside checkpoint saves) and resume: same final weights.

The small version of ``benchmarks/kill_resume.py``: one run killed up to 4 times.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks folder is a package of the repository, not of chiasm

from benchmarks import kill_resume  # noqa: E402


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    summary = kill_resume.run_trials(tmp_path, trials=1, kills=4, seed=1, save_delay=0.05, steps=3)
    (trial,) = summary["results"]
    assert trial["kills"], "no kill landed before the run finished"
    assert (tmp_path / "trial00" / "model" / "bridge.safetensors").is_file()
    assert trial["same_final_weights"], trial["differing"]
