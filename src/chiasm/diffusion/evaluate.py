"""Measure a trained model against the held-out split: the guidance sweep and the sampler comparison.

Every number is computed against the test split (never seen in training) with a classifier
that chiasm trained on the same domain; FID is named for its feature extractor (FID-FMNIST).
Samples are drawn per class in equal numbers, so recognition is not skewed by an easy class.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from chiasm.diffusion.classifier import Judge
from chiasm.diffusion.data import ImageSet
from chiasm.diffusion.metrics import frechet_distance, precision_recall, recognition_rate
from chiasm.diffusion.model import DiffusionModel
from chiasm.diffusion.sampler import SampleOptions

log = logging.getLogger(__name__)

FID_NAMES = {"fashion-mnist": "FID-FMNIST", "digits": "FID-DIGITS", "synthetic": "FID-SYNTH", "folder": "FID-FOLDER"}


def balanced_labels(n: int, num_classes: int) -> list[int]:
    """0, 1, ..., C-1, 0, 1, ...: ``n`` labels with every class equally often (up to one)."""
    return [i % num_classes for i in range(n)]


def class_labels(model: DiffusionModel, n: int) -> list[int] | None:
    """``n`` balanced labels for a class-conditional model; None for any other."""
    return balanced_labels(n, len(model.classes)) if model.cfg.net.conditioning == "class" else None


def generate_batched(model: DiffusionModel, labels: list[int] | None, n: int, opts: SampleOptions, seed: int,
                     batch: int = 250, prompts: list[str] | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        j = min(n, i + batch)
        out.append(model.generate(j - i, opts, labels=labels[i:j] if labels is not None else None,
                                  prompts=prompts[i:j] if prompts is not None else None, generator=gen))
    return torch.cat(out)


def score(samples: torch.Tensor, labels: list[int] | None, judge: Judge, real_feats: torch.Tensor,
          fid_name: str) -> dict[str, float]:
    """FID, precision, recall and (with labels) the recognition rate of a batch of samples."""
    feats = judge.features(samples)
    precision, recall = precision_recall(real_feats[: len(feats) * 2], feats)
    row = {fid_name: frechet_distance(real_feats, feats), "precision": precision, "recall": recall}
    if labels is not None:
        row["recognition"] = recognition_rate(judge.predict(samples), torch.tensor(labels))
    return row


def run_eval(model: DiffusionModel, judge: Judge, test: ImageSet, out: Path, *, guidances: list[float],
             n: int, opts: SampleOptions, seed: int = 0, compare_ddpm: bool = False,
             ddpm_steps: int = 1000, compare_n: int | None = None,
             compare_etas: tuple[float, ...] = (0.0,), compare_seeds: int = 1) -> dict[str, Any]:
    """The w sweep (one row per guidance scale) and optionally DDIM against DDPM at ``opts.guidance``.

    The comparison draws DDIM at each of ``compare_etas`` (0: the deterministic ODE sampler; 1:
    as much fresh noise per step as DDPM's posterior, over the same 50 strided steps), all from
    the same seed, and gives each one's FID ratio to DDPM's (eta 0 is always drawn), over
    ``compare_seeds`` seeds (see :func:`compare_samplers`).
    """
    out.mkdir(parents=True, exist_ok=True)
    fid_name = FID_NAMES.get(model.cfg.data.source, "FID")
    real_feats = judge.features(test.images)
    labels = class_labels(model, n)
    prompts = scenes = None
    if model.cfg.net.conditioning == "text":  # the held-out captions, scored by the pixel checker too
        prompts = [test.captions[i % len(test)] for i in range(max(n, compare_n or n))]
        scenes = [test.scenes[i % len(test)] for i in range(n)]
    result: dict[str, Any] = {"fid_name": fid_name, "n_samples": n, "n_real": len(test),
                              "classifier_test_accuracy": judge.info.get("test_accuracy"), "sweep": []}
    for w in guidances:
        o = replace(opts, guidance=w)
        tick = time.perf_counter()
        samples = generate_batched(model, labels, n, o, seed, prompts=prompts[:n] if prompts else None)
        row = {"guidance": w, **score(samples, labels, judge, real_feats, fid_name), **asdict(o),
               "seconds": round(time.perf_counter() - tick, 1)}
        if scenes is not None:
            from chiasm.diffusion.checker import check

            row.update(check(samples, scenes))
        result["sweep"].append(row)
        _save_grid(samples, labels, len(model.classes), out / f"grid_w{w:g}.png")
        log.info("w=%g %s=%.2f recognition=%s precision=%.3f recall=%.3f (%.0f s)", w, fid_name,
                 row[fid_name], row.get("recognition"), row["precision"], row["recall"], row["seconds"])
    if compare_ddpm:
        result["samplers"] = compare_samplers(model, judge, real_feats, fid_name, prompts, opts,
                                              n=compare_n or n, seed=seed, ddpm_steps=ddpm_steps,
                                              etas=compare_etas, seeds=compare_seeds)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare_samplers(model: DiffusionModel, judge: Judge, real_feats: torch.Tensor, fid_name: str,
                     prompts: list[str] | None, opts: SampleOptions, *, n: int,
                     seed: int, ddpm_steps: int, etas: tuple[float, ...], seeds: int = 1) -> dict[str, Any]:
    """DDIM (``opts.steps``, each eta) against ``ddpm_steps``-step DDPM, every sampler from the same seeds.

    FID on a few hundred samples moves by several points from one seed to the next (on digits,
    DDPM 1,000 gave 19.2 and 23.4 at seeds 1 and 2), so with ``seeds`` > 1 each sampler is drawn
    at every seed; a row holds the mean of each metric and the per-seed FIDs, and each ratio is
    the mean FID over the mean DDPM FID (per-seed ratios beside it).
    """
    if seeds < 1:
        raise ValueError(f"the comparison needs at least one seed, got {seeds}")
    labels = class_labels(model, n)
    if prompts and len(prompts) < n:
        raise ValueError(f"the comparison draws {n} samples but has {len(prompts)} prompts")
    prompts = prompts[:n] if prompts else None
    etas = (0.0, *sorted({e for e in etas if e != 0}))  # eta 0 always: the plain "ddim" row
    runs = [("ddim" if eta == 0 else f"ddim_eta{eta:g}", replace(opts, sampler="ddim", eta=eta)) for eta in etas]
    rows: dict[str, Any] = {}
    for name, o in [*runs, ("ddpm", replace(opts, sampler="ddpm", steps=ddpm_steps, eta=0.0))]:
        tick = time.perf_counter()
        scores = [score(generate_batched(model, labels, n, o, seed + 1 + k, prompts=prompts), labels, judge,
                        real_feats, fid_name) for k in range(seeds)]
        rows[name] = {key: sum(sc[key] for sc in scores) / seeds for key in scores[0]}
        rows[name].update({"network_evaluations": o.steps * (2 if o.guidance else 1), "steps": o.steps,
                           "eta": o.eta, "spacing": o.spacing, "seconds": round(time.perf_counter() - tick, 1)})
        if seeds > 1:
            rows[name][f"{fid_name}_per_seed"] = [sc[fid_name] for sc in scores]
        log.info("%s %d steps: %s=%.2f (%.0f s)", name, o.steps, fid_name, rows[name][fid_name],
                 rows[name]["seconds"])
    ddpm = rows["ddpm"]
    for name, _ in runs:
        key = "fid_ratio" if name == "ddim" else f"fid_ratio_{name.removeprefix('ddim_')}"
        rows[key] = rows[name][fid_name] / ddpm[fid_name]
        if seeds > 1:
            rows[f"{key}_per_seed"] = [a / b for a, b in zip(rows[name][f"{fid_name}_per_seed"],
                                                               ddpm[f"{fid_name}_per_seed"], strict=True)]
    rows["seeds"] = seeds
    return rows


def _save_grid(samples: torch.Tensor, labels: list[int] | None, num_classes: int, path: Path) -> None:
    """Up to 8 rows; with labels one column per class (class c's samples down column c)."""
    from chiasm.diffusion.pictures import save_image_grid

    if not labels:
        save_image_grid(samples[: 8 * num_classes], path, columns=min(8, len(samples)))
        return
    per = {c: [i for i, y in enumerate(labels) if y == c] for c in range(num_classes)}
    rows = min(8, min(len(v) for v in per.values()))
    if rows == 0:
        return
    save_image_grid(torch.stack([samples[per[c][r]] for r in range(rows) for c in range(num_classes)]), path,
                    columns=num_classes)
