"""The generation benchmark stays runnable and counts what it says (tiny shapes, CPU, seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks folder is a package of the repository, not of chiasm

from benchmarks import generate_bench  # noqa: E402


def test_generate_bench_tiny(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen.json"
    result = generate_bench.main(["--size", "tiny", "--new-tokens", "3", "--concurrent", "3", "--repeats", "1",
                                  "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    batched = result["batched"]
    # Every request ran its whole budget on both sides (end-of-turn tokens are ignored on random weights).
    assert batched["batched"]["tokens"] == batched["sequential"]["tokens"] == 3 * 3
    assert batched["speedup"] == batched["batched"]["tokens_per_s"] / batched["sequential"]["tokens_per_s"]
    decode = result["decode"]
    assert decode["engine_decode_tokens_per_s"] > 0 and decode["hf_decode_tokens_per_s"] > 0
    assert len(result["prompt_tokens"]) == 3 and len(set(result["prompt_tokens"])) == 3
    table = capsys.readouterr().out
    assert "3 requests, one batched call" in table and "transformers generate" in table


def test_requests_vary_in_length_and_images() -> None:
    reqs = generate_bench.make_requests(8, 64, 5)
    assert [len(r.images) for r in reqs] == [1, 2] * 4
    assert all(r.conversation[-1].text.count("<image>") == len(r.images) for r in reqs)
    assert len({len(r.conversation[-1].text.split()) for r in reqs}) > 3
