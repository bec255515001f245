"""Training throughput of chiasm's from-scratch CLIP against open_clip's on the same model.

Both models hold the same weights (chiasm's towers use open_clip's layout; the weights are
copied through chiasm's open_clip export), see the same images and token ids, and take an
AdamW step with the same settings, in the same precision. Before timing, the two losses are
checked equal. open_clip's step is the core of its own training loop (``open_clip_train``):
``model(images, texts)``, ``ClipLoss``, backward, optimizer step, clamp of the logit scale.

Text is padded to the full context on both sides (open_clip always does); chiasm's trainer pads
only to the longest caption of a batch, shown in its own row.

Run: ``python benchmarks/clip_throughput.py --size small --out results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.openclip_ref import load
from chiasm.clip.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from chiasm.clip.export_openclip import open_clip_config, open_clip_state
from chiasm.clip.model import ClipModel
from chiasm.clip.tokenizer import CaptionTokenizer

SIZES = {  # (image size, patch, width, layers) for the image tower; (context, width, layers) for text
    "tiny": ((16, 4, 64, 2), (16, 64, 2), 64),
    "small": ((32, 4, 256, 6), (32, 256, 6), 256),
    "base": ((224, 32, 768, 12), (77, 512, 12), 512),
}


def build(size: str, vocab_words: int = 3000) -> ClipModel:
    (img, patch, w, layers), (ctx, tw, tl), embed = SIZES[size]
    words = [f"w{i}" for i in range(vocab_words)]
    tok = CaptionTokenizer.train([" ".join(words[i: i + 20]) for i in range(0, vocab_words, 20)], vocab_words + 10, ctx)
    cfg = ClipModelConfig(image=ImageTowerConfig(image_size=img, patch_size=patch, width=w, layers=layers,
                                                 head_width=64 if w >= 256 else 32),
                          text=TextTowerConfig(context_length=ctx, width=tw, layers=tl, heads=max(1, tw // 64)),
                          embed_dim=embed)
    torch.manual_seed(0)
    return ClipModel(cfg, tok)


def reference(model: ClipModel):
    oc = load("model").CLIP(**open_clip_config(model)["model_cfg"], output_dict=True)
    oc.load_state_dict(open_clip_state(model), strict=False)
    return oc


def batch(model: ClipModel, rows: int, full_context: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, ctx = model.config.image.image_size, model.config.text.context_length
    pixels = torch.randn(rows, 3, s, s, generator=g)
    lengths = torch.randint(4, ctx // 2, (rows,), generator=g)
    ids = torch.full((rows, ctx), model.tokenizer.pad_id)
    for r, n in enumerate(lengths.tolist()):
        ids[r, :n] = torch.randint(3, model.tokenizer.vocab_size, (n,), generator=g)
        ids[r, n] = model.tokenizer.eos_id
    mask = (torch.arange(ctx)[None] <= lengths[:, None]).long()
    if not full_context:
        width = int(lengths.max()) + 1
        ids, mask = ids[:, :width], mask[:, :width]
    return pixels, ids, mask


def chiasm_step(model: ClipModel, opt, pixels, ids, mask, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, mask, pixels=pixels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def open_clip_step(oc, loss_fn, opt, pixels, ids, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = oc(pixels, ids)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        oc.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def run(size: str, rows: int, steps: int, precision: str) -> dict:
    model = build(size)
    oc = reference(model)
    loss_fn = load("loss").ClipLoss()
    bf16 = precision == "bf16"
    pixels, ids, mask = batch(model, rows, full_context=True)
    with torch.no_grad():
        mine = float(model(ids, mask, pixels=pixels))
        out = oc(pixels, ids)
        theirs = float(loss_fn(out["image_features"], out["text_features"], out["logit_scale"]))
    if abs(mine - theirs) > 1e-4 * max(1.0, abs(theirs)):
        raise AssertionError(f"the two models disagree before timing: loss {mine} vs {theirs}")
    kw = {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1}
    opts = {"chiasm": torch.optim.AdamW(model.parameters(), **kw),
            "open_clip": torch.optim.AdamW(oc.parameters(), **kw)}
    short = batch(model, rows, full_context=False)
    runs = {
        "open_clip": lambda: open_clip_step(oc, loss_fn, opts["open_clip"], pixels, ids, bf16),
        "chiasm": lambda: chiasm_step(model, opts["chiasm"], pixels, ids, mask, bf16),
        "chiasm, text padded to the batch": lambda: chiasm_step(model, opts["chiasm"], short[0], short[1], short[2],
                                                                bf16),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(steps):  # interleaved, so drifts in machine load hit every row alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"size": size, "batch": rows, "precision": precision, "steps": steps, "loss_check": [mine, theirs],
            "rows": [{"implementation": k, "seconds_per_step": med[k], "pairs_per_second": rows / med[k],
                      "vs_open_clip": med["open_clip"] / med[k]} for k in runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    result = run(args.size, args.batch, args.steps, args.precision)
    print(f"CLIP training step, size {args.size}, batch {args.batch}, {args.precision}, median of {args.steps}")
    print(f"{'implementation':<36}{'s/step':>9}{'pairs/s':>10}{'vs open_clip':>14}")
    for r in result["rows"]:
        print(f"{r['implementation']:<36}{r['seconds_per_step']:>9.3f}{r['pairs_per_second']:>10.1f}"
              f"{r['vs_open_clip']:>13.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
