"""Measure the diffusion targets and write one JSON per part (benchmarks/results/diffusion_PART.json).

Parts (each meant to run under 15 minutes on a 2-core CPU; pass --model to reuse a trained one):
  cfg          class-conditional model: w sweep (FID-FMNIST, precision, recall, recognition)
  ddim         DDIM (--steps, default 50) against DDPM (1000 steps) on the same model: FID ratio
  latent-speed training step time of the pixel UNet and the latent UNet at equal width, interleaved
  latent       a latent-diffusion model: recognition rate of its samples at --guidance
  t2i          a text-to-image model on the synthetic world: the pixel checker's scores
  shard, merge the sampler comparison split over processes: `shard` draws samples [start, start + count)
               with --sampler/--steps into --out, `merge` scores DDIM --steps against DDPM 1000 from them

    nice -n 19 python benchmarks/diffusion_targets.py cfg --model runs/diffusion-fmnist/model \
        --classifier runs/classifier-fmnist --n 200
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from chiasm.diffusion.classifier import Judge, train_classifier
from chiasm.diffusion.config import load_diffusion_config
from chiasm.diffusion.data import load_dataset
from chiasm.diffusion.evaluate import balanced_labels, generate_batched, run_eval
from chiasm.diffusion.model import DiffusionModel
from chiasm.diffusion.sampler import SampleOptions
from chiasm.diffusion.train import train

RESULTS = Path(__file__).parent / "results"


def _model(args: argparse.Namespace) -> DiffusionModel:
    if args.model:
        return DiffusionModel.load(args.model)
    return train(load_diffusion_config(args.config))


def _judge(args: argparse.Namespace, model: DiffusionModel) -> Judge:
    folder = Path(args.classifier)
    if (folder / "classifier.json").is_file():
        return Judge.load(folder)
    cfg = model.cfg
    tr = load_dataset(cfg.data.source, "train", root=cfg.data.root, size=cfg.data.size, channels=cfg.data.channels)
    te = load_dataset(cfg.data.source, "test", root=cfg.data.root, size=cfg.data.size, channels=cfg.data.channels)
    return train_classifier(tr, te).save(folder) and Judge.load(folder)


def part_cfg(args: argparse.Namespace) -> dict:
    model = _model(args)
    judge = _judge(args, model)
    test = load_dataset(model.cfg.data.source, "test", root=model.cfg.data.root, size=model.cfg.data.size)
    res = run_eval(model, judge, test, Path(args.out), guidances=[float(w) for w in args.guidance.split(",")],
                   n=args.n, opts=SampleOptions("ddim", args.steps))
    rec = {r["guidance"]: r.get("recognition") for r in res["sweep"]}
    res["targets"] = {"recognition_w3_at_least_85": rec.get(3.0, 0) >= 0.85,
                      "w3_minus_w0_at_least_15_points": (rec.get(3.0, 0) - rec.get(0.0, 1)) >= 0.15}
    return res


def part_ddim(args: argparse.Namespace) -> dict:
    model = _model(args)
    judge = _judge(args, model)
    test = load_dataset(model.cfg.data.source, "test", root=model.cfg.data.root, size=model.cfg.data.size)
    res = run_eval(model, judge, test, Path(args.out), guidances=[], n=args.n,
                   opts=SampleOptions("ddim", args.steps, 0.0, args.compare_guidance, spacing=args.spacing),
                   compare_ddpm=True, compare_seeds=args.seeds)
    s = res["samplers"]
    res["targets"] = {"ddim_fid_within_10_percent": s["fid_ratio"] <= 1.10,
                      "evaluations_ratio": s["ddpm"]["network_evaluations"] / s["ddim"]["network_evaluations"]}
    return res


def part_latent_speed(args: argparse.Namespace) -> dict:
    """Forward + backward + Adam step of both UNets on the same batch size, alternated to share the noise."""
    pixel = DiffusionModel.build(load_diffusion_config(args.config), [str(i) for i in range(10)])
    lcfg = load_diffusion_config(args.latent_config)
    latent = DiffusionModel.build(lcfg, [str(i) for i in range(10)])
    assert pixel.cfg.net.channels == latent.cfg.net.channels, "equal width is the point of the comparison"
    times: dict[str, list[float]] = {"pixel": [], "latent": []}
    for rep in range(args.reps + 1):
        for name, m in (("pixel", pixel), ("latent", latent)):
            c, side = m.net_shape(m.cfg)
            x, t = torch.randn(args.batch, c, side, side), torch.randint(0, 1000, (args.batch,))
            y = torch.randint(0, 10, (args.batch,))
            opt = torch.optim.AdamW(m.net.parameters(), 1e-4)
            tick = time.perf_counter()
            loss = (m.net(x, t, y) - x).pow(2).mean()
            loss.backward()
            opt.step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - tick)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": args.batch, "channels": pixel.cfg.net.channels, "pixel_input": list(pixel.net_shape(pixel.cfg)),
            "latent_input": list(latent.net_shape(latent.cfg)), "seconds": times, "median": med,
            "speedup": med["pixel"] / med["latent"], "targets": {"at_least_4x": med["pixel"] / med["latent"] >= 4}}


def part_latent(args: argparse.Namespace) -> dict:
    model = _model(args)
    judge = _judge(args, model)
    labels = balanced_labels(args.n, len(model.classes))
    samples = generate_batched(model, labels, args.n, SampleOptions("ddim", args.steps, 0.0, args.compare_guidance), 0)
    rate = float((judge.predict(samples) == torch.tensor(labels)).float().mean())
    return {"n": args.n, "guidance": args.compare_guidance, "recognition": rate,
            "targets": {"recognition_at_least_75": rate >= 0.75}}


def part_t2i(args: argparse.Namespace) -> dict:
    from chiasm.diffusion.checker import check

    model = _model(args)
    test = load_dataset("synthetic", "test", size=model.cfg.data.size, n=args.n, seed=model.cfg.train.seed)
    samples = generate_batched(model, None, args.n, SampleOptions("ddim", args.steps, 0.0, args.compare_guidance), 0,
                               prompts=test.captions)
    scores = check(samples, test.scenes)
    from chiasm.diffusion.pictures import save_image_grid

    save_image_grid(samples[:24], Path(args.out) / "t2i_samples.png", columns=8)
    return {"n": args.n, "guidance": args.compare_guidance, "prompts": test.captions[:24], **scores,
            "targets": {"colour_and_cell_at_least_80": scores["colour_and_cell"] >= 0.8,
                        "shape_at_least_60": scores["shape"] >= 0.6}}


def part_shard(args: argparse.Namespace) -> dict:
    """Samples [start, start + count) of a balanced n-sample set, saved to OUT (several processes share a run)."""
    from safetensors.torch import save_file

    model = _model(args)
    labels = balanced_labels(args.n, len(model.classes))[args.start:args.start + args.count]
    opts = SampleOptions(args.sampler, args.steps, 0.0, args.compare_guidance, spacing=args.spacing)
    tick = time.perf_counter()
    samples = generate_batched(model, labels, len(labels), opts, args.seed + args.start)
    out = Path(args.out) / f"{args.sampler}{args.steps}_{args.start:05d}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.contiguous(), "labels": torch.tensor(labels)}, str(out))
    return {"file": str(out), "count": len(labels), "seconds": round(time.perf_counter() - tick, 1)}


def part_merge(args: argparse.Namespace) -> dict:
    """DDIM (--steps) against DDPM (1000 steps) from the shards in OUT: FID, recognition, network evaluations."""
    from safetensors.torch import load_file

    from chiasm.diffusion.evaluate import FID_NAMES, score

    model = DiffusionModel.load(args.model)
    judge = Judge.load(args.classifier)
    test = load_dataset(model.cfg.data.source, "test", root=model.cfg.data.root, size=model.cfg.data.size)
    real = judge.features(test.images)
    fid = FID_NAMES[model.cfg.data.source]
    rows = {}
    for name, steps in (("ddim", args.steps), ("ddpm", 1000)):
        parts = [load_file(str(p)) for p in sorted(Path(args.out).glob(f"{name}{steps}_*.safetensors"))]
        samples = torch.cat([p["samples"] for p in parts])
        labels = torch.cat([p["labels"] for p in parts]).tolist()
        rows[name] = {**score(samples, labels, judge, real, fid), "n": len(labels), "steps": steps,
                      "network_evaluations": steps * (2 if args.compare_guidance else 1)}
    rows["fid_ratio"] = rows["ddim"][fid] / rows["ddpm"][fid]
    return {"fid_name": fid, "guidance": args.compare_guidance, "samplers": rows,
            "targets": {"ddim_fid_within_10_percent": rows["fid_ratio"] <= 1.10,
                        "evaluations_ratio": rows["ddpm"]["network_evaluations"] / rows["ddim"]["network_evaluations"]}}


PARTS = {"shard": part_shard, "merge": part_merge, "cfg": part_cfg, "ddim": part_ddim,
         "latent-speed": part_latent_speed, "latent": part_latent, "t2i": part_t2i}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--config", default="configs/diffusion_fmnist.toml", help="trains a model when --model is absent")
    p.add_argument("--latent-config", default="configs/diffusion_fmnist_latent.toml")
    p.add_argument("--model")
    p.add_argument("--classifier", default="runs/classifier-fmnist")
    p.add_argument("--guidance", default="0,1,3,5")
    p.add_argument("--compare-guidance", type=float, default=0.0)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="runs/diffusion-bench")
    p.add_argument("--tag", default="")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="shard: which sampler")
    p.add_argument("--start", type=int, default=0, help="shard: first sample index")
    p.add_argument("--count", type=int, default=50, help="shard: how many samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="ddim: draw each sampler at this many seeds (mean FIDs)")
    p.add_argument("--spacing", choices=["trailing", "leading"], default="trailing", help="ddim: timestep spacing")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tick = time.perf_counter()
    result = PARTS[args.part](args)
    result["wall_seconds"] = round(time.perf_counter() - tick, 1)
    result["command"] = "benchmarks/diffusion_targets.py " + " ".join(
        f"{k}={v}" for k, v in vars(args).items() if v is not None)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"diffusion_{args.part}{args.tag}.json"
    if args.part == "shard":
        print(json.dumps(result))
        return
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("targets"), indent=2), f"\nwritten to {out}")


if __name__ == "__main__":
    main()
