"""The ``chiasm`` command: demo, train, eval, chat, serve, import, export, clip, world, transcribe, speech."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from chiasm.errors import user_message


def _cmd_demo(args: argparse.Namespace) -> int:
    from chiasm.demo import DemoSize, check_targets, format_checks, run_demo

    size = DemoSize(n_train=args.n_train, n_eval=args.n_eval)
    checks = check_targets(run_demo(Path(args.out), size, precision=args.precision))
    print(format_checks(checks))
    return 0 if all(c.passed for c in checks) else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from chiasm.config import load_config
    from chiasm.input_checks import check_run_inputs
    from chiasm.train.trainer import Trainer

    cfg = load_config(args.config)
    if args.out:
        cfg.output_dir = args.out
    check_run_inputs(cfg, args.config, with_eval=bool(cfg.eval.data) and not args.no_eval)  # before any model
    trainer = Trainer(cfg)
    model = trainer.run(resume=args.resume)
    if trainer.dist.is_main:
        folder = model.save(Path(cfg.output_dir) / "model")
        print(f"model saved to {folder}")
        if cfg.eval.data and not args.no_eval:
            from chiasm.eval.evaluate import evaluate
            from chiasm.eval.table import print_summary
            from chiasm.report import write_report

            results = evaluate(model, cfg.eval, out_dir=Path(cfg.output_dir))
            print_summary(results)
            print(f"report: {write_report(Path(cfg.output_dir))}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from chiasm.config import EvalConfig
    from chiasm.config_checks import check_values
    from chiasm.eval.evaluate import evaluate
    from chiasm.eval.table import print_summary
    from chiasm.input_checks import check_eval_inputs
    from chiasm.model import VisionLanguageModel

    cfg = EvalConfig(data=args.data, image_root=args.image_root, max_samples=args.max_samples, scorer=args.scorer,
                     allow_outside_image_root=args.allow_outside_image_root)
    check_values(cfg, "eval options")  # before the model loads
    check_eval_inputs(cfg)
    model = VisionLanguageModel.load(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out) if args.out else None
    results = evaluate(model, cfg, out_dir=out)
    print_summary(results)
    if out:
        from chiasm.report import write_report

        print(f"report: {write_report(out)}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from chiasm.chat import ask, check_question, interactive
    from chiasm.data.images import load_image
    from chiasm.generation import SamplingParams
    from chiasm.generation.checks import check_params
    from chiasm.model import VisionLanguageModel

    model_dir, question = _chat_positionals(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    try:
        check_params(params)  # a bad value costs no model loading
    except ValueError as exc:  # "top_p must be ..." -> "--top-p: must be ...", named as the user typed it
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')}: {rest}") from None
    if question is None and args.audio:
        question = ""  # the spoken clip is the question
    if question is not None and not args.audio:
        check_question(question, len(args.image))  # before the model loads
    for clip in args.audio:  # a missing or unreadable clip costs no model loading
        from chiasm.speech.audio import load_audio

        load_audio(clip)
    images = [Path(p) for p in args.image]
    for image in images:  # a missing or broken image costs no model loading
        load_image(image)
    model = VisionLanguageModel.load(model_dir, device=args.device, dtype=args.dtype)
    if question is not None:
        print(ask(model, question, images, params=params, audios=[Path(c) for c in args.audio]))
    else:
        interactive(model, images, params)
    return 0


def _chat_positionals(args: argparse.Namespace) -> tuple[str, str | None]:
    """``chiasm chat MODEL [QUESTION]`` or ``chiasm chat --model MODEL [QUESTION]``."""
    words = list(args.words)
    model = args.model if args.model is not None else (words.pop(0) if words else None)
    if model is None:
        raise ValueError("chat needs a model folder: chiasm chat MODEL, or chiasm chat --model MODEL")
    if len(words) > 1:
        raise ValueError(f"chat takes one question (quote it), got {len(words)} words: {words}; "
                         "with --model, the model folder is not given again")
    return model, words[0] if words else None


def _cmd_arena(args: argparse.Namespace) -> int:
    from chiasm.arena import DEFAULT_BRIDGES, quick_setup, real_setup, run_arena

    out = Path(args.out)
    base, world, budget = (quick_setup if args.quick else real_setup)(out)
    names = args.bridges.split(",") if args.bridges else list(DEFAULT_BRIDGES)
    unknown = [n for n in names if n not in DEFAULT_BRIDGES]
    if unknown:
        raise ValueError(f"unknown bridge(s) {unknown}; known: {', '.join(DEFAULT_BRIDGES)}")
    rows = run_arena(out, base, world, budget, {n: DEFAULT_BRIDGES[n] for n in names})
    print((out / "arena.md").read_text())
    return 0 if rows else 1


def _cmd_import(args: argparse.Namespace) -> int:
    from chiasm.interop.cli import import_checkpoint

    print(f"model saved to {import_checkpoint(args.src, args.out, fmt=args.format, dtype=args.dtype)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from chiasm.interop.cli import export_model

    print(f"{args.format} checkpoint written to {export_model(args.model, args.out, fmt=args.format)}")
    return 0


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help="weights dtype of the LM (default: the dtype the model was saved in)")


def build_parser() -> argparse.ArgumentParser:
    from chiasm.config import EvalConfig
    from chiasm.demo import DemoSize
    from chiasm.eval.scorers import SCORERS

    p = argparse.ArgumentParser(prog="chiasm", description="Build, train and evaluate vision-language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline two-stage training of a real VLM on the CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n-train", type=int, default=DemoSize.n_train, help="synthetic training images")
    d.add_argument("--n-eval", type=int, default=DemoSize.n_eval, help="held-out images (5 questions each)")
    d.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="training precision (auto: bf16 where the hardware runs it natively; fp32 elsewhere)")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="run a recipe from a TOML/JSON config (works under torchrun)")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="override output_dir")
    t.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    t.add_argument("--no-eval", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="VQA accuracy, image reliance and language retention")
    e.add_argument("--model", required=True)
    e.add_argument("--data", help="LLaVA JSON/JSONL of questions (meta: answer, question_type)")
    e.add_argument("--image-root")
    e.add_argument("--allow-outside-image-root", action="store_true",
                   help="accept image paths that lead outside --image-root (absolute, ../, symlinks)")
    e.add_argument("--max-samples", type=int)
    e.add_argument("--scorer", default=EvalConfig.scorer, help=f"how answers are scored: {', '.join(SCORERS.names())}")
    e.add_argument("--out")
    _add_load_options(e)
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("arena", help="train every bridge on the same budget and compare them")
    a.add_argument("--out", default="runs/arena")
    a.add_argument("--quick", action="store_true", help="tiny from-scratch parts, a few steps (seconds)")
    a.add_argument("--bridges", help="comma-separated subset, e.g. mlp,qformer")
    a.set_defaults(func=_cmd_arena)

    c = sub.add_parser("chat", help="talk to a saved model about images (one question, or a session)",
                       description="chiasm chat MODEL [--image I ...] [QUESTION]: without a question, a multi-turn "
                                   "session whose answers stream as they come (/image PATH attaches an image).")
    c.add_argument("words", nargs="*", metavar="MODEL [QUESTION]",
                   help="the model folder (unless --model gives it), then the question; no question: a session")
    c.add_argument("--model", help="the model folder (instead of the first positional argument)")
    c.add_argument("--image", action="append", default=[], help="repeat for several images")
    c.add_argument("--audio", action="append", default=[],
                   help="an audio clip for a model that hears (repeatable); with no QUESTION it is the question")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0, help="0: off")
    c.add_argument("--seed", type=int, help="repeat a sampled session exactly")
    _add_load_options(c)
    c.set_defaults(func=_cmd_chat)

    from chiasm.serve.command import add_serve_parser

    _add_load_options(add_serve_parser(sub))

    from chiasm.diffusion.command import add_diffusion_parser

    add_diffusion_parser(sub)

    i = sub.add_parser("import", help="turn another format's checkpoint (a transformers LLaVA folder) into a model")
    i.add_argument("--format", required=True, choices=["llava"])
    i.add_argument("src", help="the checkpoint folder")
    i.add_argument("out", help="the chiasm model folder to write (new or empty)")
    i.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the LM's dtype (default: the checkpoint's)")
    i.set_defaults(func=_cmd_import)

    x = sub.add_parser("export", help="write a model as a transformers LLaVA checkpoint (what vLLM serves)")
    x.add_argument("model", help="a chiasm model folder")
    x.add_argument("--format", required=True, choices=["hf"])
    x.add_argument("out", help="the checkpoint folder to write (new or empty)")
    x.set_defaults(func=_cmd_export)

    from chiasm.clip.cli import add_clip_parser

    add_clip_parser(sub)
    from chiasm.synthetic.seeing_cli import add_world_parser

    add_world_parser(sub)
    from chiasm.speech.cli import add_speech_parsers

    add_speech_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "chat" and not any(e.startswith("-") for e in extra):
        args.words += extra  # `chat MODEL --image I "question"`: argparse ends a positional list at an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except Exception as exc:
        message = user_message(exc)
        if message is None:  # a bug, not the user's mistake: its traceback is what a report needs
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"chiasm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
