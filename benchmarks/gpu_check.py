"""Training and generation speed of chiasm on one GPU, from random weights (no download).

A SigLIP-B/16-shaped tower (224 px, 196 patches), chiasm's MLP bridge and a SmolLM2-360M- or
Qwen2-0.5B-shaped LM train align steps (bridge only; pixels through the tower, or features
from the cache as the trainer uses them for a frozen tower) and instruct steps (bridge + LM,
full or LoRA), each with activation checkpointing off and on, in bf16 autocast with sdpa
attention. Reported per configuration: median step time, tokens/s, model FLOPs utilisation,
peak memory; then greedy generation with the KV cache (prefill time, decode tokens/s).

Model FLOPs per step (``FLOP_FORMULA``): a weight matrix of N parameters costs 2N per token it
reads going forward, 4N when a gradient also flows back through it to its input (frozen but
not first: the LM in align, the LM's base under LoRA), 6N when its weights train as well.
Counted per token: the tower's blocks and patch embedding (2N, per patch), the bridge (6N, per
patch), the LM's blocks (4N or 6N, per real token) and its head (4N or 6N, only at supervised
positions, which is all chiasm's loss computes). Attention scores add 4·d·n² per layer and
sequence of n tokens going forward (QKᵀ and AV, causal masking not halved), three times that
when a gradient flows. Recomputation under activation checkpointing is not model FLOPs: MFU
stays comparable between checkpointing on and off.

``--device cuda`` without CUDA is an error, never a silent run on the CPU. ``--device cpu
--tiny`` runs the whole script in seconds with tiny shapes (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from benchmarks.common import (
    LMShape,
    SyntheticBatch,
    TowerShape,
    TrainStep,
    build_vlm,
    median,
    resolve_device,
    shape_dict,
    synchronize,
    synthetic_batch,
    time_interleaved,
)
from chiasm.checkpointing import disable_lm_checkpointing, enable_checkpointing
from chiasm.config import PolicyConfig
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache
from chiasm.train.policy import apply_policy, set_train_modes

FLOP_FORMULA = (
    "per step: 2*N_tower*patches + 6*N_bridge*patches + m_lm*N_lm_blocks*tokens + m_lm*N_head*supervised "
    "+ 6*N_lora*tokens + attention; m_lm = 4 (LM frozen, gradient flows through) or 6 (LM trained); "
    "attention = 4*d*n^2 per layer and sequence forward only (tower), x3 with a gradient (LM); "
    "recomputation under activation checkpointing not counted"
)

SIGLIP_B16 = TowerShape("siglip", 768, 12, 12, 3072, image_size=224, patch=16)
LMS = {
    "smollm2-360m": LMShape("llama", 960, 32, 15, 5, 2560, vocab=49152, rope_theta=100_000.0),
    "qwen2-0.5b": LMShape("qwen2", 896, 24, 14, 2, 4864, vocab=151_936, rope_theta=1_000_000.0),
}
TINY_TOWER = TowerShape("siglip", 32, 2, 2, 64, image_size=64, patch=16)
TINY_LM = LMShape("llama", 64, 2, 4, 2, 128, vocab=1024)

# Dense bf16 tensor-core peaks (no sparsity), by the model token in the CUDA device name. The
# first row whose tokens all occur in the name wins, so the more specific rows come first.
PEAK_BF16 = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU from its name (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    tokens = set(re.split(r"[\s\-_]+", device_name.upper()))
    for needed, peak in PEAK_BF16:
        if all(t in tokens for t in needed):
            return peak
    return None


# ---- model FLOPs ---------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """Weight-matrix parameter counts of the parts (embedding lookups and norms left out)."""

    tower: int
    tower_layers: int
    tower_width: int
    tower_seq: int  # tokens per image inside the tower (patches + class token, if any)
    patches: int  # grid cells per image: the bridge's input tokens
    bridge: int
    lm_blocks: int
    lm_layers: int
    lm_width: int
    head: int


def count_parameters(model: VisionLanguageModel) -> Counts:
    enc = model.encoder
    blocks = sum(p.numel() for b in enc.blocks() for p in b.parameters())
    patch = getattr(getattr(enc.tower, "embeddings", None), "patch_embedding", None)
    patch_n = patch.weight.numel() if patch is not None else 0
    grid = enc.grid()
    has_cls = getattr(getattr(enc.tower, "embeddings", None), "class_embedding", None) is not None
    decoder = model.base_lm.get_decoder()
    lm_blocks = sum(p.numel() for n, p in decoder.named_parameters()
                    if "embed_tokens" not in n and "lora_" not in n and p.ndim >= 2)
    head = model.base_lm.get_output_embeddings().weight
    cfg = model.base_lm.config
    heads_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return Counts(tower=blocks + patch_n, tower_layers=len(enc.blocks()), tower_width=enc.dim,
                  tower_seq=grid[0] * grid[1] + int(has_cls), patches=grid[0] * grid[1],
                  bridge=sum(p.numel() for p in model.bridge.parameters()),
                  lm_blocks=lm_blocks, lm_layers=cfg.num_hidden_layers, lm_width=heads_width, head=head.numel())


def lora_parameters(model: VisionLanguageModel) -> int:
    return sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" in n)


def step_flops(c: Counts, batch: SyntheticBatch, *, lm_trained: bool, tower_runs: bool, n_lora: int) -> float:
    """Model FLOPs of one training step on ``batch`` (see ``FLOP_FORMULA``)."""
    images = batch.pixels.shape[0]
    patches = images * c.patches
    lengths = batch.attention_mask.sum(dim=1).double()
    tokens, sum_sq = float(lengths.sum()), float((lengths**2).sum())
    m_lm = 6 if lm_trained else 4
    flops = 6 * c.bridge * patches
    flops += m_lm * c.lm_blocks * tokens + m_lm * c.head * batch.n_supervised + 6 * n_lora * tokens
    flops += 3 * 4 * c.lm_width * sum_sq * c.lm_layers
    if tower_runs:
        flops += 2 * c.tower * images * c.tower_seq + 4 * c.tower_width * images * c.tower_seq**2 * c.tower_layers
    return float(flops)


# ---- the measurements ----------------------------------------------------------------
STAGES = (  # (name, LM policy, tower run every step)
    ("align", "frozen", True),
    ("align, features cached", "frozen", False),
    ("instruct (full)", "full", True),
    ("instruct (lora)", "lora", True),  # last: LoRA wraps the LM for good
)


def set_checkpointing(model: VisionLanguageModel, on: bool) -> None:
    """Switch activation checkpointing as ``ModelConfig.gradient_checkpointing`` does (LM and tower), or off."""
    if on:
        enable_checkpointing(model.base_lm, model.encoder)
        return
    disable_lm_checkpointing(model.base_lm)
    for module in model.encoder.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False


def measure_stage(model: VisionLanguageModel, batch: SyntheticBatch, *, name: str, lm_mode: str, tower_runs: bool,
                  checkpointing: bool, device: torch.device, bf16: bool, warmup: int, repeats: int,
                  counts: Counts, peak: float | None) -> dict:
    policies = {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                "lm": PolicyConfig(mode=lm_mode)}
    for component, policy in policies.items():
        apply_policy(model, component, policy)
    set_checkpointing(model, checkpointing)
    # As the trainer does: train mode where a policy trains, and the LM too when it is checkpointed
    # (transformers recomputes layers only in train mode, also for a frozen LM the gradient crosses).
    set_train_modes(model, policies)
    if checkpointing:
        model.lm.train()
    b = batch
    if tower_runs:
        def loss() -> torch.Tensor:
            return model(b.input_ids, b.attention_mask, b.labels, pixels=b.pixels).loss
    else:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = model.encode_images(b.pixels).to(torch.float16).cpu()
        keys = [str(i) for i in range(feats.shape[0])]
        cache = FeatureCache({k: i for i, k in enumerate(keys)}, feats)

        def loss() -> torch.Tensor:
            return model(b.input_ids, b.attention_mask, b.labels, features=cache.lookup(keys).to(device)).loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = TrainStep([p for p in model.parameters() if p.requires_grad], loss, device=device, bf16=bf16)
    losses: list[float] = []
    times = time_interleaved({name: lambda: losses.append(float(step()))}, warmup=warmup, repeats=repeats,
                             device=device)[name]
    if not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"{name}: non-finite loss {losses}")
    step_s = median(times)
    flops = step_flops(counts, b, lm_trained=lm_mode == "full", tower_runs=tower_runs,
                       n_lora=lora_parameters(model) if lm_mode == "lora" else 0)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"stage": name, "checkpointing": checkpointing, "step_s": step_s, "step_all_s": times,
            "tokens_per_s": b.n_tokens / step_s, "model_flops_per_step": flops,
            "achieved_flops": flops / step_s, "mfu": flops / step_s / peak if peak else None,
            "peak_memory_bytes": peak_mem, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loss_first_last": [losses[0], losses[-1]]}


@torch.no_grad()
def measure_generation(model: VisionLanguageModel, prompts: SyntheticBatch, *, new_tokens: int,
                       device: torch.device, bf16: bool) -> dict:
    """Greedy decoding with the KV cache, forced to ``new_tokens`` (no early stop) so every run decodes alike.

    Prefill (tower + bridge + the prompt through the LM + one token) is timed on its own; the
    decode rate is the remaining tokens over the remaining time.
    """
    model.eval()

    def generate(n: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            embeds, layer_inputs = model.lm_inputs(prompts.input_ids, model.encode_images(prompts.pixels))
            model.lm.generate(inputs_embeds=embeds, attention_mask=prompts.attention_mask, do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, use_cache=True,
                              pad_token_id=model.tokenizer.pad_token_id, **layer_inputs)

    times = time_interleaved({"prefill": lambda: generate(1), "all": lambda: generate(new_tokens)},
                             warmup=1, repeats=3, device=device)
    synchronize(device)
    rows = prompts.input_ids.shape[0]
    prefill, total = median(times["prefill"]), median(times["all"])
    return {"rows": rows, "prompt_tokens": prompts.input_ids.shape[1], "new_tokens": new_tokens,
            "prefill_s": prefill, "total_s": total, "tokens_per_s": rows * new_tokens / total,
            "decode_tokens_per_s": rows * (new_tokens - 1) / max(total - prefill, 1e-9)}


def run(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    tower, lm = (TINY_TOWER, TINY_LM) if args.tiny else (SIGLIP_B16, LMS[args.lm])
    bf16 = args.precision == "bf16"
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak, peak_source = peak_bf16_flops(device_name), "table"
    else:
        device_name, peak, peak_source = platform.processor() or platform.machine(), None, "unknown"
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    if not bf16 and peak_source == "table":
        peak, peak_source = None, "the table holds bf16 peaks only"
    model = build_vlm(tower, lm, workdir, seed=args.seed, feature_layer=-1).to(device)
    counts = count_parameters(model)
    make = dict(image_tokens=model.tokens_per_image, vocab=lm.vocab, image_id=model.image_token_id,
                image_size=tower.image_size, pad_id=model.tokenizer.pad_token_id, seed=args.seed)
    batch = synthetic_batch(args.rows, text_tokens=args.text_tokens, **make).to(device)
    prompts = synthetic_batch(args.gen_rows, text_tokens=16, vary=False, **make).to(device)
    result = {
        "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "precision": "bf16 autocast" if bf16 else "fp32",
        "attention": model.base_lm.config._attn_implementation, "tower": shape_dict(tower),
        "lm": {"name": "tiny" if args.tiny else args.lm, **shape_dict(lm)},
        "parameters": {"tower": sum(p.numel() for p in model.encoder.parameters()),
                       "bridge": counts.bridge, "lm": sum(p.numel() for p in model.lm.parameters())},
        "batch": {"rows": args.rows, "width": batch.input_ids.shape[1], "tokens": batch.n_tokens,
                  "supervised": batch.n_supervised},
        "peak_flops": peak, "peak_flops_source": peak_source, "flop_formula": FLOP_FORMULA,
    }
    result["generation"] = measure_generation(model, prompts, new_tokens=args.new_tokens, device=device, bf16=bf16)
    rows = []
    print(HEADER, flush=True)
    for name, lm_mode, tower_runs in STAGES:
        if lm_mode not in args.lm_modes and lm_mode != "frozen":
            continue
        for ckpt in (False, True):
            rows.append(measure_stage(model, batch, name=name, lm_mode=lm_mode, tower_runs=tower_runs,
                                      checkpointing=ckpt, device=device, bf16=bf16, warmup=args.warmup,
                                      repeats=args.repeats, counts=counts, peak=peak))
            print(format_row(rows[-1]), flush=True)
    result["training"] = rows
    return result


# ---- output --------------------------------------------------------------------------
HEADER = (f"{'stage':<24} {'ckpt':<5} {'step s':>8} {'tokens/s':>10} {'TFLOP/step':>11} {'MFU':>6} "
          f"{'peak GiB':>9} {'loss first/last':>16}")


def format_row(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None else "n/a"
    first, last = r["loss_first_last"]
    return (f"{r['stage']:<24} {'on' if r['checkpointing'] else 'off':<5} {r['step_s']:>8.4f} "
            f"{r['tokens_per_s']:>10.0f} {r['model_flops_per_step'] / 1e12:>11.3f} {mfu:>6} {mem:>9} "
            f"{first:>7.3f}/{last:<7.3f}")


def summary(result: dict) -> str:
    g = result["generation"]
    peak = f"{result['peak_flops'] / 1e12:.0f} TFLOP/s ({result['peak_flops_source']})" \
        if result["peak_flops"] else f"unknown ({result['peak_flops_source']}; give --peak-tflops for MFU)"
    lines = [f"{result['device_name']} ({result['device']}), torch {result['torch']}, {result['precision']}, "
             f"attention {result['attention']}, peak {peak}",
             f"tower {result['parameters']['tower']:,} params, bridge {result['parameters']['bridge']:,}, "
             f"LM {result['lm']['name']} {result['parameters']['lm']:,}; batch {result['batch']['rows']} rows x "
             f"{result['batch']['width']} positions ({result['batch']['tokens']} tokens, "
             f"{result['batch']['supervised']} supervised)", HEADER]
    lines += [format_row(r) for r in result["training"]]
    lines.append(f"generation: {g['rows']} prompts x {g['prompt_tokens']} tokens, {g['new_tokens']} new tokens "
                 f"with the KV cache: prefill {g['prefill_s']:.3f} s, {g['tokens_per_s']:.0f} tokens/s overall, "
                 f"{g['decode_tokens_per_s']:.0f} tokens/s decoding")
    lines.append(f"model FLOPs: {FLOP_FORMULA}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: the whole script in seconds")
    p.add_argument("--lm", choices=sorted(LMS), default="smollm2-360m")
    p.add_argument("--lm-modes", default="full,lora", help="instruct variants to run: full, lora or both")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--rows", type=int, help="training batch rows (default 16; tiny 2)")
    p.add_argument("--text-tokens", type=int, help="text tokens per row besides the image (default 128; tiny 16)")
    p.add_argument("--warmup", type=int, help="untimed steps per configuration (default 3; tiny 1)")
    p.add_argument("--repeats", type=int, help="timed steps per configuration, median reported (default 10; tiny 2)")
    p.add_argument("--gen-rows", type=int, help="prompts generated from at once (default 8; tiny 2)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 64; tiny 4)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak, for MFU where the table lacks it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = {"rows": (16, 2), "text_tokens": (128, 16), "warmup": (3, 1), "repeats": (10, 2),
                "gen_rows": (8, 2), "new_tokens": (64, 4)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    modes = [m.strip() for m in args.lm_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("full", "lora")]
    if bad or not modes:
        raise SystemExit(f"--lm-modes {args.lm_modes!r}: give full, lora or full,lora")
    args.lm_modes = modes
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (prefill is timed apart from decoding)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, device, Path(tmp))
    print(summary(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
