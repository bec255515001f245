"""Conversation encoding: labels on assistant answers only, exact image-token expansion, no truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chiasm.conversation import IGNORE_INDEX, ConversationEncoder
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.tokens import IMAGE_TOKEN, add_image_token

TOKENS_PER_IMAGE = 5
END = "<|im_end|>\n"  # ChatML closes every message with <|im_end|> and a newline


@pytest.fixture(scope="module")
def tok(tiny_lm_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    add_image_token(tokenizer)
    return tokenizer


def _encoder(tok: PreTrainedTokenizerBase, *, max_length: int = 512, system_prompt: str | None = None,
             tokens_per_image: int = TOKENS_PER_IMAGE) -> ConversationEncoder:
    return ConversationEncoder(tok, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                               tokens_per_image=tokens_per_image, max_length=max_length,
                               system_prompt=system_prompt)


def _spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs: list[list[int]] = []
    prev = False
    for label in labels:
        on = label != IGNORE_INDEX
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(label)
        prev = on
    return runs


def _sample(turns: list[tuple[str, str]], n_images: int = 1, sid: str = "s1") -> Sample:
    return Sample(id=sid, conversations=[Turn(r, t) for r, t in turns],  # type: ignore[arg-type]
                  images=[Path(f"img{i}.png") for i in range(n_images)], source="data.json")


def test_image_token_is_one_special_id(tok: PreTrainedTokenizerBase) -> None:
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert add_image_token(tok) == image_id  # idempotent
    assert tok("<image><image>", add_special_tokens=False)["input_ids"] == [image_id, image_id]


def test_labels_cover_exactly_the_answer(tok: PreTrainedTokenizerBase) -> None:
    enc = _encoder(tok)
    sample = _sample([("human", "<image>\nWhat colour is the circle?"), ("gpt", "red")])
    out = enc.encode(sample)
    assert len(out.input_ids) == len(out.labels) and out.n_images == 1
    spans = _spans(out.labels)
    assert len(spans) == 1
    assert tok.decode(spans[0]) == "red" + END
    # Supervised labels are the input ids at the same positions (the model shifts them itself).
    for i, label in enumerate(out.labels):
        assert label in (IGNORE_INDEX, out.input_ids[i])
    # The whole sequence is the plain chat-template rendering.
    text = tok.decode(out.input_ids)
    assert text == ("<|im_start|>user\n" + IMAGE_TOKEN * TOKENS_PER_IMAGE + "\nWhat colour is the circle?" + END
                    + "<|im_start|>assistant\nred" + END)


def test_multi_turn_supervises_every_answer_and_nothing_else(tok: PreTrainedTokenizerBase) -> None:
    enc = _encoder(tok, system_prompt="You are a helpful assistant.")
    answers = ["red", "2", "top left"]
    turns = [("human", "<image>\nWhat colour is the circle?"), ("gpt", answers[0]),
             ("human", "How many objects are there?"), ("gpt", answers[1]),
             ("human", "Where is the red circle?"), ("gpt", answers[2])]
    out = enc.encode(_sample(turns))
    spans = _spans(out.labels)
    assert [tok.decode(s) for s in spans] == [a + END for a in answers]
    supervised = [label for label in out.labels if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "".join(a + END for a in answers)
    # No role header, image token, system or user text is ever supervised.
    for special in ("<|im_start|>", IMAGE_TOKEN):
        assert tok.convert_tokens_to_ids(special) not in supervised
    for word in ("user", "system", "helpful", "assistant", "colour", "many"):
        assert word not in tok.decode(supervised)
    # The system prompt is in the input, just not in the labels.
    assert tok.decode(out.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant." + END)


def test_conversation_with_its_own_system_turn_keeps_it(tok: PreTrainedTokenizerBase) -> None:
    enc = _encoder(tok, system_prompt="Default.")
    out = enc.encode(_sample([("system", "Be brief."), ("human", "<image>\nWhat shape?"), ("gpt", "circle")]))
    text = tok.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and "Default." not in text
    assert [tok.decode(s) for s in _spans(out.labels)] == ["circle" + END]


@pytest.mark.parametrize("tokens_per_image", [1, 5, 16])
def test_placeholder_expands_to_tokens_per_image(tok: PreTrainedTokenizerBase, tokens_per_image: int) -> None:
    enc = _encoder(tok, tokens_per_image=tokens_per_image)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    one = enc.encode(_sample([("human", "<image>\nWhat is it?"), ("gpt", "a circle")]))
    assert one.input_ids.count(image_id) == tokens_per_image
    first = one.input_ids.index(image_id)
    assert one.input_ids[first : first + tokens_per_image] == [image_id] * tokens_per_image  # one contiguous run
    two = enc.encode(_sample([("human", "<image> and <image>: same?"), ("gpt", "no")], n_images=2))
    assert two.input_ids.count(image_id) == 2 * tokens_per_image and two.n_images == 2
    # Image positions are never supervised.
    assert all(label == IGNORE_INDEX for i, label in zip(two.input_ids, two.labels, strict=True) if i == image_id)


@pytest.mark.parametrize(
    ("text", "n_images"),
    [("<image>\nWhat is it?", 2), ("What is it?", 1), ("<image><image> What?", 1), ("<image> What?", 0)],
)
def test_placeholder_image_mismatch_names_sample(tok: PreTrainedTokenizerBase, text: str, n_images: int) -> None:
    enc = _encoder(tok)
    sample = _sample([("human", text), ("gpt", "yes")], n_images=n_images, sid="bad-42")
    with pytest.raises(DataError, match="placeholders and images do not match") as info:
        enc.encode(sample)
    assert "bad-42" in str(info.value) and "data.json" in str(info.value)
    assert info.value.sample_id == "bad-42"
    with pytest.raises(DataError, match="bad-42"):
        enc.encode_prompt(sample)


def test_too_long_is_an_error_never_truncated(tok: PreTrainedTokenizerBase) -> None:
    sample = _sample([("human", "<image>\nDescribe the image."), ("gpt", "a small red circle in the top left")],
                     sid="long-1")
    n = len(_encoder(tok).encode(sample).input_ids)
    assert len(_encoder(tok, max_length=n).encode(sample).input_ids) == n  # exactly at the limit is fine
    with pytest.raises(DataError, match="never truncated") as info:
        _encoder(tok, max_length=n - 1).encode(sample)
    assert "long-1" in str(info.value) and f"sequence of {n} tokens" in str(info.value)
    with pytest.raises(DataError, match="never truncated"):
        _encoder(tok, max_length=n - 1, tokens_per_image=TOKENS_PER_IMAGE).encode_prompt(
            _sample([("human", "<image>\n" + "describe the image " * 20)]))


def test_no_assistant_turn_is_an_error(tok: PreTrainedTokenizerBase) -> None:
    enc = _encoder(tok)
    with pytest.raises(DataError, match="no trainable") as info:
        enc.encode(_sample([("human", "<image>\nWhat is it?")], sid="q-only"))
    assert "q-only" in str(info.value)


def test_encode_prompt_ends_with_generation_prompt(tok: PreTrainedTokenizerBase) -> None:
    enc = _encoder(tok, system_prompt="Answer briefly.")
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    sample = _sample([("human", "<image>\nWhat colour is the square?"), ("gpt", "purple")])
    out = enc.encode_prompt(sample)
    assert out.input_ids[-len(gen_prompt) :] == gen_prompt
    assert all(label == IGNORE_INDEX for label in out.labels)
    text = tok.decode(out.input_ids)
    assert "purple" not in text  # the final answer is dropped
    assert text.endswith("What colour is the square?" + END + "<|im_start|>assistant\n")
    # The prompt is a prefix of the training sequence up to the answer.
    train = enc.encode(sample)
    assert train.input_ids[: len(out.input_ids)] == out.input_ids
    assert tok.decode(train.input_ids[len(out.input_ids) :]) == "purple" + END
    # A question without an answer yields the same prompt.
    assert enc.encode_prompt(_sample([("human", "<image>\nWhat colour is the square?")])).input_ids == out.input_ids


def test_missing_chat_template_is_rejected(tiny_lm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ConversationEncoder(tokenizer, image_token_id=0, tokens_per_image=1, max_length=64)
