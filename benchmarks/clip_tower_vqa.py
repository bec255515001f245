"""A VLM whose eyes chiasm trained: CLIP-pretrain a ViT on the synthetic world's captions, then train
the demo's VLM recipe on it (tower frozen, the LLaVA way) and compare with the demo's EfficientNet-Lite0.

Both VLMs see the same world, questions, bridge, LM, stages and budget (``chiasm.demo``); only the
encoder differs. The CLIP tower's 8 x 8 patch grid is average-pooled to the demo's 2 x 2 grid
(one token group per scene cell). ``--baseline`` also runs the EfficientNet demo in the same
session, for a comparison on the same machine state.

Run: ``python benchmarks/clip_tower_vqa.py --runs runs/clip-tower --out results.json [--baseline]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chiasm.clip.config import load_clip_config
from chiasm.clip.evaluate import evaluate_clip
from chiasm.clip.train import ClipTrainer
from chiasm.config import EncoderConfig
from chiasm.demo import run_demo

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip_world.toml"


def clip_tower(runs: Path) -> tuple[Path, dict]:
    folder = runs / "clip"
    if (folder / "model" / "clip_config.json").is_file() and (folder / "clip_metrics.json").is_file():
        return folder / "model", json.loads((folder / "clip_metrics.json").read_text())
    cfg = load_clip_config(CONFIG)
    cfg.output_dir = str(folder)
    t0 = time.perf_counter()
    model = ClipTrainer(cfg).run()
    result = evaluate_clip(model, cfg.eval.data, folder, model_dir=folder / "model")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    (folder / "clip_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return folder / "model", result


def row(name: str, results: dict) -> dict:
    return {"vlm": name, "vqa": results["vqa"]["overall"], "vqa_per_type": results["vqa"]["per_type"],
            "other_words": results["vqa_paraphrased"]["overall"],
            "other_words_per_type": results["vqa_paraphrased"]["per_type"],
            "blank": results.get("blank", {}).get("overall"), "chance": results.get("chance", {}).get("overall"),
            "minutes": round(results["timings"]["total_s"] / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/clip-tower")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--baseline", action="store_true", help="also run the EfficientNet-Lite0 demo now")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    tower, clip_result = clip_tower(runs)
    encoder = EncoderConfig(name="chiasm-clip", source=str(tower), options={"grid": [2, 2]})
    rows = [row("chiasm CLIP ViT (frozen)", run_demo(runs / "vlm-clip", precision=args.precision, encoder=encoder))]
    if args.baseline:
        rows.append(row("EfficientNet-Lite0 (frozen)", run_demo(runs / "vlm-effnet", precision=args.precision)))
    r = clip_result["retrieval"]
    print(f"\nCLIP tower: image->text R@1 {r['i2t_R@1']:.1%}, text->image R@1 {r['t2i_R@1']:.1%} "
          f"on {r['n_images']} held-out scenes")
    print(f"{'VLM eyes':<30}{'VQA':>8}{'other words':>13}{'blank':>8}{'chance':>8}{'min':>6}")
    for x in rows:
        print(f"{x['vlm']:<30}{x['vqa']:>8.1%}{x['other_words']:>13.1%}{x['blank']:>8.1%}{x['chance']:>8.1%}"
              f"{x['minutes']:>6}")
    if args.out:
        Path(args.out).write_text(json.dumps({"clip": clip_result, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
