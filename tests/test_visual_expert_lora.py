"""Visual expert + LoRA on the LM: the saved (LoRA-merged) model computes what the trained one did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from chiasm.config import BridgeConfig, ModelConfig, PolicyConfig
from chiasm.model import VisionLanguageModel
from chiasm.train.policy import apply_policy


def _lora_model(cfg: ModelConfig, targets: list[str]) -> VisionLanguageModel:
    cfg.bridge = BridgeConfig("visual_expert")
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=4, lora_targets=targets))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained look: non-zero LoRA updates, experts apart from the LM
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            elif name.startswith("bridge.experts."):
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _inputs(model: VisionLanguageModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img = model.image_token_id
    ids = torch.tensor([[5, 6] + [img] * 16 + [7, 8, 9], [11] * 3 + [img] * 16 + [12, 13]])
    torch.manual_seed(2)
    return ids, torch.ones_like(ids), torch.randn(2, 16, model.encoder.dim)


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]],
                         ids=["attention", "attention+mlp"])
def test_saved_model_gives_the_trained_logits(tiny_model_config: ModelConfig, tmp_path: Path,
                                              targets: list[str]) -> None:
    model = _lora_model(tiny_model_config, targets)
    ids, mask, feats = _inputs(model)
    with torch.no_grad():
        trained = model(ids, mask, features=feats).logits
        with model.lm.disable_adapter():
            no_lora = model(ids, mask, features=feats).logits
        loaded = VisionLanguageModel.load(model.save(tmp_path / "m"))
        after = loaded(ids, mask, features=feats).logits
        text = loaded.lm(input_ids=ids[:, :2]).logits
    assert (trained - no_lora).abs().max() > 1e-3  # the LoRA update matters, image tokens included
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text, trained[:, :2], rtol=1e-4, atol=1e-5)
    # Saving left the live model as it was: its experts and adapters are untouched.
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, features=feats).logits, trained, rtol=0, atol=0)


def test_dora_cannot_be_folded_and_says_so(tiny_model_config: ModelConfig, tmp_path: Path) -> None:
    from peft import get_peft_model

    tiny_model_config.bridge = BridgeConfig("visual_expert")
    model = VisionLanguageModel.build(tiny_model_config)
    model.lm = get_peft_model(model.lm, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match=r"layer 0 self_attn.q_proj uses DoRA"):
        model.save(tmp_path / "m")
