"""The generation engine against transformers' own generate, and against itself one request at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chiasm.chat_template import stop_token_ids
from chiasm.data.llava import load_llava
from chiasm.data.sample import Sample, Turn
from chiasm.generation import Engine, Request, SamplingParams
from chiasm.generation.sampling import filter_logits
from chiasm.model import VisionLanguageModel


def _requests(eval_images: list[Path], **params) -> list[Request]:
    """Prompts of different lengths with 1, 0, 2 and 1 images."""
    turns = [
        [Turn("human", "<image>\nWhat colour is the circle?")],
        [Turn("human", "Name a colour.")],
        [Turn("human", "<image>\n<image>\nHow many objects are there in the two pictures, left and right?")],
        [Turn("human", "<image>\nwhere is it"), Turn("gpt", "top left"), Turn("human", "and the square?")],
    ]
    picks = [[eval_images[0]], [], [eval_images[1], eval_images[2]], [eval_images[3]]]
    return [Request(t, p, SamplingParams(**params)) for t, p in zip(turns, picks, strict=True)]


def test_greedy_equals_transformers_generate(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    reqs = _requests(eval_images, max_new_tokens=10)
    samples = [Sample(f"s{i}", r.conversation, [Path(p) for p in r.images]) for i, r in enumerate(reqs)]
    batch = spread_model.processor(samples, for_generation=True)
    with torch.no_grad():
        embeds, layer_inputs = spread_model.lm_inputs(batch.input_ids, spread_model.encode_images(batch.pixels))
        stop = stop_token_ids(spread_model.base_lm, spread_model.tokenizer)
        ref = spread_model.lm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, do_sample=False,
                                max_new_tokens=10, eos_token_id=stop, pad_token_id=spread_model.tokenizer.pad_token_id,
                                **layer_inputs)
    expected = [[t for t in row if t not in stop] for row in ref.tolist()]
    assert all(len(row) == 10 for row in expected)  # no row stopped early: all 10 tokens compared
    assert len({tuple(r) for r in expected}) == 4  # the prompts lead to different answers
    assert [c.token_ids for c in Engine(spread_model).generate(reqs)] == expected
    rows = spread_model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=10)
    assert rows == expected


def test_batched_greedy_equals_one_at_a_time(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    reqs = _requests(eval_images, max_new_tokens=8)
    batched = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]
    assert len({c.prompt_tokens for c in batched}) == 4
    # A batch smaller than the request list runs in several batches with the same answers.
    assert [c.token_ids for c in Engine(spread_model, max_batch_size=3).generate(reqs)] == [c.token_ids for c in alone]


def test_images_change_the_answer(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    turn = [Turn("human", "<image>\nWhat colour is the circle?")]
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    a, b = engine.generate([Request(turn, [red]), Request(turn, [noise])])
    assert a.token_ids != b.token_ids
    # A picture in memory and the same picture read from a file give the same answer.
    from_file = engine.generate([Request(turn, [eval_images[0]])])[0]
    with Image.open(eval_images[0]) as im:
        assert engine.generate([Request(turn, [im.convert("RGB")])])[0].token_ids == from_file.token_ids


def test_seeded_sampling_repeats_and_ignores_the_batch(spread_model: VisionLanguageModel,
                                                       eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    reqs = _requests(eval_images, max_new_tokens=8, temperature=1.3, top_p=0.95, seed=7)
    batched = engine.generate(reqs)
    assert [c.token_ids for c in batched] == [c.token_ids for c in engine.generate(reqs)]
    assert [c.token_ids for c in batched] == [engine.generate([r])[0].token_ids for r in reqs]
    # The batch's order does not matter either.
    assert [c.token_ids for c in engine.generate(reqs[::-1])][::-1] == [c.token_ids for c in batched]
    greedy = engine.generate(_requests(eval_images, max_new_tokens=8))
    assert [c.token_ids for c in batched] != [c.token_ids for c in greedy]
    other = engine.generate(_requests(eval_images, max_new_tokens=8, temperature=1.3, top_p=0.95, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in batched]


def test_unseeded_sampling_follows_torch_manual_seed(spread_model: VisionLanguageModel,
                                                     eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    reqs = _requests(eval_images, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(3)
    first = [c.token_ids for c in engine.generate(reqs)]
    torch.manual_seed(3)
    assert [c.token_ids for c in engine.generate(reqs)] == first


def test_top_k_one_is_greedy(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    greedy = engine.generate(_requests(eval_images, max_new_tokens=8))
    top1 = engine.generate(_requests(eval_images, max_new_tokens=8, temperature=2.0, top_k=1, seed=5))
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9),
                                                             (1.5, 20, 0.5), (0.3, 3, 0.99)])
def test_filter_keeps_the_tokens_transformers_keeps(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(400, generator=torch.Generator().manual_seed(0)) * 3
    ours = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    ref = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[0][~torch.isinf(ref[0])])
    kept = int((~torch.isinf(ours)).sum())
    assert kept == 400 if not top_k and top_p == 1 else 0 < kept < 400


def test_stop_string_across_tokens_is_cut(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    req = _requests(eval_images, max_new_tokens=12)[0]
    full = engine.generate([req])[0]
    pieces = [spread_model.tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(2, len(pieces)) if pieces[i - 1] and pieces[i])  # two non-empty tokens in a row
    stop = pieces[k - 1][-1] + pieces[k][0]  # the stop string spans the border between them
    cut = full.text.find(stop)
    req.params.stop = ["never-produced", stop]
    done = engine.generate([req])[0]
    assert done.finish_reason == "stop"
    assert done.text == full.text[:cut]
    assert done.token_ids == full.token_ids[:len(done.token_ids)]
    assert done.completion_tokens == len(done.token_ids) <= k + 1


def test_end_of_turn_token_stops_without_appearing(spread_model: VisionLanguageModel, eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    req = _requests(eval_images, max_new_tokens=10)[1]
    full = engine.generate([req])[0]
    engine.stop_ids = {full.token_ids[4]}  # as if the model ended its turn there
    done = engine.generate([req])[0]
    first = full.token_ids.index(full.token_ids[4])
    assert done.finish_reason == "stop" and done.token_ids == full.token_ids[:first]
    assert full.finish_reason == "length" and full.completion_tokens == 10


def test_stream_deltas_concatenate_to_the_completion(spread_model: VisionLanguageModel,
                                                     eval_images: list[Path]) -> None:
    engine = Engine(spread_model)
    reqs = _requests(eval_images, max_new_tokens=9)
    reqs[2].params.max_new_tokens = 4
    deltas = list(engine.stream(reqs))
    done = engine.generate(reqs)
    for i, c in enumerate(done):
        mine = [d for d in deltas if d.index == i]
        assert [d.finished for d in mine] == [False] * (len(mine) - 1) + [True]
        decoded = spread_model.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert "".join(d.text for d in mine) == c.text == decoded
        assert [t for d in mine for t in d.token_ids] == c.token_ids
        assert [d.completion_tokens for d in mine] == list(range(1, len(mine) + 1))
        assert mine[-1].finish_reason == c.finish_reason == "length"
    assert len(done[2].token_ids) == 4
    # Tokens come row by row per step: the short request has finished before the others' last step.
    assert max(k for k, d in enumerate(deltas) if d.index == 2) < max(k for k, d in enumerate(deltas) if d.index == 0)


def test_eval_answers_match_the_engine(spread_model: VisionLanguageModel, tiny_world) -> None:
    from chiasm.eval.vqa import answer

    samples = load_llava(tiny_world.eval).samples[:5]
    answers = answer(spread_model, samples, batch_size=5, max_new_tokens=6)
    reqs = [Request([t for t in s.conversations if t.role != "gpt"], list(s.images), SamplingParams(max_new_tokens=6))
            for s in samples]
    assert answers == [c.text.strip() for c in Engine(spread_model).generate(reqs)]
