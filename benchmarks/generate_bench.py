"""Generation speed: the engine's batched requests vs one at a time, and its decoding vs transformers' generate.

Two measurements in one run, on a model of random weights in the shape of a real one
(``--size``; the CLIP tower, MLP bridge and Llama LM of ``benchmarks.common``):

* ``batched``: 8 requests with images (1 or 2 each, prompts of different lengths) answered
  by one ``Engine.generate`` call, against the same 8 answered one call each. Tokens/s is
  the generated tokens over the wall time of the whole set, images and prefill included.
* ``decode``: one prompt, decode tokens/s = (N - 1) new tokens over time(N tokens) -
  time(1 token), for the engine (its full path: image, prefill, sampling rule, streamed
  text) and for ``lm.generate`` on the same prompt embeddings with the same LM (greedy,
  KV cache). Subtracting the one-token run leaves the per-token cost of each loop.

The weights are random, so end-of-turn tokens are ignored: every request runs its full
token budget on both sides. Timings are interleaved (``benchmarks.common.time_interleaved``)
and the median is reported.

    python benchmarks/generate_bench.py --size small --threads 1 --out gen.json
    python benchmarks/generate_bench.py --size tiny --new-tokens 4 --repeats 1   # smoke run, seconds
    python benchmarks/generate_bench.py --size real --device cuda --dtype bf16 --out gen.json

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository

from benchmarks.common import LMShape, TowerShape, build_vlm, median, resolve_device, time_interleaved
from chiasm.data.sample import Turn
from chiasm.generation import Engine, Request, SamplingParams
from chiasm.generation.checks import prepare
from chiasm.model import VisionLanguageModel

WORDS = ("what colour is the circle square triangle where how many objects are there describe the image "
         "left right top bottom small large red green blue yellow").split()


@dataclass(frozen=True)
class Size:
    tower: TowerShape
    lm: LMShape


SIZES = {
    "tiny": Size(TowerShape("clip", 32, 2, 2, 64, image_size=64, patch=16), LMShape("llama", 64, 2, 4, 2, 128, 1024)),
    "small": Size(TowerShape("clip", 256, 4, 4, 1024), LMShape("llama", 256, 4, 4, 2, 768, vocab=49152)),
    # CLIP-ViT-B/16 and SmolLM2-135M shapes.
    "real": Size(TowerShape("clip", 768, 12, 12, 3072), LMShape("llama", 576, 30, 9, 3, 1536, vocab=49152)),
}


def make_requests(n: int, image_size: int, new_tokens: int, seed: int = 0) -> list[Request]:
    """``n`` requests of 1 or 2 noise images and questions of 3 to 24 words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_images = 1 + i % 2
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))) + "?"
        images = [Image.effect_noise((image_size, image_size), 60 + 10 * k + i).convert("RGB")
                  for k in range(n_images)]
        text = "\n".join(["<image>"] * n_images + [question])
        out.append(Request([Turn("human", text)], images, SamplingParams(max_new_tokens=new_tokens)))
    return out


def with_budget(requests: list[Request], new_tokens: int) -> list[Request]:
    return [Request(r.conversation, r.images, SamplingParams(max_new_tokens=new_tokens)) for r in requests]


def measure_batched(engine: Engine, requests: list[Request], *, warmup: int, repeats: int,
                    device: torch.device) -> dict:
    """The requests in one call vs one call each; tokens/s over the whole set."""
    counts: dict[str, int] = {}

    def batched() -> None:
        counts["batched"] = sum(c.completion_tokens for c in engine.generate(requests))

    def one_by_one() -> None:
        counts["sequential"] = sum(engine.generate([r])[0].completion_tokens for r in requests)

    times = time_interleaved({"batched": batched, "sequential": one_by_one}, warmup=warmup, repeats=repeats,
                             device=device)
    out = {name: {"s": median(t), "tokens": counts[name], "tokens_per_s": counts[name] / median(t)}
           for name, t in times.items()}
    out["speedup"] = out["batched"]["tokens_per_s"] / out["sequential"]["tokens_per_s"]
    return out


@torch.no_grad()
def measure_decode(engine: Engine, request: Request, new_tokens: int, *, warmup: int, repeats: int,
                   device: torch.device) -> dict:
    """Per-token decode rate of the engine and of transformers' generate on the same prompt and LM."""
    model = engine.model
    item = prepare(request, engine.processor, engine.context)  # the engine's own prompt ids and images
    ids = torch.tensor([item.input_ids], device=device)
    mask = torch.ones_like(ids)
    features = model.encode_images(engine.processor.pixels(item.images).to(device))
    embeds, layer_inputs = model.lm_inputs(ids, features)

    def hf(n: int) -> None:
        model.lm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, use_cache=True, pad_token_id=model.tokenizer.pad_token_id, **layer_inputs)

    def ours(n: int) -> None:
        assert engine.generate(with_budget([request], n))[0].completion_tokens == n

    times = time_interleaved({"engine_1": lambda: ours(1), "engine_n": lambda: ours(new_tokens),
                              "hf_1": lambda: hf(1), "hf_n": lambda: hf(new_tokens)},
                             warmup=warmup, repeats=repeats, device=device)
    m = {k: median(v) for k, v in times.items()}
    rate = {side: (new_tokens - 1) / max(m[f"{side}_n"] - m[f"{side}_1"], 1e-9) for side in ("engine", "hf")}
    return {"prompt_tokens": len(item.input_ids), "new_tokens": new_tokens, "seconds": m,
            "engine_decode_tokens_per_s": rate["engine"], "hf_decode_tokens_per_s": rate["hf"],
            "engine_over_hf": rate["engine"] / rate["hf"]}


def build(size: Size, device: torch.device, dtype: torch.dtype, workdir: Path) -> VisionLanguageModel:
    model = build_vlm(size.tower, size.lm, workdir)
    model.lm.to(dtype)
    model.bridge.to(dtype)
    return model.to(device).eval()


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        model = build(size, device, dtype, Path(tmp))
    engine = Engine(model, max_batch_size=args.concurrent)
    engine.stop_ids = set()  # random weights: every request runs its full budget (see the module docstring)
    requests = make_requests(args.concurrent, size.tower.image_size, args.new_tokens)
    batched = measure_batched(engine, requests, warmup=args.warmup, repeats=args.repeats, device=device)
    decode = measure_decode(engine, requests[0], args.new_tokens, warmup=args.warmup, repeats=args.repeats,
                            device=device)
    return {"size": args.size, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "concurrent": args.concurrent, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "prompt_tokens": [len(prepare(r, engine.processor, engine.context).input_ids) for r in requests],
            "batched": batched, "decode": decode,
            "targets": {"batched_speedup_at_least_3x": batched["speedup"] >= 3,
                        "decode_at_least_hf": decode["engine_over_hf"] >= 1}}


def table(r: dict) -> str:
    b, d = r["batched"], r["decode"]
    lines = [f"generation on {r['device']} ({r['dtype']}, {r['threads']} threads), size {r['size']}, "
             f"{r['new_tokens']} new tokens per request",
             "| measurement | tokens/s | seconds | ratio |", "|---|---|---|---|",
             f"| {r['concurrent']} requests, one batched call | {b['batched']['tokens_per_s']:.1f} | "
             f"{b['batched']['s']:.3f} | {b['speedup']:.2f}x |",
             f"| {r['concurrent']} requests, one call each | {b['sequential']['tokens_per_s']:.1f} | "
             f"{b['sequential']['s']:.3f} | 1 |",
             f"| decode, engine (1 prompt of {d['prompt_tokens']} tokens) | {d['engine_decode_tokens_per_s']:.1f} | "
             f"{d['seconds']['engine_n']:.3f} | {d['engine_over_hf']:.2f}x |",
             f"| decode, transformers generate (same prompt and LM) | {d['hf_decode_tokens_per_s']:.1f} | "
             f"{d['seconds']['hf_n']:.3f} | 1 |"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--concurrent", type=int, default=8, help="requests answered together")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2 or args.concurrent < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens must be >= 2, --concurrent and --repeats >= 1")
    result = run(args)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
