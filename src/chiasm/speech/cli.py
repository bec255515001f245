"""The speech verbs: ``chiasm transcribe FILE`` and ``chiasm speech train|eval|convert|data``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MODEL = "packaged:tiny.en"


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from chiasm.speech.audio import load_audio
    from chiasm.speech.loader import load_whisper
    from chiasm.speech.transcribe import transcribe

    audios = [load_audio(f) for f in args.files]  # a bad file costs no model loading
    w = load_whisper(args.model)
    texts = transcribe(w, audios, language=args.language, task=args.task, num_beams=args.beams)
    for f, t in zip(args.files, texts, strict=True):
        print(f"{f}\t{t}" if len(args.files) > 1 else t)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from chiasm.speech.loader import load_whisper, save_whisper

    print(f"transformers Whisper folder written to {save_whisper(load_whisper(args.source), Path(args.out))}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from chiasm.speech.synthetic import ACCENTS, SynthSpec, build

    out = Path(args.out)
    if args.kind == "accents":
        held = args.heldout_voice
        train_voices = tuple(v for v in ACCENTS if v != held)
        spec = SynthSpec(language="en", n_train=args.n_train, n_heldout=args.n_heldout, voices=train_voices,
                         heldout_voices=(held,), seed=args.seed)
    else:
        spec = SynthSpec(language=args.kind, n_train=args.n_train, n_heldout=args.n_heldout, voices=(args.kind,),
                         seed=args.seed)
    for split, path in build(spec, out).items():
        print(f"{split}: {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from chiasm.speech.config import load_speech_config
    from chiasm.speech.evaluate import evaluate_all, format_table, write_eval
    from chiasm.speech.report import write_speech_report
    from chiasm.speech.train import SpeechTrainer

    cfg = load_speech_config(args.config)
    if args.out:
        cfg.output_dir = args.out
    out = Path(cfg.output_dir)
    trainer = SpeechTrainer(cfg)
    results = {}
    from chiasm.speech.transcribe import EncoderOutputs

    # Before and after share the evaluation clips' encoder outputs when training left the encoder as it was.
    ev = {"task": cfg.task, "num_beams": cfg.num_beams, "batch_size": cfg.eval_batch_size, "on_error": cfg.on_error,
          "encoded": EncoderOutputs()}
    if cfg.eval and cfg.eval_before and not args.no_eval and trainer.dist.is_main and not args.resume:
        results["before"] = evaluate_all(trainer.whisper, cfg.eval, label=cfg.model, **ev)
        write_eval(out, results)
    w = trainer.run(resume=args.resume)
    if not trainer.dist.is_main:
        return 0
    print(f"model saved to {trainer.save(out / 'model')}")
    if cfg.eval and not args.no_eval:
        saved = out / "speech_eval.json"
        if args.resume and saved.is_file():
            results = {k: v for k, v in json.loads(saved.read_text()).items() if k == "before"}
        results["after"] = evaluate_all(w, cfg.eval, label=str(out / "model"), **ev)
        write_eval(out, results)
        print(format_table(results))
        print(f"report: {write_speech_report(out, results, title=f'chiasm speech train: {out.name}')}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from chiasm.speech.config import SpeechData
    from chiasm.speech.evaluate import evaluate_all, format_table, write_eval
    from chiasm.speech.loader import load_whisper
    from chiasm.speech.report import write_speech_report

    sets = []
    for spec in args.data:
        name, _, manifest = spec.partition("=")
        sets.append(SpeechData(name=name if manifest else Path(name).stem, manifest=manifest or name,
                               language=args.language, max_samples=args.max_samples))
    w = load_whisper(args.model)
    results = {}
    for beams in sorted(set(args.beams or [1])):
        label = "greedy" if beams == 1 else f"beam{beams}"
        results[label] = evaluate_all(w, sets, label=args.model, num_beams=beams, task=args.task,
                                      on_error="skip" if args.skip_bad else "raise")
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        write_eval(out, results)
        print(f"report: {write_speech_report(out, results, title=f'chiasm speech eval: {args.model}')}")
    return 0


def add_speech_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``transcribe`` and ``speech`` on the ``chiasm`` command's subparsers."""
    t = sub.add_parser("transcribe",
                       help="speech to text with a Whisper model (offline: packaged:tiny.en, packaged:base)")
    t.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, raw 16 kHz PCM); over 30 s is windowed")
    t.add_argument("--model", default=DEFAULT_MODEL,
                   help="packaged:tiny.en, packaged:base, a transformers or CTranslate2 Whisper folder, or a hub id")
    t.add_argument("--language", help="e.g. en, de, es (multilingual models; default: the model detects it)")
    t.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    t.add_argument("--beams", type=int, default=1, help="beam width (1: greedy)")
    t.set_defaults(func=_cmd_transcribe)

    s = sub.add_parser("speech", help="Whisper: convert, build data, fine-tune, evaluate")
    ss = s.add_subparsers(dest="speech_command", required=True)
    c = ss.add_parser("convert",
                      help="write a Whisper (packaged:NAME or a CTranslate2 folder) as a transformers folder")
    c.add_argument("source")
    c.add_argument("out")
    c.set_defaults(func=_cmd_convert)

    d = ss.add_parser("data", help="build a synthetic espeak-ng set (train/held-out manifests)")
    d.add_argument("kind", choices=["de", "es", "accents"], help="German or Spanish fortunes, or accented English")
    d.add_argument("--out", required=True)
    d.add_argument("--n-train", type=int, default=200)
    d.add_argument("--n-heldout", type=int, default=60)
    d.add_argument("--heldout-voice", default="en-029", help="accents: the voice kept out of training")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data)

    tr = ss.add_parser("train", help="fine-tune Whisper from a TOML/JSON config (full, frozen encoder or LoRA)")
    tr.add_argument("--config", required=True)
    tr.add_argument("--out", help="override output_dir")
    tr.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    tr.add_argument("--no-eval", action="store_true")
    tr.set_defaults(func=_cmd_train)

    e = ss.add_parser("eval", help="WER/CER per data set, a table and an HTML report")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--data", action="append", required=True,
                   help="NAME=MANIFEST (JSONL or folder), or 'pocketsphinx'; repeat for several sets")
    e.add_argument("--language", help="language of samples whose records name none")
    e.add_argument("--beams", type=int, action="append", default=None, help="repeat to compare (default: 1, greedy)")
    e.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    e.add_argument("--max-samples", type=int)
    e.add_argument("--skip-bad", action="store_true", help="count and skip bad samples instead of stopping")
    e.add_argument("--out", help="folder for speech_eval.json and report.html")
    e.set_defaults(func=_cmd_eval)
