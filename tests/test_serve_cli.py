"""``chiasm serve`` as a command: option errors before the model loads, and a real launch under load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chiasm.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks folder is a package of the repository, not of chiasm

from benchmarks import serve_load  # noqa: E402


@pytest.mark.parametrize(("options", "message"), [
    (["--max-queue", "0"], "serve option --max-queue: must be > 0, got 0"),
    (["--port", "70000"], "serve option --port: must be in 0..65535, got 70000"),
    (["--default-max-tokens", "100", "--max-tokens-limit", "10"], "--default-max-tokens (100) is over"),
    (["--image-folder", "/no/such/folder"], "serve option --image-folder: /no/such/folder is not a folder"),
    (["--api-key", " "], "serve option --api-key: empty"),
    (["--max-image-pixels", str(10**10)], "is over Pillow's own limit"),
])
def test_bad_options_fail_before_the_model_loads(tmp_path: Path, capsys, options: list[str], message: str) -> None:
    assert main(["serve", str(tmp_path / "not-a-model"), *options]) == 2  # the folder would fail later
    assert message in capsys.readouterr().err


def test_not_a_model_folder(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path)]) == 2
    assert "is not a chiasm model folder" in capsys.readouterr().err


def test_the_command_serves_clients_under_load(saved_model_dir: Path, tmp_path: Path) -> None:
    """The load benchmark, tiny: ``chiasm serve`` in its own process, two clients for two seconds."""
    out = tmp_path / "load.json"
    result = serve_load.main(["load", "--model", str(saved_model_dir), "--clients", "2", "--seconds", "2",
                              "--max-tokens", "4", "--stream", "--out", str(out)])
    assert result["requests_ok"] > 0 and result["failures"] == 0 and result["malformed"] == 0
    assert result["completion_tokens"] == 4 * result["requests_ok"] or result["completion_tokens"] > 0
    assert result["latency_p50_s"] <= result["latency_p95_s"]
    assert out.read_text().strip().startswith("{")
