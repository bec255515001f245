"""The benchmark scripts stay runnable and measure what they say (tiny shapes, CPU, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks folder is a package of the repository, not of chiasm

from benchmarks import gpu_check, step_vs_llava  # noqa: E402
from benchmarks.common import build_vlm, resolve_device, synthetic_batch  # noqa: E402


@pytest.fixture
def pair(tmp_path: Path):
    """chiasm's tiny model and the LLaVA reference holding the same weights, align policies set."""
    size = step_vs_llava.SIZES["tiny"]
    model = build_vlm(size.tower, size.lm, tmp_path)
    ref = step_vs_llava.build_reference(model, size)
    step_vs_llava.set_stage(model, ref, "frozen")
    step_vs_llava.copy_weights(model, ref)
    batch = synthetic_batch(size.rows, image_tokens=model.tokens_per_image, text_tokens=size.text_tokens,
                            vocab=size.lm.vocab, image_id=model.image_token_id, image_size=size.tower.image_size)
    return model, ref, batch


def test_reference_computes_chiasms_function(pair) -> None:
    model, ref, batch = pair
    checked = step_vs_llava.verify(model, ref, batch)
    assert checked["loss_chiasm"] == pytest.approx(checked["loss_reference"], rel=1e-6)
    assert checked["tensors_compared"] == 4  # the bridge's two weights and two biases
    assert checked["max_relative_grad_diff"] < 1e-4


def test_verification_catches_a_different_model(pair) -> None:
    model, ref, batch = pair
    with torch.no_grad():
        ref.model.language_model.norm.weight.mul_(1.5)
    with pytest.raises(AssertionError, match="losses differ"):
        step_vs_llava.verify(model, ref, batch)


def test_reference_refuses_a_projector_it_does_not_have(tmp_path: Path) -> None:
    size = step_vs_llava.SIZES["tiny"]
    model = build_vlm(size.tower, size.lm, tmp_path)
    model.bridge.upsample = 2
    with pytest.raises(ValueError, match="plain two-layer MLP"):
        step_vs_llava.build_reference(model, size)


def test_step_vs_llava_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = step_vs_llava.main(["--size", "tiny", "--precision", "fp32", "--lm-mode", "full",
                                 "--warmup", "0", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["stages"].keys() == result["stages"].keys() == {"align", "instruct (full)"}
    align = result["stages"]["align"]
    assert set(align) == {"chiasm", "chiasm, full LM head", "chiasm, features cached"}
    assert set(result["stages"]["instruct (full)"]) == {"chiasm", "chiasm, full LM head"}
    for rows in result["stages"].values():
        for r in rows.values():
            assert r["ratio"] == pytest.approx(r["chiasm_s"] / r["reference_s"])
    # Full fine-tuning trains every LM tensor: all of them were compared, and agreed.
    instruct = result["verification"]["instruct (full)"]
    assert instruct["tensors_compared"] > 4 and instruct["max_relative_grad_diff"] < 1e-3
    timed = result["verification"]["align"]["loss_in_timed_precision"]
    assert timed["chiasm"] == pytest.approx(timed["reference"], rel=1e-5)
    assert timed["chiasm, features cached"] == pytest.approx(timed["reference"], rel=1e-2)  # fp16 cache
    assert result["attention"] == {"chiasm": "sdpa", "reference": "sdpa"}


def test_gpu_check_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    result = gpu_check.main(["--device", "cpu", "--tiny", "--precision", "fp32", "--peak-tflops", "0.5",
                             "--warmup", "0", "--repeats", "1", "--new-tokens", "3", "--out", str(out)])
    assert json.loads(out.read_text())["flop_formula"] == gpu_check.FLOP_FORMULA
    rows = result["training"]
    assert [(r["stage"], r["checkpointing"]) for r in rows] == [
        (s, c) for s, _, _ in gpu_check.STAGES for c in (False, True)]
    for r in rows:
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_s"] / 0.5e12)
        assert r["tokens_per_s"] == pytest.approx(result["batch"]["tokens"] / r["step_s"])
        assert r["peak_memory_bytes"] is None  # CUDA only
    trainable = {r["stage"]: r["trainable"] for r in rows}
    assert trainable["align"] == result["parameters"]["bridge"]
    assert trainable["instruct (full)"] == result["parameters"]["bridge"] + result["parameters"]["lm"]
    assert result["parameters"]["bridge"] < trainable["instruct (lora)"] < trainable["instruct (full)"]
    gen = result["generation"]
    assert gen["new_tokens"] == 3 and gen["tokens_per_s"] > 0 and gen["decode_tokens_per_s"] > 0


def test_checkpointing_switch_recomputes_layers(tmp_path: Path) -> None:
    size = step_vs_llava.SIZES["tiny"]
    model = build_vlm(size.tower, size.lm, tmp_path)
    batch = synthetic_batch(2, image_tokens=model.tokens_per_image, text_tokens=8, vocab=size.lm.vocab,
                            image_id=model.image_token_id, image_size=size.tower.image_size)
    calls = []
    # transformers checkpoints a layer's forward, not its __call__: hooks on the layer itself fire once, those on
    # the modules inside it fire again when the backward recomputes the layer (a pre-hook: the recomputation
    # stops as soon as it has rebuilt the saved tensors, before the MLP's own forward hook would fire).
    model.base_lm.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    for on, expected in ((False, 1), (True, 2), (False, 1)):
        calls.clear()
        gpu_check.set_checkpointing(model, on)
        model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss.backward()
        assert len(calls) == expected


def test_step_flops_by_hand() -> None:
    c = gpu_check.Counts(tower=100, tower_layers=2, tower_width=8, tower_seq=5, patches=4, bridge=10,
                         lm_blocks=1000, lm_layers=3, lm_width=16, head=500)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, -100, -100], [-100, -100, -100, -100, 9]])
    batch = synthetic_batch(2, image_tokens=4, text_tokens=6, vocab=50, image_id=3, image_size=16)
    batch.attention_mask, batch.labels = mask, labels
    lm_attention = 3 * 4 * 16 * (3**2 + 5**2) * 3
    tower = 2 * 100 * 2 * 5 + 4 * 8 * 2 * 5**2 * 2
    align = 6 * 10 * 8 + 4 * 1000 * 8 + 4 * 500 * 2 + lm_attention + tower
    assert gpu_check.step_flops(c, batch, lm_trained=False, tower_runs=True, n_lora=0) == align
    assert gpu_check.step_flops(c, batch, lm_trained=False, tower_runs=False, n_lora=0) == align - tower
    full = 6 * 10 * 8 + 6 * 1000 * 8 + 6 * 500 * 2 + lm_attention + tower
    assert gpu_check.step_flops(c, batch, lm_trained=True, tower_runs=True, n_lora=0) == full
    assert gpu_check.step_flops(c, batch, lm_trained=False, tower_runs=True, n_lora=7) == align + 6 * 7 * 8


def test_parameter_counts_cover_the_lm(tmp_path: Path) -> None:
    size = step_vs_llava.SIZES["tiny"]
    model = build_vlm(size.tower, size.lm, tmp_path)
    c = gpu_check.count_parameters(model)
    vectors = sum(p.numel() for p in model.lm.parameters() if p.ndim < 2)  # norms: no matmul
    assert c.lm_blocks + c.head + vectors == sum(p.numel() for p in model.lm.parameters())  # tied head
    assert (c.tower_seq, c.patches, c.tower_layers) == (17, 16, 2)  # CLIP's class token + a 4 x 4 grid


@pytest.mark.parametrize(("shape", "causal", "params"), [
    (gpu_check.LMS["smollm2-360m"], True, 361_821_120),
    (gpu_check.LMS["qwen2-0.5b"], True, 494_032_768),
    (step_vs_llava.SIZES["real"].lm, True, 134_515_008),  # SmolLM2-135M
    (gpu_check.SIGLIP_B16, False, 92_884_224),  # siglip-base-patch16-224's vision tower
    (step_vs_llava.SIZES["real"].tower, False, 85_799_424),  # clip-vit-base-patch16's vision tower
])
def test_shapes_match_the_checkpoints_they_stand_for(shape, causal: bool, params: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(shape.config())
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(name: str, peak: float | None) -> None:
    assert gpu_check.peak_bf16_flops(name) == peak


def test_cuda_asked_without_cuda_fails_loudly() -> None:
    with pytest.raises(SystemExit, match="--device cuda was asked but CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    assert resolve_device("cpu", cuda_available=False) == torch.device("cpu")


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
