"""The retention baseline is the bare LM, whatever an in-LM bridge installed inside the LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.config import BridgeConfig, EvalConfig, ModelConfig, PolicyConfig
from chiasm.eval import retention
from chiasm.eval.evaluate import retention_report
from chiasm.lm.loader import load_language_model
from chiasm.model import VisionLanguageModel
from chiasm.train.policy import apply_policy

EVAL = EvalConfig(retention_tokens=512, retention_prompts=3)


def _trained(cfg: ModelConfig, bridge: BridgeConfig) -> VisionLanguageModel:
    """A model as an instruct stage leaves it: LoRA on the LM, the bridge's parts away from identity."""
    cfg.bridge = bridge
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif name.startswith("bridge.blocks.") and ".gate_" in name:
                p.fill_(0.7)
            elif name.startswith("bridge.experts."):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _bare(tiny_lm_dir: Path) -> dict:
    lm, tok = load_language_model(str(tiny_lm_dir))
    lm.eval()
    text = retention.held_out_text()
    ppl, _ = retention.perplexity(lm, tok, text, max_tokens=EVAL.retention_tokens)
    return {"ppl": ppl, "answers": retention.greedy_answers(lm, tok, retention.TEXT_PROMPTS[: EVAL.retention_prompts]),
            "logits": lm(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits}


@pytest.mark.parametrize("bridge", [BridgeConfig("gated_xattn", {"every": 1, "num_latents": 4, "heads": 4}),
                                    BridgeConfig("visual_expert")], ids=["gated_xattn", "visual_expert"])
def test_retention_base_is_the_bare_lm(tiny_model_config: ModelConfig, tiny_lm_dir: Path,
                                       bridge: BridgeConfig) -> None:
    model = _trained(tiny_model_config, bridge)
    with torch.no_grad():
        bare = _bare(tiny_lm_dir)
        report = retention_report(model, EVAL)
    assert report["base_ppl"] == pytest.approx(bare["ppl"], rel=1e-5)
    assert report["base"]["answers"] == bare["answers"]
    assert report["model_ppl"] != pytest.approx(bare["ppl"], rel=1e-3)  # the trained model does differ
    # After the comparison the model's own modules are back on.
    with torch.no_grad():
        again = retention_report(model, EVAL, base=report["base"])
    assert again["model_ppl"] == pytest.approx(report["model_ppl"], rel=1e-6)


def test_visual_expert_text_only_calls_are_the_bare_lm(tiny_model_config: ModelConfig, tiny_lm_dir: Path) -> None:
    """With the LM frozen, trained experts leave text exactly as the bare LM computes it."""
    tiny_model_config.bridge = BridgeConfig("visual_expert")
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_model_config).eval()
    with torch.no_grad():
        for p in model.bridge.experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        bare = _bare(tiny_lm_dir)
        text = model.lm(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits
        report = retention_report(model, EVAL)
    assert torch.equal(text, bare["logits"])
    assert report["model_ppl"] == pytest.approx(bare["ppl"], rel=1e-6)
    assert report["answers"] == bare["answers"] and report["unchanged_share"] == 1.0
