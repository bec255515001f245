"""``chiasm diffusion train | sample | eval``: the command's options and what each verb runs.

Building the parser imports no torch or diffusers, so ``chiasm --help`` stays fast; each verb
checks its arguments before any model loads.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_FILES = ("grid.png", "reverse.png")  # plus sample_NNN.png: the only names sample writes
MAX_SAMPLES = 1000


def add_diffusion_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = sub.add_parser("diffusion", help="train, sample and evaluate DDPM / DDIM / latent / text-to-image models")
    verbs = d.add_subparsers(dest="verb", required=True)

    t = verbs.add_parser("train", help="train a diffusion model from a TOML config (works under torchrun)")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="override output_dir")
    t.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    t.set_defaults(func=cmd_train)

    s = verbs.add_parser("sample", help="draw samples from a trained model into an output folder")
    s.add_argument("--model", required=True, help="a model folder (RUN/model)")
    cond = s.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="cls", help="class name or number (class-conditional models)")
    cond.add_argument("--prompt", help="text (text-conditional models)")
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale w (0: none)")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    _add_x0_limits(s)
    s.add_argument("--n", type=int, default=8, help="how many samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples", help="output folder (nothing is written outside it)")
    s.set_defaults(func=cmd_sample)

    e = verbs.add_parser("eval", help="FID, precision/recall and recognition over a guidance sweep")
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--classifier", help="a classifier folder; default: OUT/classifier, trained there if missing")
    e.add_argument("--classifier-steps", type=int, default=600)
    e.add_argument("--guidance", default="0,1,3", help="comma-separated w values")
    e.add_argument("--n", type=int, default=200, help="samples per guidance value")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    e.add_argument("--compare-ddpm", action="store_true", help="also DDIM (--steps) against DDPM (--ddpm-steps)")
    e.add_argument("--ddpm-steps", type=int, default=1000)
    e.add_argument("--compare-n", type=int, help="samples for the sampler comparison (default: --n)")
    e.add_argument("--compare-guidance", type=float, default=0.0)
    e.add_argument("--compare-eta", default="0",
                   help="comma-separated DDIM eta values drawn in the comparison (0: deterministic; 1: DDPM's noise)")
    e.add_argument("--compare-seeds", type=int, default=1,
                   help="draw every sampler of the comparison at this many seeds and compare mean FIDs "
                   "(FID on a few hundred samples moves by points between seeds)")
    _add_x0_limits(e)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)
    return d


def cmd_train(args: argparse.Namespace) -> int:
    from chiasm.diffusion.config import load_diffusion_config
    from chiasm.diffusion.train import train

    cfg = load_diffusion_config(args.config)
    if args.out:
        cfg.output_dir = args.out
    model = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 draws and reports
        run = Path(cfg.output_dir)
        _run_pictures(model, run)
        from chiasm.diffusion.report import write_diffusion_report

        print(f"model saved to {run / 'model'}\nreport: {write_diffusion_report(run)}")
    return 0


def _run_pictures(model, run: Path) -> None:
    """Forward process of a few held-out images and the training loss, into the run folder."""
    import torch

    from chiasm.diffusion.data import load_dataset
    from chiasm.diffusion.pictures import forward_process, plot_loss, save_image_grid

    cfg = model.cfg
    test = load_dataset(cfg.data.source, "test", root=cfg.data.root, size=cfg.data.size, channels=cfg.data.channels,
                        n=64, seed=cfg.train.seed)
    x = test.images[:4]
    last = model.schedule.train_steps - 1  # the clean image, then t at 5% ... 100% of the schedule
    ts = [-1] + [round(f * last) for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)]
    if model.vae is None:
        forward_process(model, x, ts, run / "forward.png")
    else:  # latent diffusion noises latents: show each noised latent decoded
        from chiasm.diffusion.latent import encode_all

        z = encode_all(model.vae, x) * model.latent_scale
        gen = torch.Generator().manual_seed(0)
        cols = [model.decode(z if t < 0 else model.schedule.add_noise(z, torch.randn(z.shape, generator=gen),
                                                                      torch.full((len(z),), t))) for t in ts]
        save_image_grid(torch.stack(cols, 1).reshape(-1, *cols[0].shape[1:]), run / "forward.png", columns=len(ts))
    plot_loss(run, run / "loss.png")


def _output_folder(out: str) -> Path:
    """The folder sample writes into; refuses a file, and the fixed names it writes if they are links."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name in list(SAMPLE_FILES) + [p.name for p in folder.glob("sample_*.png")]:
        if (folder / name).is_symlink():
            raise ValueError(f"{folder / name} is a symbolic link; sample writes only plain files inside --out")
    return folder


def _add_x0_limits(p: argparse.ArgumentParser) -> None:
    """Options of which steps a sampler visits and how it keeps the predicted x_0 in range (sample and eval)."""
    p.add_argument("--spacing", choices=["trailing", "leading"], default="trailing",
                   help="timesteps visited: trailing starts at the last training step (pure noise); leading "
                   "(diffusers' default) at T - T/steps")
    p.add_argument("--threshold", type=float, help="dynamic thresholding percentile of the predicted x_0 "
                   "(Imagen; e.g. 0.995), for strong guidance; default: a plain clamp")
    p.add_argument("--threshold-max", type=float, default=1.0, help="the largest dynamic-threshold scale")
    p.add_argument("--network-eps", action="store_true", help="DDIM steps with the network's eps rather than "
                   "the one re-derived from the clamped x_0 (diffusers' default; worse under guidance)")


def _x0_limits(args: argparse.Namespace) -> dict:
    """SampleOptions' fields from :func:`_add_x0_limits`' options."""
    return {"threshold": args.threshold, "threshold_max": args.threshold_max, "clipped_eps": not args.network_eps,
            "spacing": args.spacing}


def cmd_sample(args: argparse.Namespace) -> int:
    from chiasm.diffusion.sampler import SampleOptions

    opts = SampleOptions(args.sampler, args.steps, args.eta, args.guidance, **_x0_limits(args))
    if not 1 <= args.n <= MAX_SAMPLES:
        raise ValueError(f"--n must be in 1..{MAX_SAMPLES}, got {args.n}")
    opts.check(10**9)  # ranges that need no model; the step count against the model's follows
    import torch

    from chiasm.diffusion.model import DiffusionModel
    from chiasm.diffusion.pictures import reverse_process, save_image_grid, to_pil

    model = DiffusionModel.load(args.model)
    opts.check(model.schedule.train_steps)
    labels = prompts = None
    kind = model.cfg.net.conditioning
    if kind == "class":
        if args.prompt is not None:
            raise ValueError("this model is class-conditional: use --class, not --prompt")
        if args.cls is None:
            raise ValueError(f"this model is class-conditional: give --class (one of {', '.join(model.classes)})")
        labels = [model.class_index(args.cls)] * args.n
    elif kind == "text":
        if args.cls is not None:
            raise ValueError("this model is text-conditional: use --prompt, not --class")
        if args.prompt is None:
            raise ValueError("this model is text-conditional: give --prompt")
        model.text.check(args.prompt)
        prompts = [args.prompt] * args.n
    folder = _output_folder(args.out)
    gen = torch.Generator().manual_seed(args.seed)
    images = model.generate(args.n, opts, labels=labels, prompts=prompts, generator=gen)
    for i, x in enumerate(images):
        to_pil(x, px=max(x.shape[-1], 64)).save(folder / f"sample_{i:03d}.png")
    save_image_grid(images, folder / "grid.png", columns=min(8, args.n))
    k = min(4, args.n)
    reverse_process(model, folder / "reverse.png", labels=labels[:k] if labels else None,
                    prompts=prompts[:k] if prompts else None, opts=opts, seed=args.seed)
    print(f"{args.n} samples written to {folder} (grid.png, reverse.png, sample_*.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from chiasm.diffusion.sampler import SampleOptions

    try:
        guidances = [float(w) for w in args.guidance.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--guidance takes comma-separated numbers, got {args.guidance!r}") from None
    try:
        etas = tuple(float(x) for x in args.compare_eta.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--compare-eta takes comma-separated numbers, got {args.compare_eta!r}") from None
    opts = SampleOptions(args.sampler, args.steps, 0.0, 0.0, **_x0_limits(args))
    for eta in etas:
        replace(opts, eta=eta).check(10**9)
    for w in [*guidances, args.compare_guidance]:
        replace(opts, guidance=w).check(10**9)
    if not 1 <= args.compare_seeds <= 100:
        raise ValueError(f"--compare-seeds must be in 1..100, got {args.compare_seeds}")
    if not 2 <= args.n <= 10000:
        raise ValueError(f"--n must be in 2..10000, got {args.n}")
    from chiasm.diffusion.classifier import Judge, train_classifier
    from chiasm.diffusion.data import load_dataset
    from chiasm.diffusion.evaluate import run_eval
    from chiasm.diffusion.model import DiffusionModel
    from chiasm.diffusion.pictures import plot_sweep, reverse_process
    from chiasm.diffusion.report import write_diffusion_report

    model = DiffusionModel.load(args.model)
    opts.check(model.schedule.train_steps)
    cfg = model.cfg
    out = Path(args.out)
    test = load_dataset(cfg.data.source, "test", root=cfg.data.root, size=cfg.data.size, channels=cfg.data.channels,
                        seed=cfg.train.seed)
    clf_dir = Path(args.classifier) if args.classifier else out / "classifier"
    if (clf_dir / "classifier.json").is_file():
        judge = Judge.load(clf_dir)
    elif args.classifier:
        raise FileNotFoundError(f"--classifier {clf_dir}: no classifier.json there")
    else:
        train = load_dataset(cfg.data.source, "train", root=cfg.data.root, size=cfg.data.size,
                             channels=cfg.data.channels, seed=cfg.train.seed)
        judge = train_classifier(train, test, steps=args.classifier_steps)
        judge.save(clf_dir)
    result = run_eval(model, judge, test, out, guidances=guidances, n=args.n, opts=opts, seed=args.seed,
                      compare_ddpm=args.compare_ddpm, ddpm_steps=args.ddpm_steps, compare_n=args.compare_n,
                      compare_etas=etas, compare_seeds=args.compare_seeds)
    plot_sweep(result, out / "sweep.png")
    if cfg.net.conditioning == "class":
        w = max(guidances) if guidances else 0.0
        reverse_process(model, out / "reverse.png", labels=list(range(min(4, len(model.classes)))),
                        prompts=None, opts=replace(opts, guidance=w), seed=args.seed)
    run = Path(args.model).parent
    for name in ("loss.png", "forward.png"):
        if (run / name).is_file() and not (out / name).exists():
            (out / name).write_bytes((run / name).read_bytes())
    print(f"report: {write_diffusion_report(out)}")
    return 0
