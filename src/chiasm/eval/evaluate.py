"""``chiasm eval``: VQA accuracy, image reliance and language retention in one report."""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from chiasm.config import EvalConfig
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError
from chiasm.eval import retention, vqa
from chiasm.eval.scorers import get_scorer
from chiasm.features import FeatureCache
from chiasm.lm.loader import load_language_model
from chiasm.model import VisionLanguageModel

log = logging.getLogger(__name__)


class BaseLM:
    """The untrained LM to compare against: the LoRA-disabled view if possible, else a fresh load.

    The LoRA-disabled view is still the LM with the bridge's modules installed in it, so the
    bridge is bypassed too (gated cross-attention's dense blocks act on text alone).
    """

    def __init__(self, model: VisionLanguageModel):
        self.model = model
        self._loaded = None
        self._stack: ExitStack | None = None

    def __enter__(self):
        lm = self.model.lm
        if hasattr(lm, "disable_adapter"):
            self._stack = ExitStack()
            self._stack.enter_context(lm.disable_adapter())
            self._stack.enter_context(self.model.bridge.bypassed())
            return lm
        if self._loaded is None:
            cfg = self.model.config
            self._loaded, _ = load_language_model(cfg.lm.source, dtype=self.model.base_lm.dtype,
                                                  attn_implementation=cfg.attn_implementation,
                                                  trust_remote_code=cfg.lm.trust_remote_code)
            self._loaded.to(self.model.device).eval()
        return self._loaded

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.__exit__(*exc)
            self._stack = None


def retention_report(model: VisionLanguageModel, cfg: EvalConfig, base: dict | None = None) -> dict:
    """Perplexity and greedy-answer agreement of the model's LM vs. the base LM (text only)."""
    text = retention.held_out_text()
    prompts = retention.TEXT_PROMPTS[: cfg.retention_prompts]
    tok = model.tokenizer
    lm = model.lm.eval()
    ppl, n_tok = retention.perplexity(lm, tok, text, max_tokens=cfg.retention_tokens)
    answers = retention.greedy_answers(lm, tok, prompts)
    if base is None:
        with BaseLM(model) as base_lm:
            base_ppl, _ = retention.perplexity(base_lm, tok, text, max_tokens=cfg.retention_tokens)
            base_answers = retention.greedy_answers(base_lm, tok, prompts)
        base = {"ppl": base_ppl, "answers": base_answers}
    same = sum(a == b for a, b in zip(answers, base["answers"], strict=True))
    return {"base_ppl": base["ppl"], "model_ppl": ppl, "ppl_ratio": ppl / base["ppl"],
            "unchanged_share": same / len(prompts), "n_prompts": len(prompts), "n_tokens": n_tok,
            "base": base, "answers": answers}


def evaluate(model: VisionLanguageModel, cfg: EvalConfig, out_dir: Path | None = None,
             base: dict | None = None, n_examples: int = 24) -> dict:
    """Run every evaluation; write ``eval.json`` into ``out_dir`` if given."""
    timings = {}
    results: dict = {"model": type(model.bridge).__name__}
    if cfg.data:
        t0 = time.perf_counter()
        samples = eval_samples(cfg)
        work = Path(out_dir or Path(cfg.data).parent) / "cache"
        blank = vqa.blank_image(work, model.encoder.image_size)
        with torch.no_grad():
            paths = [str(p) for s in samples for p in s.images] + [str(blank)]
            owners = {str(p): (s.source, s.id) for s in reversed(samples) for p in s.images}
            # A tiled image is several views, encoded with its batch rather than cached as one row.
            feats = None if model.config.tiling is not None else FeatureCache.build(
                model.encoder, paths, cache_dir=None, show_progress=False, preprocess=model.processor.image,
                owners=owners)
        preds = vqa.answer(model, samples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                           features=feats, desc="VQA")
        blank_preds = vqa.answer(model, samples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                 features=feats, override_image=str(blank), desc="VQA blank image")
        scored, blank_scored = vqa.score(samples, preds, cfg.scorer), vqa.score(samples, blank_preds, cfg.scorer)
        results["chance"] = vqa.chance(samples)
        results["vqa"] = {k: v for k, v in scored.items() if k not in ("hits", "scores")}
        results["blank"] = {k: v for k, v in blank_scored.items() if k not in ("hits", "scores")}
        results["reliance"] = vqa.reliance_verdict(scored["overall"], blank_scored["overall"],
                                                   results["chance"]["overall"])
        if cfg.scorer == "iou":  # grounding: Acc@0.5 and mean IoU, boxes drawn on the report's images
            from chiasm.grounding.draw import draw_prediction
            from chiasm.grounding.scorer import grounding_summary

            results["grounding"] = grounding_summary(samples, preds)
        step = max(1, len(samples) // n_examples)
        shown = list(zip(samples, preds, scored["hits"], strict=True))[::step][:n_examples]
        drawn = {}
        if cfg.scorer == "iou" and out_dir is not None:
            drawn = {s.id: draw_prediction(s, p, Path(out_dir) / "boxes" / f"{k:04d}.png")
                     for k, (s, p, _) in enumerate(shown)}
        results["samples"] = [
            {"image": str(drawn.get(s.id) or (s.images[0] if s.images else "")),
             "question": s.conversations[-2].text.replace(
                "<image>", "").strip() if len(s.conversations) >= 2 else "", "answer": p,
             "truth": vqa.truth_of(s), "correct": h, "question_type": s.meta.get("question_type", "")}
            for s, p, h in shown]
        timings["vqa_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["retention"] = retention_report(model, cfg, base)
    timings["retention_s"] = time.perf_counter() - t0
    results["timings"] = timings
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def eval_samples(cfg: EvalConfig) -> list:
    """The eval set's samples (at most max_samples), each with a reference answer that can be scored."""
    samples = load_llava(cfg.data, cfg.image_root, allow_outside_root=cfg.allow_outside_image_root).samples
    if not samples:  # an accuracy over nothing would read as a result
        raise DataError("no samples to evaluate; give a data file with at least one question", source=cfg.data)
    samples = samples[: cfg.max_samples] if cfg.max_samples else samples
    scorer = get_scorer(cfg.scorer)
    for s in samples:  # a reference answer that cannot be scored fails before any answer is generated
        scorer.check(s)
    return samples


def vqa_accuracy(model: VisionLanguageModel, cfg: EvalConfig) -> dict:
    """With-image VQA accuracy alone (overall, per type, n): no blank-image control, no retention.

    For asking the same images again in other words, where the controls of :func:`evaluate`
    would only repeat what the first wording measured.
    """
    samples = eval_samples(cfg)
    with torch.no_grad():
        owners = {str(p): (s.source, s.id) for s in reversed(samples) for p in s.images}
        feats = None if model.config.tiling is not None else FeatureCache.build(
            model.encoder, list(owners), cache_dir=None, show_progress=False, preprocess=model.processor.image,
            owners=owners)
    preds = vqa.answer(model, samples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                       features=feats, desc="VQA (other wording)")
    scored = vqa.score(samples, preds, cfg.scorer)
    return {k: v for k, v in scored.items() if k not in ("hits", "scores")}
