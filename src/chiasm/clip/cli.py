"""``chiasm clip train | eval | shards | export``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from chiasm.clip.config import load_clip_config
    from chiasm.clip.evaluate import evaluate_clip, summary_lines
    from chiasm.clip.train import ClipTrainer

    cfg = load_clip_config(args.config)
    if args.out:
        cfg.output_dir = args.out
    trainer = ClipTrainer(cfg)
    model = trainer.run(resume=args.resume)
    if not trainer.dist.is_main:
        return 0
    out = Path(cfg.output_dir)
    print(f"model saved to {out / 'model'} ({trainer.train_seconds:.0f} s of training)")
    if cfg.eval.data is not None:
        result = evaluate_clip(model, cfg.eval.data, out, templates=cfg.eval.templates, model_dir=out / "model",
                               batch_size=cfg.eval.batch_size)
        print("\n".join(summary_lines(result)))
        print(f"report: {out / 'report.html'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from chiasm.clip.config import ClipDataConfig
    from chiasm.clip.evaluate import evaluate_clip, summary_lines
    from chiasm.clip.model import ClipModel

    templates = None
    if args.templates:
        templates = [line for line in Path(args.templates).read_text().splitlines() if line.strip()]
    data = ClipDataConfig(kind=args.data, path=args.path, image_root=args.image_root, split=args.split,
                          limit=args.limit, on_error=args.on_error)
    model = ClipModel.load(args.model, device=args.device)
    out = Path(args.out) if args.out else None
    result = evaluate_clip(model, data, out, templates=templates, model_dir=Path(args.model))
    print("\n".join(summary_lines(result)))
    if out:
        print(f"metrics: {out / 'clip_metrics.json'}  report: {out / 'report.html'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from chiasm.clip.export_openclip import export_open_clip
    from chiasm.clip.model import ClipModel

    out = export_open_clip(ClipModel.load(args.model), args.out)
    print(f"open_clip folder written to {out}; load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from chiasm.clip.config import ClipDataConfig
    from chiasm.clip.shards import write_shards
    from chiasm.clip.sources import build_pairs

    data = ClipDataConfig(kind=args.data, path=args.path, image_root=args.image_root, split=args.split,
                          limit=args.limit, on_error=args.on_error)
    files = write_shards(build_pairs(data), args.out, per_shard=args.per_shard)
    print(f"{len(files)} shards written to {args.out}; train on them with [data] kind = \"shards\", "
          f"path = \"{args.out}\"")
    return 0


def _data_options(parser: argparse.ArgumentParser, *, split: str) -> None:
    parser.add_argument("--data", required=True, choices=["digits", "fashion-mnist", "synthetic", "llava", "folder"])
    parser.add_argument("--path", help="the data file or folder (llava, folder; fashion-mnist: the idx files' folder)")
    parser.add_argument("--image-root")
    parser.add_argument("--split", default=split, choices=["train", "test"])
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"])


def add_clip_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clip", help="CLIP: contrastive image-text training, zero-shot evaluation, export")
    verbs = p.add_subparsers(dest="clip_command", required=True)

    t = verbs.add_parser("train", help="train a CLIP from a TOML/JSON config (works under torchrun)")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="override output_dir")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.set_defaults(func=_train)

    e = verbs.add_parser("eval", help="zero-shot classification or retrieval of a saved CLIP")
    e.add_argument("--model", required=True, help="a CLIP model folder (RUN/model)")
    _data_options(e, split="test")
    e.add_argument("--templates", help="a text file of prompt templates, one per line, each with {} for the class")
    e.add_argument("--device", help="e.g. cpu, cuda")
    e.add_argument("--out", help="write clip_metrics.json, plots and report.html here")
    e.set_defaults(func=_eval)

    s = verbs.add_parser("shards", help="write image-caption pairs as WebDataset-style tar shards (to stream)")
    _data_options(s, split="train")
    s.add_argument("--out", required=True, help="the folder for shard-000000.tar, ...")
    s.add_argument("--per-shard", type=int, default=1000, help="pairs per shard")
    s.set_defaults(func=_shards)

    x = verbs.add_parser("export", help="write a CLIP as an open_clip local folder")
    x.add_argument("model", help="a CLIP model folder")
    x.add_argument("--format", required=True, choices=["open_clip"])
    x.add_argument("out", help="the folder to write (new or empty)")
    x.set_defaults(func=_export)
