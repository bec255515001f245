"""Turn a :class:`Sample` into token ids and labels using the LM's own chat template.

Assistant answers are located by :class:`chiasm.chat_template.ChatTemplate`: the whole
conversation is rendered once, and the answers' characters (plus the turn closing the
template writes after each) are known from a render with marker answers. Nothing is
hand-counted and rendering need not be incremental, so ChatML, Llama-3, Gemma (no system
role: the system prompt goes into the first user turn) and Qwen3 (think blocks on the last
turn only) all work. The generation prompt is the text the template writes before an
answer, so generation starts exactly where training put the answers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from chiasm.chat_template import ChatTemplate, TemplateProblem
from chiasm.data.sample import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, DataError, Sample, Turn
from chiasm.highres.tiling import TilingConfig, TilingError
from chiasm.highres.tiling import image_text as tiled_text
from chiasm.layout import image_text
from chiasm.tokens import tokens_for_image

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
        tiling: TilingConfig | None = None,
        tile_size: int = 0,
        audio_token_id: int | None = None,
        tokens_per_audio: int = 0,
    ):
        self.view_text = image_text(image_layout, tokens_per_image)
        self.template = ChatTemplate(tokenizer, image_text=self.view_text)
        self.tiling = tiling
        self.tile_size = tile_size
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.audio_token_id = audio_token_id
        self.tokens_per_audio = tokens_per_audio

    def _messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt is not None and (not turns or turns[0].role != "system"):
            msgs.append({"role": "system", "content": self.system_prompt})
        # The template expands each image placeholder (it knows whether it writes the image token
        # itself); an audio placeholder is the audio token, repeated once per audio-bridge token.
        clip = AUDIO_PLACEHOLDER * self.tokens_per_audio
        msgs.extend({"role": _ROLES[t.role],
                     "content": t.text.replace(AUDIO_PLACEHOLDER, clip) if self.tokens_per_audio else t.text}
                    for t in turns)
        return msgs

    def _check_audio(self, sample: Sample) -> None:
        """Audio placeholders and clips must match, and only a model that hears takes audio."""
        placed = sum(t.text.count(AUDIO_PLACEHOLDER) for t in sample.conversations)
        if (placed or sample.audios) and not self.tokens_per_audio:
            raise DataError(f"{len(sample.audios)} audio clip(s) and {placed} {AUDIO_PLACEHOLDER} placeholder(s), "
                            "but this model does not hear (its config has no [model.audio])",
                            source=sample.source, sample_id=sample.id)
        if placed != len(sample.audios):
            raise DataError(f"{placed} {AUDIO_PLACEHOLDER} placeholder(s) but {len(sample.audios)} audio clip(s): "
                            "placeholders and clips do not match", source=sample.source, sample_id=sample.id)

    def image_sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """(width, height) of each image: ``meta['image_sizes']`` (images in memory) or the files' headers."""
        given = sample.meta.get("image_sizes")
        if given is not None:
            return [(int(w), int(h)) for w, h in given]
        from chiasm.data.images import image_size  # the header only: no pixel is decoded here

        return [image_size(p, sample_id=sample.id, source=sample.source) for p in sample.images]

    def image_counts(self, sample: Sample) -> list[int]:
        """Image-token positions of each image of ``sample``, through :func:`chiasm.tokens.tokens_for_image`."""
        if self.tiling is None:
            return [self.tokens_per_image] * len(sample.images)
        out = []
        for path, size in zip(sample.images, self.image_sizes(sample), strict=True):
            try:
                out.append(tokens_for_image(self.tokens_per_image, size, self.tiling, self.tile_size))
            except TilingError as exc:
                raise DataError(f"{path}: {exc}", source=sample.source, sample_id=sample.id, image=str(path)) from None
        return out

    def image_lengths(self, sample: Sample) -> list[int]:
        """Sequence positions each image of ``sample`` takes: its image tokens and, tiled, the
        separator text between its views (for length estimates; :meth:`encode` is exact)."""
        if self.tiling is None:
            return [len(self.tok(self.view_text, add_special_tokens=False)["input_ids"])] * len(sample.images)
        texts = self._tiled_texts(sample)
        return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def _tiled_texts(self, sample: Sample) -> list[str]:
        """Each tiled image's text (views' tokens and separators), its header read once; an image no
        grid takes is refused, naming it."""
        out = []
        for path, size in zip(sample.images, self.image_sizes(sample), strict=True):
            try:
                out.append(tiled_text(size, self.tiling, self.tile_size, self.view_text))
            except TilingError as exc:
                raise DataError(f"{path}: {exc}", source=sample.source, sample_id=sample.id, image=str(path)) from None
        return out

    def _template(self, sample: Sample) -> ChatTemplate:
        """The template with this sample's image texts: one per image when images are tiled by size."""
        if self.tiling is None:
            return self.template  # a count mismatch shows in the image-token positions (_check)
        placed = sum(t.text.count(IMAGE_PLACEHOLDER) for t in sample.conversations)
        if placed != len(sample.images):
            raise DataError(f"{placed} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sample.images)} image(s): "
                            "placeholders and images do not match", source=sample.source, sample_id=sample.id)
        return self.template.with_image_texts(self._tiled_texts(sample))

    def encode(self, sample: Sample) -> Encoded:
        """Ids and labels for training: every assistant answer and its turn end are supervised, nothing else."""
        self._check_audio(sample)
        template = self._template(sample)
        try:
            text, spans = template.answer_spans(template.fit(self._messages(sample.conversations)))
        except TemplateProblem as exc:
            raise DataError(str(exc), source=sample.source, sample_id=sample.id) from None
        ids, supervised = template.tokenize(text, spans)
        labels = [i if on else IGNORE_INDEX for i, on in zip(ids, supervised, strict=True)]
        self._check(sample, ids)
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no trainable (assistant) token in this sample", source=sample.source, sample_id=sample.id)
        return Encoded(ids, labels, len(sample.images))

    def encode_prompt(self, sample: Sample) -> Encoded:
        """Ids for generation: the conversation so far plus what the template writes before an answer."""
        turns = sample.conversations
        if turns and turns[-1].role == "gpt":
            turns = turns[:-1]
        asked = replace(sample, conversations=turns)
        self._check_audio(asked)
        template = self._template(asked)
        try:
            text = template.prompt_text(template.fit(self._messages(turns)))
        except TemplateProblem as exc:
            raise DataError(str(exc), source=sample.source, sample_id=sample.id) from None
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        self._check(sample, ids)
        return Encoded(ids, [IGNORE_INDEX] * len(ids), len(sample.images))

    def _check(self, sample: Sample, ids: list[int]) -> None:
        placed = sum(1 for i in ids if i == self.image_token_id)
        expected = sum(self.image_counts(sample))
        if placed != expected:
            raise DataError(
                f"{placed} image-token positions for {len(sample.images)} image(s) of {expected} tokens in all: "
                "placeholders and images do not match",
                source=sample.source, sample_id=sample.id)
        heard = sum(1 for i in ids if i == self.audio_token_id) if self.tokens_per_audio else 0
        if heard != len(sample.audios) * self.tokens_per_audio:
            raise DataError(f"{heard} audio-token positions for {len(sample.audios)} clip(s) of "
                            f"{self.tokens_per_audio} tokens each: placeholders and clips do not match",
                            source=sample.source, sample_id=sample.id)
        if len(ids) > self.max_length:
            audio = f" and {heard} audio" if heard else ""
            raise DataError(
                f"sequence of {len(ids)} tokens (incl. {expected} image{audio} tokens) exceeds the LM's "
                f"maximum of {self.max_length}; image and audio tokens are never truncated: shorten the "
                "conversation or use a bridge with fewer tokens", source=sample.source, sample_id=sample.id)
