"""Spoken-question VQA: a trained VLM given ears, asked the same questions typed and spoken.

The vision side is a saved model that already answers typed questions about the synthetic
world (by default the demo's, ``runs/demo/model``: run ``chiasm demo`` first). It gets a
frozen Whisper encoder and a fresh audio bridge (``chiasm.hearing.attach``), and two stages
train the audio bridge alone, everything else frozen, as a VLM's first stage aligns its
visual bridge:

1. ``hear``: speech -> transcript. A spoken question and "Write down the question." -> its text.
2. ``answer``: an image and a spoken question -> the answer (no text of the question anywhere);
   with ``--lora`` the LM gets LoRA adapters too and typed questions are mixed in.

The questions are those of the world's training conversations (its templates and training-only
wordings), each spoken by espeak-ng with an English voice, a timbre variant, speed and pitch
drawn per clip. The evaluation asks every held-out question of the world (held-out images)
three times: typed; spoken by an accent never heard in training (``--heldout-voice``, with the
training timbres); and spoken by the training voices (new clips: is a gap the voice or the
task?). Target: spoken (held-out accent) within 10 points of typed.

    python benchmarks/spoken_vqa.py --vision runs/demo/model      # writes benchmarks/results/spoken_vqa.json

The trained model is saved to ``WORK/model`` (``--work``, default runs/spoken-vqa).

``--quick`` shrinks everything for a smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from chiasm.config import AudioConfig, BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava, save_llava
from chiasm.data.sample import Sample, Turn
from chiasm.eval.vqa import answer, score
from chiasm.hearing.attach import attach_hearing
from chiasm.model import VisionLanguageModel
from chiasm.speech.synthetic import VARIANTS, espeak

RESULTS = Path(__file__).parent / "results"
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-029")
MORE_VOICES = ("en-us-nyc", "en-gb-x-gbcwmd")  # --voices 7: every other English voice but the held-out one
TRANSCRIBE = "Write down the question."


def _qa_pairs(samples: list[Sample]) -> list[tuple[Path, str, str]]:
    """(image, question text, answer) of every human/gpt turn pair, the image placeholder removed."""
    out = []
    for s in samples:
        turns = [t for t in s.conversations if t.role != "system"]
        for q, a in zip(turns[::2], turns[1::2], strict=False):
            out.append((s.images[0], q.text.replace("<image>", "").strip(), a.text))
    return out


def _speak(text: str, out: Path, rng: random.Random, voices: tuple[str, ...], variants: list[str],
           warp: float = 0.0) -> Path:
    """One clip; ``warp`` > 0 plays it back at a rate drawn from [1 - warp, 1 + warp] (Kaldi's speed
    perturbation: the header's sample rate is changed and the loader resamples, so the formants
    shift with the tempo, the way a longer or shorter vocal tract, or another accent's vowels, move them)."""
    voice = rng.choice(voices) + rng.choice(variants)
    clip = espeak(text, voice, out, speed=rng.randint(150, 190), pitch=rng.randint(35, 65))
    if warp:
        import soundfile as sf

        samples, rate = sf.read(clip, dtype="float32")
        factor = random.Random(f"warp:{out.name}").uniform(1 - warp, 1 + warp)  # own RNG: other clips unchanged
        sf.write(clip, samples, round(rate * factor))
    return clip


def build_data(world: Path, work: Path, *, n_hear: int, n_answer: int, heldout_voice: str,
               typed_every: int = 0, seed: int = 0, voices: tuple[str, ...] = TRAIN_VOICES,
               foreign: tuple[str, ...] = (), warp: float = 0.0) -> dict[str, Path]:
    """Write the two stages' data files and the spoken eval set (LLaVA JSON, clips beside them).

    ``foreign`` voices (other languages' espeak-ng voices reading the English questions by their own
    letter-to-sound rules: foreign accents) speak training clips beside ``voices``, never eval clips.
    ``warp``: training clips only are speed-perturbed by up to that fraction (see :func:`_speak`).
    """
    heard_by = voices + foreign
    rng = random.Random(seed)
    pairs = _qa_pairs(load_llava(world / "instruct.json").samples)
    rng.shuffle(pairs)
    train_variants = [v for v in VARIANTS if "klatt" not in v]  # the Klatt synthesiser is a different engine
    hear, answer_rows = [], []
    for i, (_, text, _) in enumerate(pairs[:n_hear]):
        clip = _speak(text, work / "clips" / f"hear-{i:05d}.wav", rng, heard_by, train_variants, warp)
        hear.append(Sample(f"hear-{i:05d}", [Turn("human", f"<audio>\n{TRANSCRIBE}"), Turn("gpt", text)],
                           audios=[clip]))
    for i, (image, text, ans) in enumerate(pairs[n_hear:n_hear + n_answer]):
        clip = _speak(text, work / "clips" / f"answer-{i:05d}.wav", rng, heard_by, train_variants, warp)
        answer_rows.append(Sample(f"answer-{i:05d}", [Turn("human", "<image>\n<audio>"), Turn("gpt", ans)],
                                  [image], audios=[clip]))
        if typed_every and i % typed_every == 0:  # typed questions too, so a LoRA-tuned LM keeps reading text
            answer_rows.append(Sample(f"typed-{i:05d}", [Turn("human", f"<image>\n{text}"), Turn("gpt", ans)],
                                      [image]))
    typed = load_llava(world / "eval.json").samples
    files = {"hear": work / "hear.json", "answer": work / "answer.json", "spoken": work / "spoken_eval.json",
             "spoken_trained_voices": work / "spoken_eval_trained_voices.json"}
    for name, said_by in (("spoken", (heldout_voice,)), ("spoken_trained_voices", voices)):
        spoken = []
        for s in typed:
            text = s.conversations[0].text.replace("<image>", "").strip()
            clip = _speak(text, work / "clips" / name / f"{s.id}.wav", rng, said_by, train_variants)
            spoken.append(Sample(s.id, [Turn("human", "<image>\n<audio>"), s.conversations[1]], s.images,
                                 dict(s.meta, spoken=text), audios=[clip]))
        save_llava(spoken, files[name], work)
    save_llava(hear, files["hear"], work)
    save_llava(answer_rows, files["answer"], work)
    return files


def stages(files: dict[str, Path], work: Path, *, hear_steps: int, answer_steps: int, batch: int,
           lr: float, lora: bool, hear: str = "lm", ctc_batch: int = 32, ctc_lr: float = 1e-3,
           ctc_temperature: float = 0.1) -> list[StageConfig]:
    """``hear`` trains the audio bridge alone: through the frozen LM (``lm``), or by CTC against the
    LM's word embeddings with no LM pass (``ctc``, chiasm.hearing.ctc); ``answer`` too, plus LoRA on
    the LM when ``lora`` (the speech-LLM recipe: SALMONN and Qwen-Audio tune the LM with LoRA once
    the audio is aligned)."""
    frozen, full = PolicyConfig(mode="frozen"), PolicyConfig(mode="full")
    common = {"encoder": frozen, "bridge": frozen, "audio_bridge": full, "batch_size": batch,
              "lr": lr, "image_root": str(work), "allow_outside_image_root": True, "on_error": "skip",
              "max_skip_fraction": 0.05}
    lm = PolicyConfig(mode="lora", lora_r=8, lora_alpha=16, lr=3e-4) if lora else frozen
    hear_options = common if hear == "lm" else dict(common, objective="ctc", batch_size=ctc_batch, lr=ctc_lr,
                                                     temperature=ctc_temperature)
    return [StageConfig(name="hear", data=str(files["hear"]), max_steps=hear_steps, lm=frozen, **hear_options),
            StageConfig(name="answer", data=str(files["answer"]), max_steps=answer_steps, lm=lm, **common)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision", default="runs/demo/model", help="a saved model that answers typed questions")
    p.add_argument("--world", default="runs/demo/world", help="the synthetic world it was trained on")
    p.add_argument("--whisper", default="packaged:base")
    p.add_argument("--seconds", type=float, default=6.0, help="the audio window (clips longer are skipped)")
    p.add_argument("--kernel", type=int, default=10, help="frames per audio token (20 ms each)")
    p.add_argument("--bridge", choices=["pooling", "stack"], default="pooling",
                   help="pooling: the kernel's frames averaged, then an MLP; stack: side by side, then a linear map")
    p.add_argument("--hear", choices=["lm", "ctc"], default="lm",
                   help="hear stage: speech -> transcript through the frozen LM, or CTC against its word embeddings")
    p.add_argument("--hear-steps", type=int, default=150)
    p.add_argument("--ctc-batch", type=int, default=32)
    p.add_argument("--ctc-lr", type=float, default=1e-3)
    p.add_argument("--max-hear-clips", type=int, default=1200, help="distinct hear clips (ctc runs several epochs)")
    p.add_argument("--answer-steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout-voice", default="en-gb-scotland")
    p.add_argument("--voices", type=int, choices=[5, 7], default=5,
                   help="training voices: 5 (en-us, en-gb, en-gb-x-rp, en-gb-x-gbclan, en-029) or 7 (+ en-us-nyc, "
                        "en-gb-x-gbcwmd)")
    p.add_argument("--foreign-voices", default="",
                   help="comma-separated espeak-ng voices of other languages (e.g. de,nl,sv) that also speak the "
                        "training questions: more accents heard in training; never used in evaluation")
    p.add_argument("--warp", type=float, default=0.0,
                   help="speed-perturb training clips by up to this fraction (0.1: rates 0.9..1.1; formants move)")
    p.add_argument("--lora", action="store_true", help="answer stage: LoRA on the LM as well (typed rows mixed in)")
    p.add_argument("--typed-every", type=int, default=3, help="with --lora: one typed row per N spoken ones")
    p.add_argument("--work", default="runs/spoken-vqa")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not (Path(args.vision) / "chiasm_config.json").is_file():
        print(f"{args.vision}: no saved model; run `chiasm demo` first (it writes runs/demo/model)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tick = time.perf_counter()
    work = Path(args.work)
    hear_batch = args.ctc_batch if args.hear == "ctc" else args.batch
    n_hear = min(args.hear_steps * hear_batch, args.max_hear_clips)
    n_hear, n_answer = (hear_batch, 8) if args.quick else (n_hear, args.answer_steps * args.batch)
    files = build_data(Path(args.world), work, n_hear=n_hear, n_answer=n_answer, heldout_voice=args.heldout_voice,
                       typed_every=args.typed_every if args.lora else 0,
                       voices=TRAIN_VOICES + (MORE_VOICES if args.voices == 7 else ()),
                       foreign=tuple(v for v in args.foreign_voices.split(",") if v), warp=args.warp)
    data_s = time.perf_counter() - tick
    model = VisionLanguageModel.load(args.vision)
    bridge = BridgeConfig("pooling", {"kernel": [1, args.kernel]}) if args.bridge == "pooling" \
        else BridgeConfig("pixel_shuffle", {"factor": [1, args.kernel]})
    model = attach_hearing(model, AudioConfig(args.whisper, args.seconds, bridge))
    steps = (2, 2) if args.quick else (args.hear_steps, args.answer_steps)
    cfg = RunConfig(model=model.config, stages=stages(files, work, hear_steps=steps[0], answer_steps=steps[1],
                                                      batch=args.batch, lr=args.lr, lora=args.lora, hear=args.hear,
                                                      ctc_batch=args.ctc_batch, ctc_lr=args.ctc_lr),
                    output_dir=str(work / "run"), precision="fp32")
    from chiasm.train.trainer import Trainer

    t0 = time.perf_counter()
    model = Trainer(cfg, model=model).run()
    train_s = time.perf_counter() - t0
    model.save(work / "model")  # a model folder that hears: chat, eval and serve load it
    typed = load_llava(Path(args.world) / "eval.json").samples
    spoken = load_llava(files["spoken"], allow_outside_root=True).samples
    trained_voices = load_llava(files["spoken_trained_voices"], allow_outside_root=True).samples
    if args.quick:
        typed, spoken, trained_voices = typed[:10], spoken[:10], trained_voices[:10]
    t0 = time.perf_counter()
    results = {}
    for name, samples in (("typed", typed), ("spoken", spoken), ("spoken_trained_voices", trained_voices)):
        preds = answer(model, samples, batch_size=16, max_new_tokens=6, desc=name)
        results[name] = score(samples, preds, "synthetic")
        results[name]["examples"] = [{"id": s.id, "question": s.meta.get("spoken", s.conversations[0].text),
                                      "answer": s.conversations[1].text, "predicted": pr}
                                     for s, pr in list(zip(samples, preds, strict=True))[:12]]
    prompts = [Sample("t", [Turn("human", f"<audio>\n{TRANSCRIBE}")], audios=s.audios) for s in spoken[:8]]
    heard = answer(model, prompts, batch_size=8, max_new_tokens=16, desc="transcribing")
    eval_s = time.perf_counter() - t0
    typed_acc, spoken_acc = results["typed"]["overall"], results["spoken"]["overall"]
    out = {
        "vision": args.vision, "whisper": args.whisper, "seconds": args.seconds, "kernel": args.kernel,
        "bridge": args.bridge, "hear": args.hear,
        "tokens_per_clip": model.tokens_per_audio, "steps": {"hear": steps[0], "answer": steps[1]},
        "batch": args.batch, "heldout_voice": args.heldout_voice, "voices": args.voices,
        "foreign_voices": args.foreign_voices, "lr": args.lr,
        "lm_lora": args.lora,
        "typed_every": args.typed_every if args.lora else 0,
        "typed": {k: v for k, v in results["typed"].items() if k not in ("scores", "hits")},
        "spoken": {k: v for k, v in results["spoken"].items() if k not in ("scores", "hits")},
        "spoken_trained_voices": {k: v for k, v in results["spoken_trained_voices"].items()
                                  if k not in ("scores", "hits")},
        "transcripts": [{"said": s.meta["spoken"], "heard": h} for s, h in zip(spoken, heard, strict=False)],
        "seconds_taken": {"data": round(data_s, 1), "train": round(train_s, 1), "eval": round(eval_s, 1),
                          "total": round(time.perf_counter() - tick, 1)},
        "targets": {"spoken_within_10_points_of_typed": spoken_acc >= typed_acc - 0.10,
                    "run_under_15_minutes": time.perf_counter() - tick < 900},
        "command": "benchmarks/spoken_vqa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"typed {typed_acc:.1%}  spoken {spoken_acc:.1%}  (held-out voice {args.heldout_voice}); "
          f"train {train_s / 60:.1f} min, total {(time.perf_counter() - tick) / 60:.1f} min")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"spoken_vqa{args.tag}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
