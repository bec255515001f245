"""One decoder-layer lookup for every LM family: last_n and the in-LM bridges on fused layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.bridges import gated_xattn
from chiasm.config import BridgeConfig, ModelConfig, PolicyConfig
from chiasm.lm.layers import decoder_layers, final_norm
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_lm
from chiasm.train import policy
from chiasm.train.policy import apply_policy, parameter_counts


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_lm(root / f, family=f, layers=3) for f in ("gpt_neox", "phi3")}


def _model(config: ModelConfig, lm_dir: Path, bridge: BridgeConfig | None = None) -> VisionLanguageModel:
    config.lm.source = str(lm_dir)
    if bridge is not None:
        config.bridge = bridge
    torch.manual_seed(0)
    return VisionLanguageModel.build(config).eval()


def test_one_lookup_finds_each_familys_layers(tiny_model, tiny_model_config, family_dirs) -> None:
    assert gated_xattn.decoder_layers is decoder_layers  # the old import path is the same function
    assert decoder_layers(tiny_model.lm) is tiny_model.base_lm.model.layers
    neox = _model(tiny_model_config, family_dirs["gpt_neox"])
    assert decoder_layers(neox.lm) is neox.base_lm.gpt_neox.layers
    assert final_norm(neox.lm) is neox.base_lm.gpt_neox.final_layer_norm
    phi = _model(tiny_model_config, family_dirs["phi3"])
    apply_policy(phi, "lm", PolicyConfig(mode="lora", lora_r=2))  # through the peft wrapper too
    assert decoder_layers(phi.lm) is phi.base_lm.model.layers and len(decoder_layers(phi.lm)) == 3
    assert final_norm(phi.lm) is phi.base_lm.model.norm
    assert policy._blocks(phi, "lm") == list(phi.base_lm.model.layers)


@pytest.mark.parametrize(("family", "prefix", "norm"), [("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
                                                         ("phi3", "model.layers", "model.norm")])
def test_last_n_on_other_families(tiny_model_config, family_dirs, family, prefix, norm) -> None:
    model = _model(tiny_model_config, family_dirs[family])
    apply_policy(model, "lm", PolicyConfig(mode="last_n", last_n=1))
    names = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert names and all(n.startswith((f"{prefix}.2.", f"{norm}.")) for n in names)
    last = dict(model.lm.named_modules())[f"{prefix}.2"]
    expected = sum(p.numel() for p in last.parameters()) + sum(
        p.numel() for p in dict(model.lm.named_modules())[norm].parameters())
    assert parameter_counts(model)["lm"]["trainable"] == expected


@pytest.mark.parametrize("family", ["gpt_neox", "phi3"])
def test_gated_xattn_runs_inside_fused_layouts(tiny_model_config, family_dirs, family) -> None:
    bridge = BridgeConfig("gated_xattn", {"every": 1, "num_latents": 4, "heads": 4})
    model = _model(tiny_model_config, family_dirs[family], bridge)
    assert len(model.bridge.blocks) == 3
    img = model.image_token_id
    ids = torch.tensor([[5, 6, img, 7, 8]])
    feats = torch.randn(1, 16, model.encoder.dim)
    with torch.no_grad():
        embeds, layer_inputs = model.lm_inputs(ids, feats)
        closed = model.lm(inputs_embeds=embeds, **layer_inputs).logits
        with model.bridge.bypassed():
            bare = model.lm(inputs_embeds=embeds, **layer_inputs).logits
        torch.testing.assert_close(closed, bare, rtol=0, atol=1e-6)  # closed gates: the bare LM
        for block in model.bridge.blocks:
            block.gate_attn.fill_(1.0)
        opened = model.lm(inputs_embeds=embeds, **layer_inputs).logits
    diff = (opened - bare).abs().amax(-1)[0]
    assert torch.all(diff[:2] == 0) and torch.all(diff[2:] > 0)  # the hooks act from the image on


@pytest.mark.parametrize(("family", "found"), [
    ("gpt_neox", "attention.query_key_value, attention.dense"),
    ("phi3", "self_attn.o_proj, self_attn.qkv_proj"),
])
def test_visual_expert_refuses_fused_attention_at_build(tiny_model_config, family_dirs, family, found) -> None:
    with pytest.raises(NotImplementedError) as err:
        _model(tiny_model_config, family_dirs[family], BridgeConfig("visual_expert"))
    lm = "GPTNeoXForCausalLM" if family == "gpt_neox" else "Phi3ForCausalLM"
    assert str(err.value) == (
        f"visual_expert copies separate self_attn.q_proj/k_proj/v_proj/o_proj projections and an mlp in every "
        f"decoder layer, but {lm}'s layer 0 has the attention linear layers {found}: fused (Phi-3, GPT-NeoX) or "
        "differently named projections cannot be copied per role; choose another bridge (gated_xattn works inside "
        "any decoder)")


def test_final_norm_is_the_one_after_the_layers() -> None:
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=2))
    # BLOOM also normalises its embeddings (word_embeddings_layernorm, before the layers).
    assert decoder_layers(bloom) is bloom.transformer.h and final_norm(bloom) is bloom.transformer.ln_f
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    assert decoder_layers(gpt2) is gpt2.transformer.h and final_norm(gpt2) is gpt2.transformer.ln_f
