"""Token ids -> streamed text: whole characters only, and stop strings cut even across tokens.

Decoding a token alone is wrong in two ways: a byte-level token may end in the middle of a
multi-byte character (decoded as U+FFFD), and SentencePiece tokenizers drop or add the
space a token starts with depending on what precedes it. So each new piece is decoded
together with a few tokens before it and only the part beyond their text is emitted, and
nothing is emitted while it ends in a broken character. Text that could be the start of a
stop string is held back until the next tokens show whether the stop string follows.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_BROKEN = "\ufffd"


class TextStream:
    """The text of one answer, released piece by piece as tokens arrive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of ``text`` already released
        self._prefix = 0  # tokens [prefix:read] give the context the next piece is decoded with
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _decode_new(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(_BROKEN)):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: the text now safe to release, and whether a stop string ended the answer."""
        self.ids.append(int(token_id))
        self.text += self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The answer ended (end-of-turn token or length): release whatever is still held."""
        self.text += self._decode_new(final=True)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        # Held text never contains a whole stop string, so any occurrence starts at ``sent`` or later.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            end = min(found)
            piece, self.text, self.sent = self.text[self.sent:end], self.text[:end], end
            return piece, True
        end = len(self.text) if final else len(self.text) - self._held()
        piece, self.sent = self.text[self.sent:end], end
        return piece, False

    def _held(self) -> int:
        """Length of the longest unreleased suffix that begins some stop string."""
        tail = self.text[self.sent:]
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
