"""Chat templates beyond ChatML: no system role (Gemma) and non-incremental rendering (Qwen3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chiasm.config import ModelConfig
from chiasm.conversation import IGNORE_INDEX, ConversationEncoder
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.eval.retention import greedy_answers
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_lm
from chiasm.tokens import IMAGE_TOKEN, add_image_token
from chiasm.train.batches import collate, prepare

TOKENS_PER_IMAGE = 3
IMAGES = IMAGE_TOKEN * TOKENS_PER_IMAGE


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("template-lms")
    return {chat: make_tiny_lm(root / chat, chat=chat) for chat in ("gemma", "qwen3", "llama3")}


def _tok(lm_dirs: dict[str, Path], chat: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(lm_dirs[chat])
    add_image_token(tok)
    return tok


def _encoder(tok: PreTrainedTokenizerBase, system_prompt: str | None = None) -> ConversationEncoder:
    return ConversationEncoder(tok, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                               tokens_per_image=TOKENS_PER_IMAGE, max_length=512, system_prompt=system_prompt)


def _sample(*turns: tuple[str, str]) -> Sample:
    return Sample(id="s1", conversations=[Turn(r, t) for r, t in turns],  # type: ignore[arg-type]
                  images=[Path("img0.png")], source="data.json")


def _supervised(tok: PreTrainedTokenizerBase, labels: list[int]) -> list[str]:
    """The text of each contiguous run of supervised labels."""
    runs: list[list[int]] = []
    prev = False
    for label in labels:
        if label != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(label)
        prev = label != IGNORE_INDEX
    return [tok.decode(r) for r in runs]


TWO_TURNS = (("human", "<image>\nwhat colour is the circle?"), ("gpt", "red"),
             ("human", "where is the square?"), ("gpt", "top left"))


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(lm_dirs) -> None:
    tok = _tok(lm_dirs, "gemma")
    enc = _encoder(tok, system_prompt="answer briefly")
    out = enc.encode(_sample(*TWO_TURNS))
    assert tok.decode(out.input_ids) == (
        f"<bos><start_of_turn>user\nanswer briefly\n\n{IMAGES}\nwhat colour is the circle?<end_of_turn>\n"
        "<start_of_turn>model\nred<end_of_turn>\n<start_of_turn>user\nwhere is the square?<end_of_turn>\n"
        "<start_of_turn>model\ntop left<end_of_turn>\n")
    assert _supervised(tok, out.labels) == ["red<end_of_turn>\n", "top left<end_of_turn>\n"]
    prompt = enc.encode_prompt(_sample(*TWO_TURNS[:2], ("human", "where is the square?")))
    assert tok.decode(prompt.input_ids).startswith("<bos><start_of_turn>user\nanswer briefly\n\n")
    assert tok.decode(prompt.input_ids).endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_gemma_folds_a_samples_own_system_turn(lm_dirs) -> None:
    tok = _tok(lm_dirs, "gemma")
    out = _encoder(tok, system_prompt="ignored").encode(
        _sample(("system", "be brief"), ("human", "<image>\nwhat colour?"), ("gpt", "red")))
    assert tok.decode(out.input_ids).startswith(f"<bos><start_of_turn>user\nbe brief\n\n{IMAGES}\nwhat colour?")
    assert _supervised(tok, out.labels) == ["red<end_of_turn>\n"]


def test_qwen3_labels_the_answers_not_the_think_block(lm_dirs) -> None:
    tok = _tok(lm_dirs, "qwen3")
    enc = _encoder(tok, system_prompt="answer briefly")
    out = enc.encode(_sample(*TWO_TURNS))
    # The last assistant turn carries an empty think block, the earlier one does not.
    assert tok.decode(out.input_ids) == (
        f"<|im_start|>system\nanswer briefly<|im_end|>\n<|im_start|>user\n{IMAGES}\nwhat colour is the circle?"
        "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nwhere is the square?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\ntop left<|im_end|>\n")
    assert _supervised(tok, out.labels) == ["red<|im_end|>\n", "top left<|im_end|>\n"]
    single = enc.encode(_sample(*TWO_TURNS[:2]))
    assert _supervised(tok, single.labels) == ["red<|im_end|>\n"]
    # The generation prompt is what precedes the answer in training: the empty think block included.
    prompt = enc.encode_prompt(_sample(*TWO_TURNS[:3]))
    assert tok.decode(prompt.input_ids).endswith(
        "assistant\nred<|im_end|>\n<|im_start|>user\nwhere is the square?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_prompt_is_the_training_prefix_of_the_last_answer(lm_dirs) -> None:
    for chat in ("gemma", "qwen3", "llama3"):
        tok = _tok(lm_dirs, chat)
        enc = _encoder(tok)
        full = enc.encode(_sample(*TWO_TURNS))
        prompt = enc.encode_prompt(_sample(*TWO_TURNS))  # the last answer dropped
        n = len(prompt.input_ids)
        assert full.input_ids[:n] == prompt.input_ids, chat
        assert full.labels[n - 1] == IGNORE_INDEX and full.labels[n] != IGNORE_INDEX, chat


def test_a_template_that_rewrites_an_answer_is_refused_by_name(lm_dirs) -> None:
    tok = _tok(lm_dirs, "qwen3")
    sample = _sample(("human", "<image>\nwhat colour?"), ("gpt", "<think>\nit is red\n</think>\n\nred"),
                     ("human", "where?"), ("gpt", "top"))
    with pytest.raises(DataError, match=r"the chat template rewrites assistant turn 1 "
                                        r"\(rendered differently from its text\)"):
        _encoder(tok).encode(sample)


def test_vlm_trains_and_answers_with_gemma_and_qwen3_templates(tiny_model_config: ModelConfig, lm_dirs,
                                                                tiny_world) -> None:
    from chiasm.data.llava import load_llava

    samples = load_llava(tiny_world.instruct).samples[:2]
    for chat in ("gemma", "qwen3"):
        tiny_model_config.lm.source = str(lm_dirs[chat])
        tiny_model_config.system_prompt = "answer briefly"
        torch.manual_seed(0)
        model = VisionLanguageModel.build(tiny_model_config)
        prepared, _ = prepare(samples, model)
        batch = collate(prepared, model.tokenizer.pad_token_id, model=model)
        loss = model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss
        assert torch.isfinite(loss)
        answers = greedy_answers(model.lm, model.tokenizer, ["what colour?"], max_new_tokens=2,
                                 system_prompt="answer briefly")
        assert len(answers) == 1


def test_a_trimming_template_trains_on_the_trimmed_answer(lm_dirs) -> None:
    tok = _tok(lm_dirs, "gemma")
    out = _encoder(tok).encode(_sample(("human", "<image>\nwhat colour?"), ("gpt", "red \n")))
    assert _supervised(tok, out.labels) == ["red<end_of_turn>\n"]


def test_a_conversation_the_template_refuses_is_a_data_error(lm_dirs) -> None:
    tok = _tok(lm_dirs, "gemma")
    sample = _sample(("human", "<image>\nwhat colour?"), ("human", "and the shape?"), ("gpt", "red"))
    with pytest.raises(DataError, match=r"\[file data.json, sample 's1'\] the chat template refuses this "
                                        r"conversation: Conversation roles must alternate"):
        _encoder(tok).encode(sample)


def test_without_character_offsets_pieces_give_the_same_labels(lm_dirs, monkeypatch) -> None:
    for chat in ("gemma", "qwen3"):
        tok = _tok(lm_dirs, chat)
        fast = _encoder(tok, system_prompt="answer briefly").encode(_sample(*TWO_TURNS))
        monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
        slow = _encoder(tok, system_prompt="answer briefly").encode(_sample(*TWO_TURNS))
        monkeypatch.undo()
        assert (slow.input_ids, slow.labels) == (fast.input_ids, fast.labels), chat
