"""The processor: a sample (conversation, ``<image>`` placeholders, images) -> model inputs.

One object does it for training, evaluation, chat and serving alike, so the four can never
disagree on how an image is resized or how many positions it takes. It holds the tokenizer
(with its chat template and the image token), the image preprocessing, the number of visual
tokens per image and their layout; it is saved into every model folder
(``processor_config.json`` beside the LM's tokenizer) and read back from it, so a saved
model is always fed the way it was trained.

Samples are tokenised once up front (so a bad sample fails before hours of training, not
in the middle), and a batch lists its images in placeholder order, which is the order
:meth:`VisionLanguageModel.embed` consumes them in. Collation needs only the processor and,
for frozen encoders, a feature cache: never the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chiasm.conversation import IGNORE_INDEX, ConversationEncoder, Encoded
from chiasm.data.images import load_image
from chiasm.data.sample import DataError, Sample
from chiasm.encoders.preprocessing import ImagePreprocessing
from chiasm.errors import ModelFolderError, one_line
from chiasm.highres.tiling import TilingConfig
from chiasm.highres.tiling import views as tile_views
from chiasm.layout import LAYOUTS
from chiasm.tokens import AUDIO_TOKEN, IMAGE_TOKEN, add_audio_token, add_image_token

if TYPE_CHECKING:
    from chiasm.features import FeatureCache
    from chiasm.hearing.preprocessing import AudioPreprocessing
    from chiasm.model import VisionLanguageModel

log = logging.getLogger(__name__)
PROCESSOR_FILE = "processor_config.json"
TOKENIZER_FOLDER = "lm"  # the tokenizer is saved with the LM it belongs to


@dataclass
class Prepared:
    """A sample that tokenised cleanly, with the image paths its placeholders refer to."""

    sample: Sample
    encoded: Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_paths: list[str]
    features: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    # Samples dropped from this batch under on_error="skip": the DataError of each.
    skipped: list[DataError] = field(default_factory=list)
    # Log-mel windows ``(n_clips, n_mels, frames)`` in <audio> placeholder order (models that hear).
    audio: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), self.image_paths,
                     move(self.features), move(self.pixels), self.skipped, move(self.audio))


class Processor:
    """Tokenizer + image preprocessing + visual-token count and layout of one model (+ its audio, if it hears)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image: ImagePreprocessing, *, tokens_per_image: int,
                 max_length: int, system_prompt: str | None = None, image_layout: str = "raster",
                 tiling: TilingConfig | None = None, audio: AudioPreprocessing | None = None,
                 tokens_per_audio: int = 0):
        if image_layout not in LAYOUTS:
            raise ValueError(f"unknown image layout {image_layout!r}; known: {', '.join(LAYOUTS.names())}")
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer)
        self.image = image
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_layout = image_layout
        self.tiling = tiling
        self.audio = audio
        self.tokens_per_audio = tokens_per_audio if audio is not None else 0
        self.audio_token_id = add_audio_token(tokenizer) if audio is not None else None
        if audio is not None and tokens_per_audio < 1:
            raise ValueError(f"a model that hears needs at least one token per clip, not {tokens_per_audio}")
        if tiling is not None and (image.output_size is None or image.output_size[0] != image.output_size[1]):
            raise ValueError(f"tiling needs square encoder inputs; the image preprocessing gives "
                             f"{image.output_size or 'a size that depends on the image'}")
        self._conversation: ConversationEncoder | None = None

    # ---- construction and persistence -------------------------------------------------
    @classmethod
    def from_model(cls, model: VisionLanguageModel) -> Processor:
        """The processor of a built model: its tokenizer, its encoder's preprocessing, its token count."""
        hears = model.audio_encoder is not None
        return cls(model.tokenizer, model.encoder.preprocessing, tokens_per_image=model.tokens_per_image,
                   max_length=model.max_length, system_prompt=model.config.system_prompt,
                   image_layout=model.config.image_layout, tiling=model.config.tiling,
                   audio=model.audio_encoder.preprocessing if hears else None,
                   tokens_per_audio=model.tokens_per_audio)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None) -> Processor:
        """Read ``processor_config.json`` (and the tokenizer beside the LM) from a model folder."""
        folder = Path(folder)
        file = folder / PROCESSOR_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{folder} has no {PROCESSOR_FILE}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFolderError(f"{file}: not valid JSON ({exc}); save the model again") from exc
        known = {"image", "tokens_per_image", "max_length", "system_prompt", "image_layout", "image_token", "tiling",
                 "audio"}
        unknown = sorted(set(data) - known)
        missing = sorted({"image", "tokens_per_image", "max_length"} - set(data))
        if missing:
            raise ModelFolderError(f"{file}: missing key(s) {missing}; save the model again")
        if unknown:
            raise ValueError(f"{file}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if data.get("image_token", IMAGE_TOKEN) != IMAGE_TOKEN:
            raise ValueError(f"{file}: image token {data['image_token']!r}; this chiasm uses {IMAGE_TOKEN!r}")
        if tokenizer is None:
            tokenizer = load_tokenizer(folder / TOKENIZER_FOLDER)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        audio, tokens_per_audio = None, 0
        if data.get("audio"):
            from chiasm.hearing.preprocessing import AudioPreprocessing

            try:
                audio = AudioPreprocessing.from_dict(data["audio"])
                tokens_per_audio = int(data["audio"]["tokens"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFolderError(f"{file}: bad 'audio' entry ({exc!r}); save the model again") from exc
        return cls(tokenizer, ImagePreprocessing.from_dict(data["image"]),
                   tokens_per_image=int(data["tokens_per_image"]), max_length=int(data["max_length"]),
                   system_prompt=data.get("system_prompt"), image_layout=data.get("image_layout", "raster"),
                   tiling=TilingConfig.from_dict(data["tiling"]) if data.get("tiling") else None,
                   audio=audio, tokens_per_audio=tokens_per_audio)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image.to_dict(), "tokens_per_image": self.tokens_per_image,
                "max_length": self.max_length, "system_prompt": self.system_prompt,
                "image_layout": self.image_layout, "image_token": IMAGE_TOKEN,
                "tiling": None if self.tiling is None else asdict(self.tiling),
                "audio": None if self.audio is None else {**self.audio.to_dict(), "tokens": self.tokens_per_audio,
                                                          "token": AUDIO_TOKEN}}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``processor_config.json`` and the tokenizer (into ``lm/``) of a model folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
        return folder

    # ---- text ------------------------------------------------------------------------
    @property
    def conversation(self) -> ConversationEncoder:
        """The chat-template tokeniser (built on first use: it needs a chat template)."""
        if self._conversation is None:
            self._conversation = ConversationEncoder(
                self.tokenizer, image_token_id=self.image_token_id, tokens_per_image=self.tokens_per_image,
                max_length=self.max_length, system_prompt=self.system_prompt, image_layout=self.image_layout,
                tiling=self.tiling, tile_size=self.tile_size, audio_token_id=self.audio_token_id,
                tokens_per_audio=self.tokens_per_audio)
        return self._conversation

    @property
    def tile_size(self) -> int:
        """The side of one view (the encoder's square input), which tiles are cut at."""
        size = self.image.output_size
        return int(size[0]) if size is not None else 0

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def prepare(self, samples: Sequence[Sample], *, on_error: str = "raise", for_generation: bool = False,
                image_token_budget: int | None = None,
                drop: str = "none") -> tuple[list[Prepared], list[tuple[str, str]]]:
        """Tokenise every sample; on ``skip`` bad ones are counted and logged instead of raised.

        ``image_token_budget`` caps each sample's image tokens (:func:`chiasm.data.video.fit_budget`):
        over it a sample is refused, or with ``drop="frames"`` loses evenly spaced video frames,
        listed in its ``meta["dropped_frames"]`` and logged.
        """
        from chiasm.data.video import fit_budget

        enc = self.conversation
        out, skipped = [], []
        for s in samples:
            try:
                if image_token_budget is not None:
                    s, dropped = fit_budget(s, enc.image_counts(s), image_token_budget, drop=drop)
                    if dropped:
                        log.info("sample %r: dropped %s to fit %d image tokens", s.id, ", ".join(dropped),
                                 image_token_budget)
                e = enc.encode_prompt(s) if for_generation else enc.encode(s)
            except DataError as exc:
                if on_error != "skip":
                    raise
                skipped.append((s.id, str(exc)))
                continue
            out.append(Prepared(s, e))
        if skipped:
            log.warning("skipped %d of %d samples (first: %s)", len(skipped), len(samples), skipped[0][1])
        return out, skipped

    # ---- images ----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> the ``(3, H, W)`` pixels the encoder takes."""
        return self.image(image)

    def image_views(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> its views ``(V, 3, H, W)``: V = 1 untiled, else the global view and the tiles."""
        if self.tiling is None:
            return self.image(image)[None]
        return torch.stack([self.image(v) for v in tile_views(image, self.tiling, self.tile_size)])

    def view_count(self, path: str | Path) -> int:
        """How many views the image at ``path`` becomes, from its header alone (a DataError if unreadable
        or no grid takes it)."""
        if self.tiling is None:
            return 1
        from chiasm.data.images import image_size
        from chiasm.highres.tiling import TilingError, n_views

        try:
            return n_views(image_size(path), self.tiling, self.tile_size)
        except TilingError as exc:
            raise DataError(f"{path}: {exc}", image=str(path)) from None

    def views_key(self) -> str:
        """The tiling as text, for a feature cache's fingerprint ("" untiled)."""
        return "" if self.tiling is None else json.dumps(asdict(self.tiling), sort_keys=True) + f"|{self.tile_size}"

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images already in memory (e.g. received by a server) -> ``(views, 3, H, W)``, in placeholder order."""
        return torch.cat([self.image_views(im) for im in images])

    def collate(self, items: list[Prepared], *, left_pad: bool = False, features: FeatureCache | None = None,
                override_images: list[str] | None = None, on_error: str = "raise") -> Batch:
        """Pad (right for training, left for generation) and attach pixels or cached features."""
        return collate_items(items, self.pad_token_id, left_pad=left_pad, features=features,
                             preprocess=self.image_views, override_images=override_images, on_error=on_error,
                             audio=self.load_audio if self.audio is not None else None)

    def load_audio(self, path: str | Path) -> torch.Tensor:
        """One audio file -> the ``(n_mels, frames)`` window the audio encoder takes (a DataError if it cannot)."""
        if self.audio is None:
            raise DataError(f"{path}: this model does not hear (its config has no [model.audio])")
        return self.audio.load(path)

    def __call__(self, samples: Sequence[Sample], *, for_generation: bool = False,
                 features: FeatureCache | None = None) -> Batch:
        """Samples -> one batch (left-padded prompts for generation); a bad sample raises."""
        prepared, _ = self.prepare(samples, for_generation=for_generation)
        return self.collate(prepared, left_pad=for_generation, features=features)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder``; a missing or corrupt one is named as a broken model folder.

    transformers answers a folder without tokenizer files with a ValueError about its backends,
    which says nothing about which folder lacks what. ``trust_remote_code`` is the LM's: a
    tokenizer whose code ships with the model loads only with it.
    """
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{folder}: cannot load the tokenizer ({one_line(str(exc))}); the folder lacks "
                               "its tokenizer files or holds corrupt ones (save the model again)") from exc


def collate_items(items: list[Prepared], pad_id: int, *, left_pad: bool = False,
                  features: FeatureCache | None = None,
                  preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
                  override_images: list[str] | None = None, on_error: str = "raise",
                  max_pixels: int | None = None,
                  audio: Callable[[Path], torch.Tensor] | None = None) -> Batch:
    """Pad to the longest row and attach images, from the feature cache or through ``preprocess``.

    ``override_images`` replaces every image (used to test image reliance with a blank picture); it is
    resized to each original's size, so a tiled image keeps its grid and its token count.
    ``preprocess`` may give ``(3, H, W)`` or the views ``(V, 3, H, W)`` of a tiled image.
    An image that cannot be loaded raises a :class:`DataError` naming it, its sample and data
    file; with ``on_error="skip"`` its sample is dropped from the batch instead and listed in
    ``Batch.skipped`` (the batch may then have fewer rows, or none). ``max_pixels``: see
    :func:`~chiasm.data.images.load_image`. ``audio`` turns a sample's audio file into the audio
    encoder's log-mel window (a model that hears); bad audio is treated like a bad image.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    kept: list[Prepared] = []
    images: list[torch.Tensor] = []
    clips: list[torch.Tensor] = []
    skipped: list[DataError] = []
    for it in items:
        paths_of = [str(p) for p in it.sample.images]
        try:
            heard = sample_audio(it.sample, audio)
            if not paths_of:
                pass
            elif features is not None:
                images.append(features.lookup(paths_of if override_images is None
                                              else [override_images[0]] * len(paths_of)))
            elif preprocess is not None:
                loaded = [load_image(Path(p), sample_id=it.sample.id, source=it.sample.source, max_pixels=max_pixels)
                          for p in paths_of]
                if override_images is not None:
                    blank = load_image(Path(override_images[0]))
                    loaded = [blank.resize(im.size) for im in loaded]
                images.append(torch.cat([as_views(preprocess(im)) for im in loaded]))
            else:
                raise ValueError("collate needs a feature cache or an image preprocessing to load images")
        except DataError as exc:
            if on_error != "skip":
                if exc.sample_id is None:  # a cache miss knows the image but not who uses it
                    raise DataError(exc.message, sample_id=it.sample.id, source=it.sample.source,
                                    image=exc.image) from exc
                raise
            skipped.append(exc if exc.sample_id is not None else DataError(
                exc.message, sample_id=it.sample.id, source=it.sample.source, image=exc.image))
            continue
        kept.append(it)
        clips.extend(heard)
    width = max((len(it.encoded.input_ids) for it in kept), default=0)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    paths: list[str] = []
    for r, it in enumerate(kept):
        n = len(it.encoded.input_ids)
        sl = slice(width - n, width) if left_pad else slice(0, n)
        ids[r, sl] = torch.tensor(it.encoded.input_ids)
        labels[r, sl] = torch.tensor(it.encoded.labels)
        mask[r, sl] = 1
        paths.extend(str(p) for p in it.sample.images)
    if override_images is not None:
        paths = [override_images[0]] * len(paths)
    batch = Batch(ids, mask, labels, paths, skipped=skipped)
    if images:
        setattr(batch, "features" if features is not None else "pixels", torch.cat(images))
    if clips:
        batch.audio = torch.stack(clips)
    if skipped:
        log.warning("dropped %d of %d samples from a batch (first: %s)", len(skipped), len(items), skipped[0])
    return batch


def sample_audio(sample: Sample, load: Callable[[Path], torch.Tensor] | None) -> list[torch.Tensor]:
    """The log-mel windows of ``sample``'s clips, in placeholder order; clips for a model that does not
    hear (``load`` None) are a DataError."""
    if not sample.audios:
        return []
    if load is None:
        raise DataError(f"{len(sample.audios)} audio clip(s), but this model does not hear")
    return [load(Path(p)) for p in sample.audios]


def as_views(pixels: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` -> ``(1, 3, H, W)``; the views ``(V, 3, H, W)`` of a tiled image stay as they are."""
    return pixels[None] if pixels.dim() == 3 else pixels
