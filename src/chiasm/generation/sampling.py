"""Choosing the next token of each row: greedy, or sampled with temperature, top-k and top-p.

Every sampled row draws from its own ``torch.Generator``: a request's tokens depend on its
seed and its own logits only, never on how many other requests share the batch or in which
order they finish.
"""

from __future__ import annotations

import torch

from chiasm.generation.requests import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's random source: seeded from ``params.seed``, else from torch's global RNG.

    Greedy rows need none. Without a seed, the seed is drawn from the global RNG, so
    ``torch.manual_seed`` still makes a whole run repeat.
    """
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's ``(V,)`` logits scaled by temperature, with tokens outside top-k / top-p at -inf."""
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` next token ids, one rule and random source per row."""
    chosen = logits.argmax(-1)
    for r, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs = filter_logits(logits[r], p).softmax(-1)
            chosen[r] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen
