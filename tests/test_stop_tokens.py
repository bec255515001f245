"""Generation stops on the LM's own end-of-turn tokens, whatever the chat template calls them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.chat_template import stop_token_ids
from chiasm.config import ModelConfig
from chiasm.model import VisionLanguageModel
from chiasm.testing import make_tiny_lm


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-lms")
    return {chat: make_tiny_lm(root / chat, chat=chat) for chat in ("chatml", "gemma", "qwen3", "llama3")}


def _model(config: ModelConfig, lm_dir: Path) -> VisionLanguageModel:
    config.lm.source = str(lm_dir)
    torch.manual_seed(0)
    return VisionLanguageModel.build(config).eval()


@pytest.mark.parametrize(("chat", "expected"), [
    ("chatml", {"<|im_end|>"}),
    ("gemma", {"<eos>", "<end_of_turn>"}),  # generation_config lists both
    ("qwen3", {"<|im_end|>", "<|endoftext|>"}),
    ("llama3", {"<|end_of_text|>", "<|eot_id|>"}),  # <|eot_id|> comes from the template alone
])
def test_stop_ids_join_generation_config_tokenizer_and_template(tiny_model_config, lm_dirs, chat, expected) -> None:
    model = _model(tiny_model_config, lm_dirs[chat])
    ids = stop_token_ids(model.base_lm, model.tokenizer)
    assert set(model.tokenizer.convert_ids_to_tokens(ids)) == expected


@pytest.mark.parametrize(("chat", "end"), [("chatml", "<|im_end|>"), ("gemma", "<end_of_turn>"),
                                           ("llama3", "<|eot_id|>")])
def test_generation_cuts_at_the_end_of_turn(tiny_model_config, lm_dirs, chat: str, end: str) -> None:
    model = _model(tiny_model_config, lm_dirs[chat])
    tok = model.tokenizer
    answer = tok("red", add_special_tokens=False)["input_ids"][0]
    after = tok("blue", add_special_tokens=False)["input_ids"][0]
    forced = [answer, answer, tok.convert_tokens_to_ids(end)] + [after] * 10
    step = 0

    def force(module, args, output: torch.Tensor) -> torch.Tensor:
        nonlocal step
        out = torch.full_like(output, -1e4)
        out[..., forced[step]] = 0.0
        step += 1
        return out

    model.base_lm.get_output_embeddings().register_forward_hook(force)
    prompt = tok.apply_chat_template([{"role": "user", "content": "what colour"}], add_generation_prompt=True)
    ids = torch.tensor([prompt["input_ids"]])
    rows = model.generate(ids, torch.ones_like(ids), max_new_tokens=6)
    assert rows == [[answer, answer]]
