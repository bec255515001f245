"""The JSON objects of OpenAI's chat API that the server sends: completions, stream chunks, usage."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from chiasm.generation import Delta


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """One answer being built from its Deltas; the same id and creation time in every chunk of it."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def completion(self, deltas: list[Delta]) -> dict:
        """The whole ``chat.completion`` object for a request's Deltas (the last one finished)."""
        last = deltas[-1]
        message = {"role": "assistant", "content": "".join(d.text for d in deltas), "refusal": None}
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": message, "finish_reason": last.finish_reason, "logprobs": None}],
                "usage": usage(last.prompt_tokens, last.completion_tokens)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        """One server-sent event holding a ``chat.completion.chunk`` with one choice."""
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI does: only the extra last chunk carries the counts
        return event(body)

    def usage_chunk(self, last: Delta) -> str:
        """The extra chunk ``stream_options.include_usage`` asks for: no choices, the counts."""
        return event({**self._head("chat.completion.chunk"), "choices": [],
                      "usage": usage(last.prompt_tokens, last.completion_tokens)})


def event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
