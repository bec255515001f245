"""The VLM data path: splicing visual tokens, the loss, gradients, persistence and generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.config import PolicyConfig
from chiasm.data.images import load_image
from chiasm.data.llava import load_llava
from chiasm.data.sample import Sample, Turn
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.world import WorldFiles
from chiasm.tokens import image_token_count
from chiasm.train.batches import Batch, collate, conversation_encoder, prepare
from chiasm.train.features import FeatureCache
from chiasm.train.policy import apply_stage_policies


def _samples(world: WorldFiles, n: int = 3) -> list[Sample]:
    return load_llava(world.instruct).samples[:n]


def _batch(model: VisionLanguageModel, samples: list[Sample], *, for_generation: bool = False) -> Batch:
    prepared, _ = prepare(samples, model, for_generation=for_generation)
    return collate(prepared, model.tokenizer.pad_token_id, left_pad=for_generation, model=model)


def _ids_with_images(model: VisionLanguageModel, layout: list[list[int | str]]) -> torch.Tensor:
    """Rows of token ids where the string "img" stands for one image's placeholder run."""
    n = model.tokens_per_image
    rows = []
    for row in layout:
        ids: list[int] = []
        for item in row:
            ids += [model.image_token_id] * n if item == "img" else [int(item)]
        rows.append(ids)
    assert len({len(r) for r in rows}) == 1
    return torch.tensor(rows)


# ---- tokens per image --------------------------------------------------------------------
def test_tokens_per_image_agrees_everywhere(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    n = tiny_model.tokens_per_image
    assert n == image_token_count(tiny_model.encoder, tiny_model.bridge) == 16  # 64 px / 16 px patches = 4 x 4
    sample = _samples(tiny_world, 1)[0]
    enc = conversation_encoder(tiny_model)
    assert enc.tokens_per_image == n
    ids = enc.encode(sample).input_ids
    assert ids.count(tiny_model.image_token_id) == n * len(sample.images)
    pixels = tiny_model.encoder.preprocess(load_image(sample.images[0]))[None]
    assert tiny_model.visual_tokens(tiny_model.encode_images(pixels)).shape == (1, n, 64)


def test_image_token_lies_outside_the_lm_vocabulary(tiny_model: VisionLanguageModel) -> None:
    # The LM's embedding table is never resized; image positions are replaced, never embedded.
    assert tiny_model.image_token_id >= tiny_model.lm.get_input_embeddings().num_embeddings


# ---- embed ------------------------------------------------------------------------------
def test_embed_places_visual_tokens_at_image_positions(tiny_model: VisionLanguageModel) -> None:
    model = tiny_model.eval()
    # Row 0: 2 + 16 + 2 + 16 + 1 = 37 ids; row 1: 1 + 16 + 20 = 37 ids.
    ids = _ids_with_images(model, [[1, 5, "img", 7, 8, "img", 9], [1, "img", *range(3, 23)]])
    features = torch.randn(3, 16, 32)
    with torch.no_grad():
        embeds = model.embed(ids, features)
        vis = model.visual_tokens(features)
        text = model.lm.get_input_embeddings()(ids.clamp(max=model.image_token_id - 1))
    assert embeds.shape == (2, ids.shape[1], 64)
    is_image = ids == model.image_token_id
    # Images are consumed in row-major placeholder order: row 0 holds images 0 and 1, row 1 image 2.
    assert torch.equal(embeds[0, 2:18], vis[0])
    assert torch.equal(embeds[0, 20:36], vis[1])
    assert torch.equal(embeds[1, 1:17], vis[2])
    assert torch.equal(embeds[is_image], vis.reshape(-1, 64))
    assert torch.equal(embeds[~is_image], text[~is_image])


def test_embed_text_only(tiny_model: VisionLanguageModel) -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = tiny_model.lm.get_input_embeddings()(ids)
        assert torch.equal(tiny_model.embed(ids, None), expected)
        assert torch.equal(tiny_model.embed(ids, torch.zeros(0, 16, 32)), expected)


@pytest.mark.parametrize("n_features", [0, 1, 3])
def test_embed_rejects_image_count_mismatch(tiny_model: VisionLanguageModel, n_features: int) -> None:
    ids = _ids_with_images(tiny_model, [[1, "img", 2, "img", 3]])  # two images' worth of positions
    features = None if n_features == 0 else torch.randn(n_features, 16, 32)
    with pytest.raises(ValueError, match="image"):
        tiny_model.embed(ids, features)


def test_embed_rejects_images_without_placeholders(tiny_model: VisionLanguageModel) -> None:
    with pytest.raises(ValueError, match="0 image-token positions"):
        tiny_model.embed(torch.tensor([[1, 2, 3]]), torch.randn(1, 16, 32))


# ---- forward / loss / gradients ---------------------------------------------------------
def test_loss_is_cross_entropy_over_label_positions(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    model = tiny_model.eval()
    batch = _batch(model, _samples(tiny_world, 3))
    assert batch.pixels is not None and batch.pixels.shape == (3, 3, 64, 64)
    assert (batch.attention_mask == 0).any()  # rows of different lengths: padding is exercised
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels, return_logits=True)
        fast = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels)
    # The head-on-answers-only path gives the same loss as the full-logits path.
    assert fast.logits is None and fast.loss is not None
    assert float(fast.loss) == pytest.approx(float(out.loss), rel=1e-5)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    nll, count = 0.0, 0
    for r in range(batch.input_ids.shape[0]):
        for t in range(batch.input_ids.shape[1] - 1):
            target = int(batch.labels[r, t + 1])
            if target != -100:
                nll -= float(logp[r, t, target])
                count += 1
    assert count == int((batch.labels[:, 1:] != -100).sum()) > 0
    assert out.loss is not None
    assert float(out.loss) == pytest.approx(nll / count, rel=1e-5)
    # Cached features give exactly the same result as pixels.
    with torch.no_grad():
        feats = model.encode_images(batch.pixels)
        again = model(batch.input_ids, batch.attention_mask, batch.labels, features=feats, return_logits=True)
    assert torch.equal(again.logits, out.logits)
    assert torch.equal(again.loss, out.loss)
    # The feature cache (stored in float16) feeds the same images in the same order.
    prepared, _ = prepare(_samples(tiny_world, 3), model)
    cache = FeatureCache.build(model.encoder, batch.image_paths, show_progress=False)
    cached = collate(prepared, model.tokenizer.pad_token_id, features=cache)
    assert cached.pixels is None and cached.features is not None
    torch.testing.assert_close(cached.features, feats, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        from_cache = model(cached.input_ids, cached.attention_mask, cached.labels, features=cached.features)
    assert float(from_cache.loss) == pytest.approx(float(out.loss), rel=1e-3)


def test_gradients_reach_bridge_not_frozen_parts(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    model = tiny_model.train()
    apply_stage_policies(model, {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                                 "lm": PolicyConfig(mode="frozen")})
    batch = _batch(model, _samples(tiny_world, 2))
    out = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels)
    out.loss.backward()
    for name, p in model.bridge.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    for comp in (model.encoder, model.lm):
        for name, p in comp.named_parameters():
            assert not p.requires_grad and p.grad is None, name


def test_forward_without_labels_has_no_loss(tiny_model: VisionLanguageModel) -> None:
    ids = torch.tensor([[1, 2, 3]])
    out = tiny_model(ids, torch.ones_like(ids))
    assert out.loss is None and out.logits.shape == (1, 3, tiny_model.lm.config.vocab_size)


# ---- persistence -------------------------------------------------------------------------
def _logits(model: VisionLanguageModel, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask, pixels=batch.pixels).logits


def test_save_load_gives_identical_logits(tiny_model: VisionLanguageModel, tiny_world: WorldFiles,
                                          tmp_path: Path) -> None:
    with torch.no_grad():  # move every part off its initialisation so nothing matches by chance
        for p in tiny_model.bridge.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch = _batch(tiny_model, _samples(tiny_world, 2))
    before = _logits(tiny_model, batch)
    folder = tiny_model.save(tmp_path / "model")
    for name in ("chiasm_config.json", "bridge.safetensors", "encoder.safetensors", "lm/config.json"):
        assert (folder / name).is_file(), name
    loaded = VisionLanguageModel.load(folder)
    assert loaded.config == tiny_model.config
    assert loaded.image_token_id == tiny_model.image_token_id
    assert loaded.tokens_per_image == tiny_model.tokens_per_image
    assert torch.equal(_logits(loaded, batch), before)


def test_save_load_after_lora_merges_adapters(tiny_model: VisionLanguageModel, tiny_world: WorldFiles,
                                              tmp_path: Path) -> None:
    apply_stage_policies(tiny_model, {"encoder": PolicyConfig(mode="frozen"), "bridge": PolicyConfig(mode="full"),
                                      "lm": PolicyConfig(mode="lora", lora_r=4)})
    batch = _batch(tiny_model, _samples(tiny_world, 2))
    base = _logits(tiny_model, batch)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters actually change the LM
        for name, p in tiny_model.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    before = _logits(tiny_model, batch)
    assert (before - base).abs().max() > 1e-3
    loaded = VisionLanguageModel.load(tiny_model.save(tmp_path / "model"))
    assert not any("lora" in name for name, _ in loaded.lm.named_parameters())  # a plain transformers LM
    # Merging changes the order of float operations; beyond rounding the logits are the same.
    torch.testing.assert_close(_logits(loaded, batch), before, rtol=1e-5, atol=5e-5)
    # Saving merges a copy: the model being trained keeps its adapters.
    assert any("lora_B" in name for name, _ in tiny_model.lm.named_parameters())
    assert torch.equal(_logits(tiny_model, batch), before)


def test_load_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a chiasm model folder"):
        VisionLanguageModel.load(tmp_path)


# ---- generation -------------------------------------------------------------------------
def test_generate_with_and_without_cache_agree(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    model = tiny_model.eval()
    samples = load_llava(tiny_world.eval).samples[:2]
    samples.append(Sample("extra", [Turn("human", "<image>\nIs there a red circle? Answer yes or no, please.")],
                          [samples[0].images[0]]))
    batch = _batch(model, samples, for_generation=True)
    assert (batch.attention_mask[:, 0] == 0).any()  # left padding is exercised
    assert (batch.attention_mask[:, -1] == 1).all()
    cached = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=12,
                            use_cache=True)
    plain = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=12,
                           use_cache=False)
    assert cached == plain
    assert len(cached) == 3 and all(len(row) <= 12 for row in cached)
    assert any(len(row) > 0 for row in cached)
    # Each row is the greedy continuation of its own prompt, whatever the padding.
    single = _batch(model, samples[2:], for_generation=True)
    alone = model.generate(single.input_ids, single.attention_mask, pixels=single.pixels, max_new_tokens=12)
    assert alone[0] == cached[2]
