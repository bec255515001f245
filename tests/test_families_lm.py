"""Every common causal-LM family works as the LM, from a local folder, with its own chat template.

Each family is a tiny randomly initialised checkpoint of the real transformers class
(Qwen2.5 uses Qwen2's class, SmolLM2 Llama's), written once per module with a tokenizer
that follows the family's chat conventions. For each: a VLM (CLIP tower + MLP bridge + that
LM) computes a finite loss that equals the full-logits loss, trains one LoRA step whose
adapters sit on exactly the LM's own linear layers, generates greedily as a step-by-step
argmax does, and saves and loads to the same logits. A whole multimodal Gemma 3 folder
gives its text model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

from chiasm.chat_template import stop_token_ids
from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig, PolicyConfig
from chiasm.data.llava import load_llava
from chiasm.data.sample import Sample
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.world import WorldFiles
from chiasm.testing import make_tiny_lm, make_tiny_vision_tower
from chiasm.train.lora_targets import linear_layer_names
from chiasm.train.policy import apply_policy

# family -> (transformers model_type, chat style of its instruct checkpoints)
FAMILIES = {
    "llama": ("llama", "llama3"),
    "smollm2": ("llama", "chatml"),
    "qwen2": ("qwen2", "chatml"),
    "qwen3": ("qwen3", "qwen3"),
    "mistral": ("mistral", "mistral"),
    "phi3": ("phi3", "phi3"),
    "gemma2": ("gemma2", "gemma"),
    "gemma3": ("gemma3_text", "gemma"),
    "olmo": ("olmo", "tulu"),
    "olmo2": ("olmo2", "tulu"),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-families")
    dirs = {name: make_tiny_lm(root / name, family=kind, chat=chat) for name, (kind, chat) in FAMILIES.items()}
    return {**dirs, "tower": make_tiny_vision_tower(root / "tower")}


@pytest.fixture(scope="module")
def samples(tiny_world: WorldFiles) -> list[Sample]:
    return load_llava(tiny_world.instruct).samples[:2]


def _build(lm_dir: Path, tower: Path) -> VisionLanguageModel:
    cfg = ModelConfig(encoder=EncoderConfig(name="hf-vision", source=str(tower), feature_layer=-2),
                      bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(lm_dir)))
    torch.manual_seed(0)
    return VisionLanguageModel.build(cfg)


def _reference_greedy(model: VisionLanguageModel, sample: Sample, n: int) -> list[int]:
    """Greedy tokens by a full forward pass per token (no cache), cut at the first stop token."""
    batch = model.processor([sample], for_generation=True)
    ids, mask, stop, out = batch.input_ids, batch.attention_mask, stop_token_ids(model.base_lm, model.tokenizer), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, mask, pixels=batch.pixels, return_logits=True).logits
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
            ids, mask = torch.cat([ids, ids.new_tensor([[token]])], 1), torch.cat([mask, mask.new_ones(1, 1)], 1)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_trains_generates_and_round_trips(family: str, parts: dict[str, Path], samples: list[Sample],
                                                         tmp_path: Path) -> None:
    model = _build(parts[family], parts["tower"])
    assert model.base_lm.config.model_type == FAMILIES[family][0]
    batch = model.processor(samples)
    # The template's answers (and only they, with the turn close) are supervised.
    supervised = model.tokenizer.decode(batch.input_ids[0][batch.labels[0] != -100])
    turns = samples[0].conversations
    assert all(t.text in supervised for t in turns if t.role == "gpt")
    assert not any(t.text.replace("<image>", "").strip() in supervised for t in turns if t.role == "human")

    loss = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss
    full = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels, return_logits=True)
    assert torch.isfinite(loss) and torch.allclose(loss, full.loss, atol=1e-5)

    # Greedy generation with the KV cache (sliding windows, soft-capping...) = argmax step by step.
    prompt = model.processor(samples[:1], for_generation=True)
    generated = model.generate(prompt.input_ids, prompt.attention_mask, pixels=prompt.pixels, max_new_tokens=4)
    assert generated == [_reference_greedy(model, samples[0], 4)] and generated[0]

    # LoRA on every linear layer the family has (named its own way), not on the output head.
    head = model.base_lm.get_output_embeddings()
    own = linear_layer_names(model.base_lm) - {n.rsplit(".", 1)[-1] for n, m in model.base_lm.named_modules()
                                               if m is head}
    apply_policy(model, "lm", PolicyConfig(mode="lora", lora_r=2))
    apply_policy(model, "bridge", PolicyConfig(mode="full"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.lm.named_parameters() if ".lora_A" in n}
    assert adapted == own and own
    frozen = {n: p.detach().clone() for n, p in model.lm.named_parameters() if not p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    model.train()
    loss = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss
    assert after < loss
    assert all(torch.equal(p, frozen[n]) for n, p in model.lm.named_parameters() if n in frozen)
    assert any(bool(p.detach().abs().sum() > 0) for n, p in model.lm.named_parameters() if "lora_B" in n)

    folder = model.save(tmp_path / "model")  # LoRA merged into a plain checkpoint of the family
    loaded = VisionLanguageModel.load(folder)
    assert type(loaded.base_lm) is type(model.base_lm)
    with torch.no_grad():
        before = model(batch.input_ids, batch.attention_mask, pixels=batch.pixels, return_logits=True).logits
        again = loaded(batch.input_ids, batch.attention_mask, pixels=batch.pixels, return_logits=True).logits
    torch.testing.assert_close(again, before, atol=1e-5, rtol=1e-5)


def test_a_multimodal_gemma3_folder_gives_its_text_model(parts: dict[str, Path], tmp_path: Path) -> None:
    text = AutoConfig.from_pretrained(parts["gemma3"])
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=3, boi_token_index=3, eoi_token_index=3)
    torch.manual_seed(0)
    full = Gemma3ForConditionalGeneration(config).eval()
    full.save_pretrained(tmp_path / "gemma3")
    AutoTokenizer.from_pretrained(parts["gemma3"]).save_pretrained(tmp_path / "gemma3")

    model = _build(tmp_path / "gemma3", parts["tower"])
    assert type(model.base_lm).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in n for n, _ in model.base_lm.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model.base_lm(ids).logits, full(input_ids=ids).logits, atol=0, rtol=0)
    folder = model.save(tmp_path / "model")
    assert AutoConfig.from_pretrained(folder / "lm").model_type == "gemma3_text"


def test_a_saved_model_reloads_its_lm_with_the_trust_remote_code_it_was_built_with(
        parts: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _build(parts["qwen2"], parts["tower"])
    model.config.lm.trust_remote_code = True
    folder = model.save(tmp_path / "model")
    seen: list[tuple[str, object]] = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        def spy(cls, *args, _original=auto.from_pretrained.__func__, _name=auto.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    assert VisionLanguageModel.load(folder).config.lm.trust_remote_code is True
    assert sorted(seen) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]
