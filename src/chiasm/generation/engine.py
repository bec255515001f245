"""The generation engine: batched requests in, streamed Deltas and Completions out.

A run takes requests with different prompt lengths and image counts, checks every one of
them first (:mod:`chiasm.generation.checks`), left-pads up to ``max_batch_size`` of them
into one batch, encodes all their images in one encoder call, prefills the LM once and
decodes with the KV cache (:class:`~chiasm.generation.decode.BatchDecoder`). Each row has
its own sampling rule and random source, its own stop strings and its own token budget; a
row that finishes leaves the batch and gets exactly one ``finished`` Delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from chiasm.chat_template import stop_token_ids
from chiasm.generation.checks import PreparedRequest, prepare
from chiasm.generation.decode import BatchDecoder
from chiasm.generation.requests import Completion, Delta, Request
from chiasm.generation.sampling import make_generator, next_tokens
from chiasm.generation.text import TextStream
from chiasm.model import VisionLanguageModel


@dataclass
class _Row:
    """One request's progress inside a batch."""

    index: int
    item: PreparedRequest
    text: TextStream
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)

    def delta(self, text: str, ids: list[int], reason: str | None) -> Delta:
        return Delta(self.index, text, ids, reason is not None, reason, len(self.item.input_ids), len(self.token_ids))


class Engine:
    """Answers requests with one model; one batched run per call of :meth:`stream` or :meth:`generate`."""

    def __init__(self, model: VisionLanguageModel, *, max_batch_size: int = 8) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.processor = model.processor
        self.stop_ids = set(stop_token_ids(model.base_lm, model.tokenizer))
        self.context = model.max_length

    def validate(self, request: Request) -> None:
        """Raise :class:`~chiasm.generation.RequestError` for a request the engine would refuse."""
        prepare(request, self.processor, self.context)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Every request answered in full; the Completions come in the requests' order."""
        parts: list[list[Delta]] = [[] for _ in requests]
        for d in self.stream(requests):
            parts[d.index].append(d)
        out = []
        for deltas in parts:
            last = deltas[-1]
            out.append(Completion("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                                  str(last.finish_reason), last.prompt_tokens, last.completion_tokens))
        return out

    def stream(self, requests: list[Request]) -> Iterator[Delta]:
        """Deltas as tokens come; all requests are checked before the first model call."""
        prepared = [prepare(r, self.processor, self.context) for r in requests]
        for start in range(0, len(prepared), self.max_batch_size):
            yield from self._run(prepared[start:start + self.max_batch_size], start)

    @torch.no_grad()
    def _run(self, items: list[PreparedRequest], offset: int) -> Iterator[Delta]:
        model = self.model
        was_training = model.training
        model.eval()  # no dropout while answering; the caller's mode comes back when the run ends
        try:
            yield from self._decode(items, offset)
        finally:
            model.train(was_training)

    def _decode(self, items: list[PreparedRequest], offset: int) -> Iterator[Delta]:
        model = self.model
        ids, mask = _left_pad([it.input_ids for it in items], self.processor.pad_token_id, model.device)
        images = [im for it in items for im in it.images]  # placeholder order across rows, as embed() reads them
        features = model.encode_images(self.processor.pixels(images).to(model.device)) if images else None
        clips = [clip for it in items for clip in it.audio]  # likewise for <audio> placeholders
        audio = torch.stack(clips).to(model.device) if clips else None
        embeds, layer_inputs = model.lm_inputs(ids, features, audio)
        rows = [_Row(offset + i, it, TextStream(model.tokenizer, it.params.stop),
                     make_generator(it.params, model.device)) for i, it in enumerate(items)]
        dec = BatchDecoder(model.lm, embeds, mask, layer_inputs, suppress=model.placeholder_ids)
        while dec.active:
            active = [rows[i] for i in dec.active]
            tokens = next_tokens(dec.logits(), [r.item.params for r in active], [r.generator for r in active])
            keep = []
            for row, token in zip(active, tokens.tolist(), strict=True):
                delta = self._step(row, token)
                keep.append(not delta.finished)
                yield delta
            dec.advance(tokens, keep)

    def _step(self, row: _Row, token: int) -> Delta:
        """Take one token into ``row``: its Delta, finished on a turn end, a stop string or the budget."""
        if token in self.stop_ids:
            return row.delta(row.text.finish(), [], "stop")
        row.token_ids.append(token)
        piece, stopped = row.text.push(token)
        if stopped:
            return row.delta(piece, [token], "stop")
        if len(row.token_ids) >= row.item.params.max_new_tokens:
            return row.delta(piece + row.text.finish(), [token], "length")
        return row.delta(piece, [token], None)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> left-padded ``(B, L)`` ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)
