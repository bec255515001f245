"""Generation: batched, streamed answers with a KV cache, for the chat, the server and evaluation.

``Engine(model).generate([Request(...)])`` answers whole requests; ``Engine.stream`` yields
:class:`Delta` pieces as tokens come. See :mod:`chiasm.generation.engine`.
"""

from chiasm.generation.engine import Engine
from chiasm.generation.requests import Completion, Delta, Request, RequestError, SamplingParams

__all__ = ["Completion", "Delta", "Engine", "Request", "RequestError", "SamplingParams"]
