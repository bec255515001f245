"""Sequence packing: the same loss as one sample per row, and no attention across samples."""

from __future__ import annotations

import pytest
import torch

from chiasm.config import BridgeConfig, StageConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.train.batches import conversation_encoder
from chiasm.train.loader import Collator, SampleDataset, StageLoader
from chiasm.train.packing import build_rows, pack_rows
from chiasm.train.trainer import StagePlan


def test_first_fit_decreasing_respects_capacity_and_keeps_samples_whole() -> None:
    lengths = [70, 20, 55, 30, 45, 10, 90]
    rows = pack_rows(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert rows == [[5, 6], [0, 3], [2, 4], [1]]  # longest first, each into the first row with room
    assert rows == pack_rows(lengths, 100)
    with pytest.raises(ValueError, match="sample at position 6 has 90 tokens, more than the packing length 80"):
        pack_rows(lengths, 80)


def test_rows_restart_positions_and_ignore_each_samples_first_label() -> None:
    seqs = [([1, 2, 3], [-100, 5, 6]), ([7, 8], [9, 10])]
    ids, mask, labels, pos = build_rows(seqs, [[0, 1]], pad_id=0, packed=True)
    assert ids.tolist() == [[1, 2, 3, 7, 8]] and mask.tolist() == [[1] * 5]
    assert labels.tolist() == [[-100, 5, 6, -100, 10]] and pos.tolist() == [[0, 1, 2, 0, 1]]
    ids, mask, labels, pos = build_rows(seqs, [[0], [1]], pad_id=0, packed=True)
    assert pos.tolist() == [[0, 1, 2], [0, 1, 0]]  # the padding forms a block of its own
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def _batches(model: VisionLanguageModel, world, n: int, pack_length: int):
    samples = load_llava(world.instruct).samples[:n]
    enc = conversation_encoder(model)
    ds = SampleDataset(samples, enc, preprocess=model.processor.image)
    items = [ds[i] for i in range(n)]
    pad = model.tokenizer.pad_token_id
    return Collator(pad, cached=False)(items), Collator(pad, pack_length=pack_length, cached=False)(items)


def _loss(model: VisionLanguageModel, b, **kw) -> torch.Tensor:
    return model(b.input_ids, b.attention_mask, b.labels, pixels=b.pixels, position_ids=b.position_ids, **kw).loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_length", [512, 300])
def test_packed_loss_equals_unpacked_loss(tiny_model, tiny_world, attn, pack_length) -> None:
    tiny_model.base_lm.set_attn_implementation(attn)
    tiny_model.eval()
    plain, packed = _batches(tiny_model, tiny_world, 6, pack_length)
    assert plain.input_ids.shape[0] == 6 and packed.input_ids.shape[0] < 6
    assert packed.input_ids.shape[1] <= pack_length
    assert int(packed.attention_mask.sum()) == int(plain.attention_mask.sum())
    # Every row holds whole images: its image-token count is a multiple of the tokens per image.
    per_row = (packed.input_ids == tiny_model.image_token_id).sum(1)
    assert ((per_row % tiny_model.tokens_per_image) == 0).all()
    with torch.no_grad():
        ref = _loss(tiny_model, plain)
        torch.testing.assert_close(_loss(tiny_model, packed), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_loss(tiny_model, packed, return_logits=True), ref, rtol=1e-5, atol=1e-5)


def test_changing_one_sample_leaves_the_other_samples_logits_unchanged(tiny_model, tiny_world) -> None:
    tiny_model.eval()
    _, packed = _batches(tiny_model, tiny_world, 2, 512)
    assert packed.input_ids.shape[0] == 1
    starts = (packed.position_ids[0] == 0).nonzero().flatten().tolist()
    b_start, b_end = starts[1], int(packed.attention_mask[0].sum())  # sample B: second block of the row
    changed = packed.input_ids.clone()
    text = (changed[0, : b_start] != tiny_model.image_token_id).nonzero().flatten()
    changed[0, text[3:8]] = (changed[0, text[3:8]] + 5) % 300  # other tokens in sample A
    pixels = packed.pixels.clone()
    pixels[0] = torch.randn_like(pixels[0])  # and another image for A

    def logits(ids: torch.Tensor, pix: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return tiny_model(ids, packed.attention_mask, pixels=pix, position_ids=pos, return_logits=True).logits

    before, after = logits(packed.input_ids, packed.pixels, packed.position_ids), logits(changed, pixels,
                                                                                          packed.position_ids)
    assert not torch.allclose(before[0, :b_start], after[0, :b_start])  # A did change
    torch.testing.assert_close(after[0, b_start:b_end], before[0, b_start:b_end], rtol=0, atol=1e-6)
    # Without the restarting positions the row is one causal sequence and B sees A: the test can fail.
    leaky = logits(changed, pixels, None)
    assert not torch.allclose(leaky[0, b_start:b_end], logits(packed.input_ids, packed.pixels, None)[0, b_start:b_end])


def test_packing_refuses_in_lm_bridges_flash_attention_and_lengths_past_the_lm(tiny_model_config, tiny_world) -> None:
    tiny_model_config.bridge = BridgeConfig("visual_expert")
    model = VisionLanguageModel.build(tiny_model_config)
    samples = load_llava(tiny_world.instruct).samples
    stage = StageConfig(name="s", data=str(tiny_world.instruct), pack_length=256)
    plan = StagePlan(len(samples), stage, 1, 0)
    with pytest.raises(ValueError, match="pack_length needs a prefix bridge; VisualExpert"):
        StageLoader(samples, model, stage, plan)
    tiny_model_config.bridge = BridgeConfig("mlp")
    model = VisionLanguageModel.build(tiny_model_config)
    stage.pack_length = 4096
    with pytest.raises(ValueError, match="pack_length 4096 exceeds the LM's maximum length 512"):
        StageLoader(samples, model, stage, plan)
    stage.pack_length = 256
    model.base_lm.config._attn_implementation = "flash_attention_2"  # the name alone: no kernel runs here
    with pytest.raises(ValueError, match="pack_length needs sdpa, eager or flex attention; flash_attention_2"):
        StageLoader(samples, model, stage, plan)


def test_a_sample_longer_than_the_packing_length_is_a_named_error(tiny_model, tiny_world) -> None:
    plain, _ = _batches(tiny_model, tiny_world, 1, 512)
    n = plain.input_ids.shape[1]
    samples = load_llava(tiny_world.instruct).samples[:1]
    ds = SampleDataset(samples, conversation_encoder(tiny_model), preprocess=tiny_model.processor.image)
    batch = Collator(0, pack_length=n - 1, cached=False)([ds[0]])
    assert batch.sample_ids == [] and len(batch.skipped) == 1
    err = batch.skipped[0]
    assert err.sample_id == "instruct-00000" and err.source == str(tiny_world.instruct)
    assert f"{n} tokens do not fit the packing length {n - 1}" in str(err)


def test_packing_tiled_images_of_several_shapes_keeps_the_loss(tiny_model_config, tmp_path) -> None:
    """Images of 1, 3 and 5 views packed into shared rows: the views follow their samples, loss unchanged."""
    from dataclasses import replace

    from PIL import Image

    from chiasm.config import TilingConfig
    from chiasm.data.sample import Sample, Turn

    torch.manual_seed(0)
    model = VisionLanguageModel.build(replace(tiny_model_config, tiling=TilingConfig(max_tiles=4))).eval()
    samples = []
    for k, size in enumerate([(64, 64), (256, 128), (128, 128), (128, 256), (64, 64), (128, 128)]):
        Image.effect_noise(size, 40 + 10 * k).convert("RGB").save(tmp_path / f"{k}.png")
        samples.append(Sample(f"s{k}", [Turn("human", "<image>\nWhat is it?"), Turn("gpt", f"noise {k}")],
                              [tmp_path / f"{k}.png"]))
    ds = SampleDataset(samples, model.processor.conversation, preprocess=model.processor.image_views)
    items = [ds[i] for i in range(len(samples))]
    pad = model.tokenizer.pad_token_id
    plain, packed = Collator(pad, cached=False)(items), Collator(pad, pack_length=400, cached=False)(items)
    assert packed.input_ids.shape[0] < len(samples) and plain.pixels.shape[0] == packed.pixels.shape[0] == 18
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, packed), _loss(model, plain), rtol=1e-5, atol=1e-5)
