"""In-LM bridges keep no per-batch state: beam search, batching, LoRA and cached decoding agree."""

from __future__ import annotations

import pytest
import torch

from chiasm.bridges.layer_inputs import IMAGE_MEMORY, IMAGE_OF_TOKEN, IMAGE_POSITIONS
from chiasm.config import BridgeConfig, ModelConfig, PolicyConfig
from chiasm.model import VisionLanguageModel
from chiasm.testing import randomise_lora
from chiasm.train.policy import apply_policy

IN_LM = {"visual_expert": {}, "gated_xattn": {"every": 1, "num_latents": 4, "heads": 4}}


def _trained_like(model: VisionLanguageModel) -> VisionLanguageModel:
    """Move the bridge away from its identity start so that images change the LM's output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.bridge.named_parameters():
            if name.startswith("experts."):
                p.add_(torch.randn_like(p) * 0.5 * p.std().clamp(min=0.02))
            elif "gate" in name:
                p.fill_(0.8)
    return model.eval()


@pytest.fixture(params=sorted(IN_LM))
def model(request, tiny_model_config: ModelConfig) -> VisionLanguageModel:
    tiny_model_config.bridge = BridgeConfig(request.param, dict(IN_LM[request.param]))
    torch.manual_seed(0)
    return _trained_like(VisionLanguageModel.build(tiny_model_config))


def _prompt(model: VisionLanguageModel, before: list[int], after: list[int]) -> list[int]:
    return before + [model.image_token_id] * model.tokens_per_image + after


def _left_pad(model: VisionLanguageModel, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _beam(model: VisionLanguageModel, rows: list[list[int]], feats: torch.Tensor, **kwargs) -> list[list[int]]:
    ids, mask = _left_pad(model, rows)
    with torch.no_grad():
        embeds, layer_inputs = model.lm_inputs(ids, feats)
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id, eos_token_id=None,
                                **kwargs, **layer_inputs)
    return out.tolist()


def _rows(model: VisionLanguageModel) -> list[list[int]]:
    return [_prompt(model, [5, 6, 7], [8, 9]), _prompt(model, [11], [12, 13, 14, 15, 16])]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_beam_search_of_a_batch_equals_each_prompt_alone(model: VisionLanguageModel, lora: bool) -> None:
    if lora:
        apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=4))
        randomise_lora(model.lm, std=0.05)
        model.eval()
    rows = _rows(model)
    torch.manual_seed(2)
    feats = torch.randn(2, 16, model.encoder.dim) * 3
    batched = _beam(model, rows, feats, num_beams=3)
    alone = [_beam(model, [row], feats[i : i + 1], num_beams=3)[0] for i, row in enumerate(rows)]
    assert batched == alone
    # The images matter: the same prompts with the images swapped continue differently.
    swapped = _beam(model, rows, feats.flip(0), num_beams=3)
    assert swapped != batched
    # Several returned beams per prompt are expanded the same way (num_return_sequences).
    both = _beam(model, rows, feats, num_beams=3, num_return_sequences=2)
    assert both[0] == batched[0] and both[2] == batched[1]


def test_greedy_search_in_lm_generate_matches_the_models_generate(model: VisionLanguageModel) -> None:
    rows = _rows(model)
    feats = torch.randn(2, 16, model.encoder.dim) * 3
    ids, mask = _left_pad(model, rows)
    greedy = _beam(model, rows, feats, num_beams=1)
    ours = model.generate(ids, mask, features=feats, max_new_tokens=6)
    for full, mine in zip(greedy, ours, strict=True):
        assert full[: len(mine)] == mine


def test_a_cached_decoding_step_equals_the_full_sequence(model: VisionLanguageModel) -> None:
    """Positions after the prompt: text for the visual expert, the row's last image for gated xattn."""
    ids, mask = _left_pad(model, _rows(model))
    feats = torch.randn(2, 16, model.encoder.dim) * 3
    nxt = torch.tensor([[17], [18]])
    with torch.no_grad():
        embeds, layer_inputs = model.lm_inputs(ids, feats)
        prefill = model.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **layer_inputs)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model.lm(inputs_embeds=model.lm.get_input_embeddings()(nxt), attention_mask=step_mask,
                        past_key_values=prefill.past_key_values, use_cache=True, **layer_inputs).logits
        full_embeds = torch.cat([embeds, model.lm.get_input_embeddings()(nxt)], 1)
        full = model.lm(inputs_embeds=full_embeds, attention_mask=step_mask, use_cache=False, **layer_inputs).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_no_batch_state_stays_on_the_bridge(model: VisionLanguageModel) -> None:
    ids, mask = _left_pad(model, _rows(model))
    feats = torch.randn(2, 16, model.encoder.dim)
    text = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model.lm(input_ids=text).logits
        model(ids, mask, features=feats)
        model.generate(ids, mask, features=feats, max_new_tokens=3)
        after = model.lm(input_ids=text).logits
    assert torch.equal(before, after)
    assert not hasattr(model.bridge, "bind") and not hasattr(model.bridge, "release")
    assert not getattr(model.bridge, "_in_call", {})  # the visual expert's per-layer lookup is dropped


def test_layer_inputs_have_the_batch_first(model: VisionLanguageModel) -> None:
    ids, _ = _left_pad(model, _rows(model))
    _, layer_inputs = model.lm_inputs(ids, torch.randn(2, 16, model.encoder.dim))
    names = {"visual_expert": {IMAGE_POSITIONS}, "gated_xattn": {IMAGE_MEMORY, IMAGE_OF_TOKEN}}
    assert set(layer_inputs) == names[model.config.bridge.name]
    assert all(t.shape[0] == 2 for t in layer_inputs.values())
    assert model.lm_inputs(torch.tensor([[5, 6]]), None)[1] == {}


def test_generate_still_rejects_a_misspelt_argument(model: VisionLanguageModel) -> None:
    with pytest.raises(ValueError, match="chiasm_image_positionz"):
        model.lm.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=1,
                          chiasm_image_positionz=torch.zeros(1, 2, dtype=torch.bool))
