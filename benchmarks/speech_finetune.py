"""The speech fine-tuning targets, from a `chiasm speech train` run's speech_eval.json (before/after).

    chiasm speech data de --out runs/speech/data/de --n-train 300 --n-heldout 60
    chiasm speech data accents --out runs/speech/data/accents --n-train 300 --n-heldout 60
    python benchmarks/speech_finetune.py --config configs/speech_base_de.toml --out runs/speech/finetune.json

Targets: the non-English held-out WER at least 30% lower (relative) than before; the real
English recordings' WER up by at most 2 points; the held-out accent's WER at least 20% lower.
``--run DIR`` scores an existing run instead of training. Prints PASS/MISS lines and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {  # eval set name -> (kind, threshold)
    "de-heldout": ("relative_drop", 0.30),
    "accent-en-029-heldout": ("relative_drop", 0.20),
    "pocketsphinx-real-en": ("max_rise_points", 2.0),
}


def check(results: dict) -> list[dict]:
    out = []
    for name, (kind, threshold) in TARGETS.items():
        before = next((s for s in results["before"]["sets"] if s["name"] == name), None)
        after = next((s for s in results["after"]["sets"] if s["name"] == name), None)
        if before is None or after is None:
            continue
        b, a = before["wer"], after["wer"]
        if kind == "relative_drop":
            value = (b - a) / b if b else 0.0
            passed = value >= threshold
        else:
            value = 100 * (a - b)
            passed = value <= threshold
        out.append({"set": name, "wer_before": b, "wer_after": a, "kind": kind, "value": value,
                    "threshold": threshold, "passed": passed})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/speech_base_de.toml")
    ap.add_argument("--run", type=Path, help="score this run folder instead of training")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = args.run
    if run is None:
        subprocess.run([sys.executable, "-m", "chiasm.cli", "speech", "train", "--config", args.config], check=True)
        import tomllib

        run = Path(tomllib.loads(Path(args.config).read_text())["output_dir"])
    results = json.loads((run / "speech_eval.json").read_text())
    checks = check(results)
    for c in checks:
        print(f"{'PASS' if c['passed'] else 'MISS'} {c['set']}: WER {c['wer_before']:.2%} -> {c['wer_after']:.2%} "
              f"({c['kind']} {c['value']:.3f}, target {c['threshold']})")
    report = {"run": str(run), "wall_s": time.perf_counter() - t0, "checks": checks}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if checks and all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
