"""Targets of high resolution, several images, video and grounding, each measured and written as JSON.

* ``small_objects``: the same encoder + bridge + LM and training budget, tiled (global view +
  tiles) vs the single view; target: tiled >= single + 20 points of VQA accuracy;
* ``gui``: GUI grounding on held-out screens, Acc@0.5 >= 70%, EfficientNet-Lite0 + SmolLM2-135M
  trained in under 20 minutes on a CPU;
* ``which_image`` / ``what_changed``: >= 80% on held-out questions, and every image blanked
  within chance + 10 points;
* ``overhead``: a training step on tiled images vs the same number of views as a plain batch of
  images; target: at most 10% more time.

Run (offline; the LM is the packaged SmolLM2-135M-Instruct): ``python benchmarks/seeing_targets.py
--only overhead --out results.json``; ``--quick`` shrinks every world and budget for a smoke run
whose numbers mean nothing. Timing on a machine shared with other jobs is noisy: say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from chiasm.config import RunConfig, from_dict
from chiasm.data.sample import Sample, Turn
from chiasm.highres.tiling import TilingConfig
from chiasm.model import VisionLanguageModel

LM = "packaged:smollm2-135m-instruct"
LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_config(train: Path, evaluation: Path, out: Path, *, tiling: dict | None, image_size: int, steps: int,
               scorer: str, max_new_tokens: int, batch_size: int = 8, grid: int | None = None,
               align: tuple[Path, int] | None = None, prealign: tuple[Path, float, int] | None = None,
               upsample: int = 1, instruct_bridge: str = "full") -> RunConfig:
    """EfficientNet-Lite0 -> MLP bridge -> SmolLM2 (LoRA), one instruct stage of ``steps`` steps.

    ``grid``: the encoder's token grid per view (its last map average-pooled to grid x grid), so
    a tiled image costs the LM views x grid^2 positions rather than views x 49. ``align`` (data,
    steps): a first stage where only the bridge learns, on that data (LLaVA's stage 1).
    ``prealign`` (data, epochs, batch size): before it, the ``words`` objective (each image's tokens regress
    onto its caption's word embeddings; no LM pass). ``upsample``: tokens per feature cell, per side.
    ``instruct_bridge``: the bridge's mode in the instruct stage; ``frozen`` keeps pre-aligned tokens
    the words they became (Adam's steps of lr 5e-4 move them off within a few dozen steps).
    """
    encoder: dict = {"name": "efficientnet-lite0", "image_size": image_size}
    if grid:
        encoder["options"] = {"grid": grid}
    model = {"system_prompt": "You are a helpful assistant.", "encoder": encoder,
             "bridge": {"name": "mlp", "options": {"norm": True, "pos_dim": 32, "upsample": upsample}},
             "lm": {"source": LM},
             "tiling": tiling}
    stage = {"name": "instruct", "data": str(train), "max_steps": steps, "batch_size": batch_size, "lr": 5e-4,
             "encoder": {"mode": "frozen"}, "bridge": {"mode": instruct_bridge},
             "lm": {"mode": "lora", "lora_r": 8, "lora_alpha": 16, "lr": 3e-4, "lora_targets": LORA}}
    stages = [stage]
    if align:
        stages.insert(0, {"name": "align", "data": str(align[0]), "max_steps": align[1], "batch_size": batch_size,
                          "lr": 1e-3, "encoder": {"mode": "frozen"}, "bridge": {"mode": "full"},
                          "lm": {"mode": "frozen"}})
    if prealign:
        stages.insert(0, {"name": "prealign", "data": str(prealign[0]), "objective": "words",
                          "epochs": prealign[1], "batch_size": prealign[2], "lr": 1e-3, "encoder": {"mode": "frozen"},
                          "bridge": {"mode": "full"}, "lm": {"mode": "frozen"}})
    return from_dict(RunConfig, {"model": model, "stages": stages, "output_dir": str(out), "precision": "fp32",
                                 "eval": {"data": str(evaluation), "batch_size": 16, "retention_prompts": 1,
                                          "retention_tokens": 256, "max_new_tokens": max_new_tokens,
                                          "scorer": scorer}})


def train_and_eval(cfg: RunConfig) -> dict:
    from chiasm.eval.evaluate import evaluate
    from chiasm.train.trainer import Trainer

    t0 = time.perf_counter()
    model = Trainer(cfg).run()
    train_s = time.perf_counter() - t0
    res = evaluate(model, cfg.eval, out_dir=Path(cfg.output_dir))
    return {"train_s": train_s, "vqa": res["vqa"]["overall"], "blank": res["blank"]["overall"],
            "chance": res["chance"]["overall"], "grounding": res.get("grounding")}


def world_target(kind: str, work: Path, quick: bool, *, steps: int = 300, grid: int | None = 3,
                 max_tiles: int = 9, separators: str = "row_end", batch_size: int = 8,
                 n_train: int = 2000, align_steps: int = 0, prealign_epochs: float = 0.0,
                 upsample: int = 1, instruct_bridge: str = "full") -> dict:
    """Train and evaluate on world ``kind``; small_objects twice (single view, tiled) on one budget.

    ``align_steps``: that many bridge-only steps on the world's ``captions.json`` first (which_image);
    ``prealign_epochs``: before those, epochs of the ``words`` objective on the same captions.
    """
    from chiasm.synthetic.gui import make_gui_world
    from chiasm.synthetic.seeing import make_seeing_world

    n_train, n_eval = (24, 8) if quick else (n_train, 100)
    steps = 3 if quick else steps
    if kind == "gui":
        files = make_gui_world(work / kind, n_train=n_train, n_eval=n_eval)
    else:
        files = make_seeing_world(kind, work / kind, n_train=n_train, n_eval=n_eval)
    tiled = {"mode": "aspect", "max_tiles": max_tiles, "separators": separators}
    runs = {}
    if kind == "small_objects":
        variants = {"single_view": None, "tiled": tiled}
    elif kind == "gui":
        variants = {"tiled": tiled}
    else:
        variants = {"single_view": None}
    if (align_steps or prealign_epochs) and "captions" not in files:
        raise ValueError(f"--align-steps and --prealign-epochs need a world with captions.json (which_image), "
                         f"not {kind!r}")
    align = (files["captions"], 3 if quick else align_steps) if align_steps else None
    prealign = (files["captions"], 1.0 if quick else prealign_epochs, 8 if quick else 64) if prealign_epochs else None
    for name, tiling in variants.items():
        cfg = run_config(files["train"], files["eval"], work / f"{kind}-{name}", tiling=tiling, image_size=224,
                         steps=steps, scorer="iou" if kind == "gui" else "exact",
                         max_new_tokens=24 if kind == "gui" else 8, batch_size=batch_size, grid=grid, align=align,
                         prealign=prealign, upsample=upsample, instruct_bridge=instruct_bridge)
        runs[name] = {**train_and_eval(cfg), "steps": steps, "batch_size": batch_size, "grid": grid,
                      "upsample": upsample, "instruct_bridge": instruct_bridge, "tiling": tiling, "n_train": n_train,
                      "align_steps": align[1] if align else 0, "prealign_epochs": prealign[1] if prealign else 0}
    return runs


def overhead(work: Path, quick: bool, tiny: bool = False, separators: str = "markers") -> dict:
    """Train-step time: tiled images (views + separators) vs the same views as plain separate images.

    ``tiny``: a 64-pixel tiny-vit and a 2-layer random LM in place of EfficientNet-Lite0 + SmolLM2
    (the step is then dominated by what tiling adds, the harshest case for the ratio).
    """
    from PIL import Image

    from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig

    work.mkdir(parents=True, exist_ok=True)
    size = 64 if tiny else 224
    if tiny:
        from chiasm.testing import make_tiny_lm

        base = ModelConfig(encoder=EncoderConfig(name="tiny-vit", image_size=size, options={"patch": 16, "dim": 32}),
                           bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(make_tiny_lm(work / "lm"))))
    else:
        base = ModelConfig(encoder=EncoderConfig(name="efficientnet-lite0", image_size=size),
                           bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=LM))
    wide = work / "wide.png"
    Image.effect_noise((2 * size * 2, size * 2), 60).convert("RGB").save(wide)  # 2:1 -> 1 x 2 grid, 3 views
    view_paths = []
    for k in range(3):
        view_paths.append(work / f"view-{k}.png")
        Image.effect_noise((size, size), 60).convert("RGB").save(view_paths[-1])
    rows = 2 if quick else 4
    tiling = TilingConfig(mode="aspect", max_tiles=4, separators=separators)  # type: ignore[arg-type]
    tiled_model = VisionLanguageModel.build(replace(base, tiling=tiling))
    plain_model = VisionLanguageModel.build(base)
    plain_model.load_state_dict(tiled_model.state_dict())
    q = [Turn("human", "<image>\nWhat is shown?"), Turn("gpt", "noise")]
    tiled_batch = tiled_model.processor.collate(tiled_model.processor.prepare(
        [Sample(f"t{i}", q, [wide]) for i in range(rows)])[0])
    qp = [Turn("human", "<image><image><image>\nWhat is shown?"), Turn("gpt", "noise")]
    plain_batch = plain_model.processor.collate(plain_model.processor.prepare(
        [Sample(f"p{i}", qp, view_paths) for i in range(rows)])[0])
    assert tiled_batch.pixels.shape == plain_batch.pixels.shape

    def step(model: VisionLanguageModel, batch) -> float:
        t0 = time.perf_counter()
        out = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"tiled": [], "plain": []}
    for k in range(2 + (3 if quick else 10)):  # interleaved, first two are warm-up
        for name, model, batch in (("tiled", tiled_model, tiled_batch), ("plain", plain_model, plain_batch)):
            t = step(model, batch)
            if k >= 2:
                times[name].append(t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    parts = "tiny-vit + 2-layer LM" if tiny else "efficientnet-lite0 + SmolLM2-135M"
    return {"separators": separators, "parts": parts, "rows": rows,
            "views_per_row": 3, "tiled_s": med["tiled"], "plain_s": med["plain"],
            "overhead": med["tiled"] / med["plain"] - 1, "tokens": {
                "tiled": int(tiled_batch.input_ids.shape[1]), "plain": int(plain_batch.input_ids.shape[1])}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="seeing_targets.json")
    p.add_argument("--only", choices=["overhead", "small_objects", "gui", "which_image", "what_changed"])
    p.add_argument("--quick", action="store_true", help="tiny worlds and budgets: a smoke run, not a measurement")
    p.add_argument("--tiny", action="store_true", help="overhead with tiny random parts (fast, harsher ratio)")
    p.add_argument("--separators", choices=["markers", "row_end", "none"], default="row_end",
                   help="what the tiled images write between views")
    p.add_argument("--work", help="folder for worlds and runs (default: a temporary one)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each world run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid", type=int, default=3, help="visual tokens per view: grid x grid (0: the map's own 7 x 7)")
    p.add_argument("--max-tiles", type=int, default=9)
    p.add_argument("--n-train", type=int, default=2000, help="training images (GUI: screens, two questions each)")
    p.add_argument("--align-steps", type=int, default=0,
                   help="bridge-only steps on the world's captions.json before the instruct stage (which_image)")
    p.add_argument("--prealign-epochs", type=float, default=0.0,
                   help="epochs of the words pre-alignment on captions.json before everything (which_image)")
    p.add_argument("--upsample", type=int, default=1, help="visual tokens per feature cell, per side (MLP bridge)")
    p.add_argument("--instruct-bridge", choices=["full", "frozen"], default="full",
                   help="the bridge in the instruct stage (frozen: pre-aligned tokens stay words)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seeing-"))
    names = [args.only] if args.only else ["overhead", "small_objects", "gui", "which_image", "what_changed"]
    results: dict = {"quick": args.quick}
    for name in names:
        t0 = time.perf_counter()
        if name == "overhead":
            results[name] = overhead(work / name, args.quick, args.tiny, args.separators)
        else:
            results[name] = world_target(name, work, args.quick, steps=args.steps, grid=args.grid or None,
                                         max_tiles=args.max_tiles, separators=args.separators,
                                         batch_size=args.batch_size, n_train=args.n_train,
                                         align_steps=args.align_steps, prealign_epochs=args.prealign_epochs,
                                         upsample=args.upsample, instruct_bridge=args.instruct_bridge)
        results[name]["wall_s"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps(results[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
