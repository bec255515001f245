"""Time a chiasm training step against transformers' LLaVA computing the same function.

Both models hold the same weights (a CLIP tower read at layer -2 without its class token,
LLaVA-1.5's two-layer GELU projector, the same causal LM), see the same batch and train the
same parameters with the same optimizer and precision. Before any timing the losses and
gradients are checked equal in fp32: the comparison is of two implementations of one model.
The reference is called with ``use_cache=False``, as chiasm's training forward is, so that
neither builds a KV cache it will not use.

Rows:
* align: bridge trains, tower and LM frozen (pixels through the tower every step);
* align, features cached: as chiasm's trainer runs a frozen encoder (features computed once,
  stored in fp16, looked up per batch), against the same reference step;
* instruct: bridge + LM (LoRA or full);
* "full LM head" rows: chiasm with its loss computed from logits at every position, as the
  reference does; chiasm's normal path runs the head only where a label is supervised.

Run: ``python benchmarks/step_vs_llava.py --size small --out results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import inject_adapter_in_model
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.common import (
    LMShape,
    SyntheticBatch,
    TowerShape,
    TrainStep,
    build_vlm,
    median,
    resolve_device,
    shape_dict,
    synthetic_batch,
    time_interleaved,
)
from chiasm.config import PolicyConfig
from chiasm.encoders.hf_vision import _vision_part
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache
from chiasm.train.policy import apply_policy, set_train_modes
from chiasm.train.trainer import use_bf16


@dataclass(frozen=True)
class Size:
    tower: TowerShape
    lm: LMShape
    rows: int
    text_tokens: int


SIZES = {
    # For tests: builds and runs in a second or two.
    "tiny": Size(TowerShape("clip", 32, 2, 2, 64, image_size=64, patch=16),
                 LMShape("llama", 64, 2, 4, 2, 128, vocab=1024), rows=2, text_tokens=16),
    # A 2-core CPU in about two minutes: 196 patches, a SmolLM2-sized vocabulary.
    "small": Size(TowerShape("clip", 256, 4, 4, 1024),
                  LMShape("llama", 256, 4, 4, 2, 768, vocab=49152), rows=4, text_tokens=48),
    # CLIP-ViT-B/16 and SmolLM2-135M shapes.
    "real": Size(TowerShape("clip", 768, 12, 12, 3072),
                 LMShape("llama", 576, 30, 9, 3, 1536, vocab=49152), rows=8, text_tokens=64),
}


# ---- the reference ---------------------------------------------------------------------
def build_reference(model: VisionLanguageModel, size: Size) -> LlavaForConditionalGeneration:
    """``LlavaForConditionalGeneration`` of the same shapes; weights come from :func:`copy_weights`."""
    bridge = model.bridge
    if type(bridge).__name__ != "MLPBridge" or bridge.pos_dim or bridge.upsample != 1 or \
            not isinstance(bridge.norm, torch.nn.Identity):
        raise ValueError("the LLaVA reference has only the plain two-layer MLP projector")
    if model.encoder.feature_layer != -2:
        raise ValueError("the reference reads the tower at layer -2 (vision_feature_layer)")
    config = LlavaConfig(vision_config=size.tower.config(), text_config=size.lm.config(),
                         image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=size.lm.tie_embeddings)
    return LlavaForConditionalGeneration(config).to(model.device)


def copy_weights(model: VisionLanguageModel, ref: LlavaForConditionalGeneration) -> None:
    """Make the reference compute chiasm's function: tower, projector, LM (LoRA adapters included)."""
    with torch.no_grad():
        _vision_part(ref.model.vision_tower).load_state_dict(model.encoder.tower.state_dict())
        proj = ref.model.multi_modal_projector
        for dst, src in ((proj.linear_1, model.bridge.fc1), (proj.linear_2, model.bridge.fc2)):
            dst.load_state_dict(src.state_dict())
        base = model.base_lm
        ref.model.language_model.load_state_dict(base.get_decoder().state_dict())
        ref.lm_head.load_state_dict(base.get_output_embeddings().state_dict())
    tied_ref = ref.lm_head.weight.data_ptr() == ref.get_input_embeddings().weight.data_ptr()
    tied_chiasm = base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    if tied_ref != tied_chiasm:
        raise ValueError(f"head tying differs: chiasm tied={tied_chiasm}, reference tied={tied_ref}")


def set_stage(model: VisionLanguageModel, ref: LlavaForConditionalGeneration, lm_mode: str) -> None:
    """Tower frozen, bridge trained and the LM ``frozen``/``lora``/``full`` in both models."""
    policies = {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                "lm": PolicyConfig(mode=lm_mode)}
    for component, policy in policies.items():
        apply_policy(model, component, policy)
    set_train_modes(model, policies)  # as the trainer does; the reference below mirrors it
    text = ref.model.language_model
    if lm_mode == "lora" and not any("lora_" in n for n, _ in text.named_parameters()):
        # chiasm's own adapter config (rank, alpha, target layers), so both adapt the same layers.
        inject_adapter_in_model(copy.deepcopy(model.lm.peft_config["default"]), text)
    ref.eval()
    ref.model.multi_modal_projector.train()
    text.train(lm_mode != "frozen")
    for name, p in ref.named_parameters():
        if name.startswith("model.multi_modal_projector."):
            p.requires_grad_(True)
        elif name.startswith(("model.language_model.", "lm_head.")):
            p.requires_grad_(lm_mode == "full" or (lm_mode == "lora" and "lora_" in name))
        else:
            p.requires_grad_(False)
    n_chiasm = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    if n_chiasm != n_ref:
        raise ValueError(f"trainable parameters differ: chiasm {n_chiasm:,}, reference {n_ref:,}")


# ---- the contenders --------------------------------------------------------------------
def loss_functions(model: VisionLanguageModel, ref: LlavaForConditionalGeneration, batch: SyntheticBatch,
                   cache: FeatureCache | None) -> dict[str, Callable[[], torch.Tensor]]:
    b = batch
    fns = {
        "chiasm": lambda: model(b.input_ids, b.attention_mask, b.labels, pixels=b.pixels).loss,
        "chiasm, full LM head": lambda: model(b.input_ids, b.attention_mask, b.labels, pixels=b.pixels,
                                              return_logits=True).loss,
        "reference": lambda: ref(input_ids=b.input_ids, pixel_values=b.pixels, attention_mask=b.attention_mask,
                                 labels=b.labels, use_cache=False).loss,
    }
    if cache is not None:
        # As the trainer does: features live on the host in fp16 and are looked up per batch.
        keys = [str(i) for i in range(b.pixels.shape[0])]
        fns["chiasm, features cached"] = lambda: model(
            b.input_ids, b.attention_mask, b.labels, features=cache.lookup(keys).to(b.pixels.device)).loss
    return fns


def feature_cache(model: VisionLanguageModel, batch: SyntheticBatch) -> FeatureCache:
    with torch.no_grad():
        feats = model.encode_images(batch.pixels).to(torch.float16).cpu()
    return FeatureCache({str(i): i for i in range(feats.shape[0])}, feats)


def _trainable_grads(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n[len(prefix):]: p.grad.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad and n.startswith(prefix) and p.grad is not None}


def verify(model: VisionLanguageModel, ref: LlavaForConditionalGeneration, batch: SyntheticBatch) -> dict:
    """fp32: the losses and the bridge/LM gradients of both models must agree before timing."""
    losses = {}
    for name, net, fn in (
        ("chiasm", model, lambda: model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels)),
        ("reference", ref, lambda: ref(input_ids=batch.input_ids, pixel_values=batch.pixels,
                                       attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False)),
    ):
        net.zero_grad(set_to_none=True)
        loss = fn().loss
        loss.backward()
        losses[name] = float(loss.detach())
    c_grads = {"bridge." + k: v for k, v in _trainable_grads(model.bridge, "").items()}
    c_grads.update({"lm." + k: v for k, v in _trainable_grads(model.base_lm.get_decoder(), "").items()})
    r_proj = _trainable_grads(ref.model.multi_modal_projector, "")
    r_grads = {"bridge." + k.replace("linear_1", "fc1").replace("linear_2", "fc2"): v for k, v in r_proj.items()}
    r_grads.update({"lm." + k: v for k, v in _trainable_grads(ref.model.language_model, "").items()})
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    if not torch.isclose(torch.tensor(losses["chiasm"]), torch.tensor(losses["reference"]), rtol=1e-5, atol=1e-6):
        raise AssertionError(f"losses differ: chiasm {losses['chiasm']:.8f}, reference {losses['reference']:.8f}")
    if sorted(c_grads) != sorted(r_grads):
        raise AssertionError(f"trained tensors differ: {sorted(set(c_grads) ^ set(r_grads))[:6]}")
    worst = 0.0
    for k, g in c_grads.items():
        err = float((g - r_grads[k]).abs().max() / g.abs().max().clamp(min=1e-12))
        worst = max(worst, err)
        if err > 1e-3:
            raise AssertionError(f"gradient of {k} differs: max |diff| / max |grad| = {err:.2e}")
    return {"loss_chiasm": losses["chiasm"], "loss_reference": losses["reference"],
            "tensors_compared": len(c_grads), "max_relative_grad_diff": worst}


# ---- the run ---------------------------------------------------------------------------
def run(size_name: str, *, device: torch.device, bf16: bool, lm_mode: str, warmup: int, repeats: int,
        workdir: Path, seed: int = 0) -> dict:
    size = SIZES[size_name]
    model = build_vlm(size.tower, size.lm, workdir, seed=seed).to(device)
    ref = build_reference(model, size)
    batch = synthetic_batch(size.rows, image_tokens=model.tokens_per_image, text_tokens=size.text_tokens,
                            vocab=size.lm.vocab, image_id=model.image_token_id, image_size=size.tower.image_size,
                            pad_id=model.tokenizer.pad_token_id, seed=seed).to(device)
    result: dict = {
        "size": size_name, "device": str(device), "precision": "bf16 autocast" if bf16 else "fp32",
        "threads": torch.get_num_threads(), "tower": shape_dict(size.tower), "lm": shape_dict(size.lm),
        "batch": {"rows": size.rows, "width": batch.input_ids.shape[1], "tokens": batch.n_tokens,
                  "supervised": batch.n_supervised, "image_tokens": model.tokens_per_image},
        "attention": {"chiasm": model.base_lm.config._attn_implementation,
                      "reference": ref.model.language_model.config._attn_implementation},
        "warmup": warmup, "repeats": repeats, "stages": {}, "verification": {},
    }
    stages = (("align", "frozen"), (f"instruct ({lm_mode})", lm_mode))
    for stage, mode in stages:
        set_stage(model, ref, mode)
        copy_weights(model, ref)
        result["verification"][stage] = verify(model, ref, batch)
        cache = feature_cache(model, batch) if mode == "frozen" else None
        fns = loss_functions(model, ref, batch, cache)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result["verification"][stage]["loss_in_timed_precision"] = {k: float(f()) for k, f in fns.items()}
        params = {"chiasm": [p for p in model.parameters() if p.requires_grad],
                  "reference": [p for p in ref.parameters() if p.requires_grad]}
        steps = {k: TrainStep(params["reference" if k == "reference" else "chiasm"], f, device=device, bf16=bf16)
                 for k, f in fns.items()}
        times = time_interleaved(steps, warmup=warmup, repeats=repeats, device=device)
        ref_s = median(times["reference"])
        rows = {}
        for name, ts in times.items():
            if name == "reference":
                continue
            rows[name] = {"chiasm_s": median(ts), "reference_s": ref_s, "ratio": median(ts) / ref_s,
                          "ratio_of_fastest": min(ts) / min(times["reference"]),
                          "chiasm_all_s": ts, "reference_all_s": times["reference"]}
        result["stages"][stage] = rows
    align = result["stages"]["align"]
    instruct = result["stages"][f"instruct ({lm_mode})"]
    result["targets"] = {
        "align: chiasm/reference <= 1.0": align["chiasm"]["ratio"] <= 1.0,
        "instruct: chiasm/reference <= 1.0": instruct["chiasm"]["ratio"] <= 1.0,
        "align with cached features: reference/chiasm >= 3": 1 / align["chiasm, features cached"]["ratio"] >= 3.0,
    }
    result["note"] = (f"chiasm runs the LM head only on the {batch.n_supervised} supervised positions of "
                      f"{batch.n_tokens} tokens; the reference computes logits over the whole vocabulary at "
                      "every position. The 'full LM head' rows switch that off for a like-for-like comparison.")
    return result


def format_table(result: dict) -> str:
    lines = [f"size {result['size']} on {result['device']} ({result['threads']} threads), {result['precision']}; "
             f"batch {result['batch']['rows']} rows x {result['batch']['width']} positions "
             f"({result['batch']['tokens']} tokens, {result['batch']['supervised']} supervised); seconds per "
             f"training step, median of {result['repeats']} after {result['warmup']} warm-up; last column: ratio "
             "of each side's fastest step",
             f"{'stage':<20} {'chiasm path':<24} {'chiasm s':>9} {'LLaVA s':>9} {'chiasm/LLaVA':>13} "
             f"{'(fastest steps)':>15}"]
    for stage, rows in result["stages"].items():
        for name, r in rows.items():
            lines.append(f"{stage:<20} {name:<24} {r['chiasm_s']:>9.4f} {r['reference_s']:>9.4f} {r['ratio']:>13.3f} "
                         f"{r['ratio_of_fastest']:>15.3f}")
    for stage, v in result["verification"].items():
        lines.append(f"checked {stage}: fp32 loss {v['loss_chiasm']:.6f} vs {v['loss_reference']:.6f}, "
                     f"{v['tensors_compared']} gradients within {v['max_relative_grad_diff']:.1e} (relative)")
    for target, ok in result["targets"].items():
        lines.append(f"target {target}: {'met' if ok else 'NOT met'}")
    lines.append(result["note"])
    if "wall_s" in result:
        lines.append(f"whole run: {result['wall_s']:.0f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has it, as chiasm's trainer decides")
    p.add_argument("--lm-mode", choices=["lora", "full"], default="lora", help="how the LM trains in instruct")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender (the median is reported)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a machine shared with others")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.size, device=device, bf16=use_bf16(args.precision, device), lm_mode=args.lm_mode,
                     warmup=args.warmup, repeats=args.repeats, workdir=Path(tmp))
    result["wall_s"] = time.perf_counter() - t0
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
