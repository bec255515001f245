"""The one in-memory shape of a training or evaluation sample.

Every data source (LLaVA JSON/JSONL files, the synthetic world, later HF datasets)
produces :class:`Sample` objects, so the tokenizer, the collator and the evaluator
never need to know where a sample came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["human", "gpt", "system"]
IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: who speaks and what they say."""

    role: Role
    text: str


@dataclass
class Sample:
    """One conversation about zero or more images and audio clips (``<audio>`` placeholders, in order).

    ``source`` is the file the sample was read from, kept so that every error can
    name both the file and the sample id.
    """

    id: str
    conversations: list[Turn]
    images: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    audios: list[Path] = field(default_factory=list)


class DataError(ValueError):
    """A sample or data file that cannot be used, with a message naming file and sample.

    ``image`` is the image file at fault, when there is one, so that skip lists can name it
    apart from the message.
    """

    def __init__(self, message: str, *, source: str | None = None, sample_id: str | None = None,
                 image: str | None = None):
        where = []
        if source is not None:
            where.append(f"file {source}")
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)
        self.message = message
        self.source = source
        self.sample_id = sample_id
        self.image = image

    def __reduce__(self) -> tuple:
        # Keeps file, sample id and image when the error crosses a process boundary (DataLoader workers).
        return _rebuild_data_error, (type(self), self.message, self.source, self.sample_id, self.image)


def _rebuild_data_error(cls: type[DataError], message: str, source: str | None, sample_id: str | None,
                        image: str | None = None) -> DataError:
    return cls(message, source=source, sample_id=sample_id, image=image)
