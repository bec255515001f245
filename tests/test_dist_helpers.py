"""One-process checks of the multi-process helpers: backend and collective device, the config
check, the unused-parameter probe, CUDA RNG in checkpoints and the way back from FSDP.

No GPU is here: NCCL and CUDA are stood in for by monkeypatching, and FSDP runs on a
one-rank gloo group.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

from chiasm.config import EncoderConfig, ModelConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_vision_tower
from chiasm.train import checkpoint as ckpt
from chiasm.train import dist as cdist
from chiasm.train.batches import collate, prepare
from chiasm.train.dist import DistInfo
from chiasm.train.parallel import check_parallel_config, needs_unused_search, unused_parameters
from chiasm.train.policy import apply_stage_policies
from chiasm.train.trainer import Trainer


# ---- backend and collective device ----------------------------------------------------------
def test_process_group_backend_pairs_nccl_with_gloo() -> None:
    assert cdist.process_group_backend("auto", cuda=True) == "cpu:gloo,cuda:nccl"
    assert cdist.process_group_backend("auto", cuda=False) == "gloo"
    assert cdist.process_group_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(RuntimeError, match="backend 'nccl' needs CUDA GPUs"):
        cdist.process_group_backend("nccl", cuda=False)


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device, dict]]:
    """A 2-rank process group that records each collective and the device of its tensor."""
    calls: list[tuple[str, torch.device, dict]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        calls.append(("all_reduce", t.device, {"op": op}))
        t.mul_(2)  # two ranks holding the same value

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", torch.device("cpu"), kw)))
    return calls


@pytest.mark.parametrize("backend,device", [("nccl", "cuda:0"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collectives_use_the_device_of_the_backend(fake_group, monkeypatch, backend: str, device: str) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert cdist.collective_device() == torch.device(device)
    made: list[torch.device] = []
    real = torch.tensor

    def tensor(data, *, dtype=None, device=None):  # a CPU stand-in for the CUDA tensor asked for
        made.append(torch.device(device))
        return real(data, dtype=dtype)

    monkeypatch.setattr(torch, "tensor", tensor)
    assert cdist.all_reduce_mean(1.5) == pytest.approx(1.5)
    assert cdist.any_rank(False) is False
    assert made == [torch.device(device)] * 2
    cdist.barrier()
    assert fake_group[-1] == ("barrier", torch.device("cpu"), {"device_ids": [0]} if backend == "nccl" else {})


def test_collectives_on_a_real_gloo_group(gloo_group) -> None:
    assert cdist.collective_device() == torch.device("cpu")
    assert cdist.all_reduce_mean(2.5) == 2.5 and cdist.any_rank(True) is True
    cdist.barrier()


# ---- the config check ---------------------------------------------------------------------
def _cfg(tiny_model_config: ModelConfig, tmp_path, **kw) -> RunConfig:
    stage = StageConfig(name="instruct", data="x.json", lm=PolicyConfig(mode="full"))
    return RunConfig(model=tiny_model_config, stages=[stage], output_dir=str(tmp_path / "run"), **kw)


def test_config_check_refuses_before_any_model_is_built(tiny_model_config, tmp_path, monkeypatch) -> None:
    def build(*a, **k):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(VisionLanguageModel, "build", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"backend 'nccl' needs CUDA GPUs, and torch sees none"):
        Trainer(_cfg(tiny_model_config, tmp_path, backend="nccl"), dist_info=DistInfo(0, 2, 0, torch.device("cpu")))
    fsdp = _cfg(tiny_model_config, tmp_path, strategy="fsdp")
    with monkeypatch.context() as m:
        m.setattr(dist, "is_available", lambda: False)
        with pytest.raises(ValueError, match=r"2 processes need torch.distributed, which this torch build lacks "
                                             r"\(strategy 'fsdp'\); run one process"):
            Trainer(fsdp, dist_info=DistInfo(0, 2, 0, torch.device("cpu")))
        check_parallel_config(fsdp, world=1, cuda=False)  # one process ignores the strategy
    check_parallel_config(fsdp, world=2, cuda=False)
    check_parallel_config(_cfg(tiny_model_config, tmp_path, backend="nccl"), world=2, cuda=True)


def test_fsdp_names_an_lm_whose_layers_it_cannot_find(tiny_model) -> None:
    from chiasm.train.fsdp import shard_groups

    tiny_model.base_lm.model.layers = nn.Sequential(*tiny_model.base_lm.model.layers)  # not a ModuleList
    with pytest.raises(NotImplementedError, match=r"strategy 'fsdp' shards the LM layer by layer and can't find "
                                                  r"its layers: LlamaForCausalLM: .*use strategy 'ddp'"):
        shard_groups(tiny_model, tiny_model)


# ---- parameters that reach no loss ----------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_vision_tower(tmp_path_factory.mktemp("clip"))


def _tower_model(tiny_model_config: ModelConfig, clip_dir, feature_layer: int) -> VisionLanguageModel:
    cfg = copy.deepcopy(tiny_model_config)
    cfg.encoder = EncoderConfig(name="hf-vision", source=str(clip_dir), feature_layer=feature_layer, image_size=32)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    apply_stage_policies(model, {"encoder": PolicyConfig(mode="full"), "bridge": PolicyConfig(mode="full"),
                                 "lm": PolicyConfig(mode="frozen")})
    return model


def _loss_fn(model: VisionLanguageModel, tiny_world):
    prepared, _ = prepare(load_llava(tiny_world.instruct).samples[:2], model)
    batch = collate(prepared, model.tokenizer.pad_token_id, model=model)
    return lambda m: m(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss


@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_probe_names_the_tower_layers_after_the_feature_layer(tiny_model_config, tiny_world, clip_dir,
                                                              feature_layer: int) -> None:
    model = _tower_model(tiny_model_config, clip_dir, feature_layer)
    names = unused_parameters(_loss_fn(model, tiny_world)(model), model)
    # CLIP's pooled output (post_layernorm) is computed but feeds no loss either way.
    expected = {"encoder.tower.post_layernorm.weight", "encoder.tower.post_layernorm.bias"}
    if feature_layer == -2:
        expected |= {n for n, _ in model.named_parameters() if n.startswith("encoder.tower.encoder.layers.1.")}
    assert set(names) == expected
    assert feature_layer == -1 or len(expected) > 2
    # With a gradient computed, exactly these parameters are the ones left without one.
    _loss_fn(model, tiny_world)(model).backward()
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == expected


def test_probe_keeps_the_rng_and_obeys_the_config(tiny_model_config, tiny_world, clip_dir, caplog) -> None:
    model = _tower_model(tiny_model_config, clip_dir, -2)
    loss_fn = _loss_fn(model, tiny_world)

    def noisy(m):  # a loss that draws random numbers, like dropout
        return loss_fn(m) + 0 * torch.rand(3).sum()

    before = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="chiasm.train.parallel"):
        assert needs_unused_search(model, noisy, None, torch.device("cpu")) is True
    assert torch.equal(torch.get_rng_state(), before)
    assert "get no gradient from this stage's loss (encoder.tower.encoder.layers.1." in caplog.text
    never = lambda m: pytest.fail("the config decided: no probe")  # noqa: E731
    assert needs_unused_search(model, never, False, torch.device("cpu")) is False
    assert needs_unused_search(model, never, True, torch.device("cpu")) is True
    # Text-only samples: some batch will skip the encoder and bridge, whatever the first batch used.
    with caplog.at_level(logging.INFO, logger="chiasm.train.parallel"):
        assert needs_unused_search(model, never, None, torch.device("cpu"), text_only_samples=True) is True
    assert "samples without images" in caplog.text
    assert all(p.grad is None for p in model.parameters())


# ---- CUDA RNG in checkpoints ------------------------------------------------------------------
class FakeCuda:
    """Two CUDA devices' generator states, as torch.cuda would hand them out."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, current: int = 0):
        self.states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
        self.set_all: list[list[torch.Tensor]] = []
        self.set_one: list[tuple[torch.Tensor, int]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: self.set_all.append(list(s)))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": self.set_one.append((s, device)))


def _save(folder, state_dict_source: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(state_dict_source.parameters(), lr=0.1)
    state_dict_source(torch.ones(1, 2)).sum().backward()
    opt.step()
    params, opt_state = ckpt.gather_state(state_dict_source, {"weight", "bias"}, opt)
    ckpt.save_checkpoint(folder, params, {"weight", "bias"}, opt_state, ckpt.TrainState(0, 1, False))
    return opt


def test_resume_restores_each_cuda_device_rng(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(2, 2)
    writer = FakeCuda(monkeypatch, current=0)
    opt = _save(tmp_path / "ck", layer)
    reader = FakeCuda(monkeypatch, current=1)  # another rank, training on device 1
    reader.states = [torch.zeros(16, dtype=torch.uint8)] * 2
    ckpt.load_optimizer_and_rng(tmp_path / "ck", opt)
    (restored,) = reader.set_all
    assert all(torch.equal(a, b) for a, b in zip(restored, writer.states, strict=True))
    (state, device), = reader.set_one
    assert device == 1 and torch.equal(state, writer.states[0])  # device 1 goes on with rank 0's stream


def test_checkpoint_without_cuda_has_only_the_cpu_rng(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    layer = nn.Linear(2, 2)
    opt = _save(tmp_path / "ck", layer)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "ck" / "rng.safetensors"))) == {"torch"}
    expected = torch.get_rng_state()
    torch.rand(5)
    ckpt.load_optimizer_and_rng(tmp_path / "ck", opt)
    assert torch.equal(torch.get_rng_state(), expected)
    # A checkpoint written with CUDA, read without it: the CPU state comes back and a warning says why not CUDA's.
    FakeCuda(monkeypatch)
    _save(tmp_path / "gpu", layer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="chiasm.train.checkpoint"):
        ckpt.load_optimizer_and_rng(tmp_path / "gpu", opt)
    assert "holds CUDA RNG states but CUDA is not available" in caplog.text


# ---- FSDP and back, on a one-rank group ------------------------------------------------------
@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unshard_for_good_leaves_a_plain_trainable_model(tiny_model, tiny_world, gloo_group) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from chiasm.train.fsdp import full_optimizer_state, shard, shard_optimizer_state, unshard_for_good

    model = tiny_model
    apply_stage_policies(model, {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                                 "lm": PolicyConfig(mode="full")})
    loss_fn = _loss_fn(model, tiny_world)
    reference = copy.deepcopy(model.state_dict())
    plain_loss = loss_fn(model).item()
    shard(model, model, torch.device("cpu"), 1, unused_parameters=False)
    assert isinstance(model.base_lm.model.layers[0], FSDPModule)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = loss_fn(model)
    assert loss.item() == pytest.approx(plain_loss, rel=1e-5)
    loss.backward()
    opt.step()
    saved = full_optimizer_state(opt)
    assert all(not isinstance(v, DTensor) for st in saved["state"].values() for v in st.values())
    opt.load_state_dict(shard_optimizer_state(saved, opt))
    assert all(isinstance(opt.state[p]["exp_avg"], DTensor) for p in opt.param_groups[0]["params"])
    hooks = len(model.lm.get_input_embeddings()._forward_hooks)
    unshard_for_good(model)
    assert len(model.lm.get_input_embeddings()._forward_hooks) == hooks - 1  # the input-grad hook is gone
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    lm = model.base_lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied weights stay tied
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, reference[k])}
    assert changed and all(k.startswith(("bridge.", "lm.")) for k in changed)
    # Plain again: gradients are plain tensors, and the next stage can shard the model anew.
    loss_fn(model).backward()
    assert all(p.grad is not None and not isinstance(p.grad, DTensor) for p in model.bridge.parameters())
    model.zero_grad(set_to_none=True)
    shard(model, model, torch.device("cpu"), 1, unused_parameters=False)
    loss_fn(model).backward()
    unshard_for_good(model)
