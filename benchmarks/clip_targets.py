"""CLIP's quality-and-time targets, each run from its config in ``configs/`` and timed end to end.

* digits from scratch: zero-shot top-1 >= 90% on the held-out images with held-out templates,
  training under 60 s;
* Fashion-MNIST from scratch: top-1 >= 80% on the 10,000 test images, under 10 minutes;
* Fashion-MNIST with LiT (EfficientNet-Lite0 locked, MiniLM trained): top-1 >= 85%, under 10 minutes.

"total" is everything from reading the config to the last metric: data loading, the locked
tower's feature cache, training and evaluation. Run alone: other jobs on the machine slow it.

Run: ``python benchmarks/clip_targets.py --out results.json`` (``--only digits`` for one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from chiasm.clip.config import load_clip_config
from chiasm.clip.evaluate import evaluate_clip
from chiasm.clip.train import ClipTrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGETS = {  # name: (config, least top-1, most seconds, what the seconds cover)
    "digits": ("clip_digits.toml", 0.90, 60, "train"),
    "fashion-scratch": ("clip_fashion.toml", 0.80, 600, "total"),
    "fashion-lit": ("clip_fashion_lit.toml", 0.85, 600, "total"),
}


def run_one(name: str, out: Path) -> dict:
    config, least, most, timed = TARGETS[name]
    t0 = time.perf_counter()
    cfg = load_clip_config(CONFIGS / config)
    cfg.output_dir = str(out / name)
    trainer = ClipTrainer(cfg)
    model = trainer.run()
    result = evaluate_clip(model, cfg.eval.data, Path(cfg.output_dir), templates=cfg.eval.templates,
                           model_dir=Path(cfg.output_dir) / "model")
    total = time.perf_counter() - t0
    top1 = result["zero_shot"]["top1"]
    seconds = trainer.train_seconds if timed == "train" else total
    return {"name": name, "config": f"configs/{config}", "top1": top1, "target_top1": least,
            "train_seconds": round(trainer.train_seconds, 1), "total_seconds": round(total, 1),
            "timed": timed, "target_seconds": most, "passed": top1 >= least and seconds <= most,
            "held_out_templates": result["zero_shot"]["templates_seen_in_training"] == [],
            "n_test": result["n"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(TARGETS), action="append")
    p.add_argument("--runs", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    names = args.only or list(TARGETS)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp)
        rows = [run_one(n, runs) for n in names]
    print(f"{'run':<17}{'top-1':>8}{'target':>8}{'train s':>9}{'total s':>9}{'limit':>12}  result")
    for r in rows:
        limit = f"{r['timed']} {r['target_seconds']}"
        print(f"{r['name']:<17}{r['top1']:>8.1%}{r['target_top1']:>8.0%}{r['train_seconds']:>9.0f}"
              f"{r['total_seconds']:>9.0f}{limit:>12}  {'met' if r['passed'] else 'MISSED'}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
