"""Language retention: did multimodal training damage the LM's own ability?

Two measurements, both comparing the trained LM with the base LM on text alone:
perplexity of held-out English (Python's own documentation texts, present in every
CPython) and the share of text-only chat prompts whose greedy answer is unchanged.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chiasm.chat_template import ChatTemplate, stop_token_ids

CHUNK_TOKENS = 256  # perplexity is measured over windows of this many tokens

TEXT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
    "Give a synonym for 'happy'.",
    "What do bees make?",
    "Translate 'thank you' into Spanish.",
    "How many days are in a week?",
    "What is the opposite of 'cold'?",
    "Name a planet in our solar system.",
    "What language is spoken in Brazil?",
    "Describe a cat in five words.",
    "What is water made of?",
    "Which animal is known as the king of the jungle?",
    "What season comes after winter?",
    "Give an example of a fruit.",
]


def held_out_text() -> str:
    """English prose that no chiasm training set contains: CPython's pydoc topic texts."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.no_grad()
def perplexity(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, *,
               max_tokens: int = 4096, chunk: int = CHUNK_TOKENS) -> tuple[float, int]:
    """Perplexity of the first ``max_tokens`` tokens of ``text`` in chunks of ``chunk``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    n_chunks = len(ids) // chunk
    if n_chunks == 0:
        raise ValueError(f"text too short for one chunk of {chunk} tokens")
    device = next(lm.parameters()).device
    x = torch.tensor(ids[: n_chunks * chunk], device=device).view(n_chunks, chunk)
    nll, count = 0.0, 0
    for i in range(0, n_chunks, 8):
        rows = x[i : i + 8]
        logits = lm(input_ids=rows, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 rows[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += rows[:, 1:].numel()
    return math.exp(nll / count), count


@torch.no_grad()
def greedy_answers(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                   max_new_tokens: int = 24, system_prompt: str | None = None) -> list[str]:
    """Greedy chat answers to text-only prompts (left-padded batch), stopped at the LM's turn end.

    Prompts are built as training builds them (:mod:`chiasm.chat_template`): a system prompt
    the template rejects goes into the user turn.
    """
    template = ChatTemplate(tokenizer)
    rows = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": p}]
        rows.append(tokenizer(template.prompt_text(template.fit(msgs)), add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    device = next(lm.parameters()).device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=pad, eos_token_id=stop_token_ids(lm, tokenizer))
    return [tokenizer.decode(r[width:], skip_special_tokens=True).strip() for r in out.tolist()]
