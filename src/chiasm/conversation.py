"""Turn a :class:`Sample` into token ids and labels using the LM's own chat template.

Assistant spans are found by rendering the conversation twice per assistant turn, once
up to the generation prompt and once including the answer, and taking the difference. No
offsets are hand-counted, so any chat template (ChatML, Llama, Qwen...) works as long as
rendering a longer conversation extends the shorter one.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from chiasm.data.sample import IMAGE_PLACEHOLDER, DataError, Sample, Turn
from chiasm.layout import image_text

IGNORE_INDEX = -100
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass
class Encoded:
    """Token ids, labels (-100 outside assistant answers) and the images in placeholder order."""

    input_ids: list[int]
    labels: list[int]
    n_images: int


class ConversationEncoder:
    """Tokenises conversations for one tokenizer / chat template / image-token count."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_token_id: int,
        tokens_per_image: int,
        max_length: int,
        system_prompt: str | None = None,
        image_layout: str = "raster",
    ):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; chiasm needs an instruct/chat LM")
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_text = image_text(image_layout, tokens_per_image)

    def _messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            msgs.append({"role": "system", "content": self.system_prompt})
        for t in turns:
            text = t.text.replace(IMAGE_PLACEHOLDER, self.image_text)
            msgs.append({"role": _ROLES[t.role], "content": text})
        return msgs

    def _render(self, msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        ids = out["input_ids"] if not isinstance(out, list) else out
        return list(ids)

    def encode(self, sample: Sample) -> Encoded:
        """Ids and labels for training: every assistant turn is supervised, nothing else."""
        msgs = self._messages(sample.conversations)
        ids = self._render(msgs, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], generation_prompt=True)
            upto = self._render(msgs[: i + 1], generation_prompt=False)
            if upto[: len(prefix)] != prefix or ids[: len(upto)] != upto:
                raise DataError("the chat template does not render conversations incrementally; "
                                "cannot locate assistant turns", source=sample.source, sample_id=sample.id)
            labels[len(prefix) : len(upto)] = upto[len(prefix) :]
        self._check(sample, ids)
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no trainable (assistant) token in this sample", source=sample.source, sample_id=sample.id)
        return Encoded(ids, labels, len(sample.images))

    def encode_prompt(self, sample: Sample) -> Encoded:
        """Ids for generation: the conversation so far plus the assistant prompt."""
        turns = sample.conversations
        if turns and turns[-1].role == "gpt":
            turns = turns[:-1]
        ids = self._render(self._messages(turns), generation_prompt=True)
        self._check(sample, ids)
        return Encoded(ids, [IGNORE_INDEX] * len(ids), len(sample.images))

    def _check(self, sample: Sample, ids: list[int]) -> None:
        placed = sum(1 for i in ids if i == self.image_token_id)
        expected = len(sample.images) * self.tokens_per_image
        if placed != expected:
            raise DataError(
                f"{placed} image-token positions for {len(sample.images)} image(s) x "
                f"{self.tokens_per_image} tokens = {expected}: placeholders and images do not match",
                source=sample.source, sample_id=sample.id)
        if len(ids) > self.max_length:
            raise DataError(
                f"sequence of {len(ids)} tokens (incl. {expected} image tokens) exceeds the LM's "
                f"maximum of {self.max_length}; image tokens are never truncated: shorten the "
                "conversation or use a bridge with fewer tokens", source=sample.source, sample_id=sample.id)
