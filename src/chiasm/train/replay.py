"""Self-replay: text the LM wrote itself, trained on beside the image data to keep its language.

Visual instruction tuning moves the LM toward terse answers about pictures, and its
perplexity on ordinary text rises. The field's remedy is to mix text-only data into the
stage (LLaVA-1.5 mixes ShareGPT). Where no such corpus is at hand, the LM's own samples
serve: drawn once from the LM as it is when the stage starts, they are its distribution,
so their next-token loss is (up to a constant) the KL divergence from the starting LM,
estimated on its own text. Pulling that down keeps the adapter's change off text the
images never touch, with no teacher forward pass during training.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample_text(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, length: int, *,
                seed: int, temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """``(n, length)`` token ids sampled from ``lm``, each row starting at the tokenizer's BOS.

    A private generator draws the tokens, so the training RNG stream (and with it an exact
    resume) is untouched, and the same seed gives the same text on every rank and rerun.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("self-replay needs a tokenizer with a BOS or EOS token to start samples from")
    if length < 2:
        raise ValueError(f"replay sequences need at least 2 tokens, got {length}")
    device = next(lm.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = lm.training
    lm.eval()
    rows = []
    try:
        for first in range(0, n, batch_size):
            ids = torch.full((min(batch_size, n - first), 1), start, dtype=torch.long, device=device)
            past = None
            step_ids = ids
            for _ in range(length - 1):
                out = lm(input_ids=step_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1).cpu()
                step_ids = torch.multinomial(probs, 1, generator=generator).to(device)
                ids = torch.cat([ids, step_ids], dim=1)
            rows.append(ids.cpu())
    finally:
        lm.train(was_training)
    return torch.cat(rows)


def replay_loss(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``lm`` on replay rows ``(B, L)`` (every token after the first)."""
    logits = lm(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
