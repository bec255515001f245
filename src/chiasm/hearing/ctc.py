"""Pre-alignment of the audio bridge by CTC over the LM's own word embeddings (``ctc``).

Through a frozen LM a fresh audio bridge learns slowly: every step pays a full LM forward
and backward pass, and the gradient that reaches the bridge says only which next token was
wrong, not which stretch of speech should have carried it. Here the bridge's audio tokens
are scored directly against the LM's input embeddings: the logit of word ``v`` at audio
token ``t`` is the cosine of the token and ``v``'s embedding over a temperature, plus one
extra "blank" class, and connectionist temporal classification (Graves et al., 2006) sums
over every monotonic alignment of the transcript's LM tokens to the audio tokens. After it
the audio tokens of a word point at that word's own embedding, in the order spoken, with
blanks between: a sequence a frozen LM nearly reads as text. A second term pulls each token
onto the embedding its posterior expects, so a confident token *is* its word's embedding, at
its norm (the LM reads magnitudes too, and a cosine alone leaves them free). The
speech-LLM literature uses the same idea (CTC-compressed or CTC-posterior inputs to an LLM,
e.g. LegoSLM); here it is a stage before the next-token stages, which then tune the bridge
through the LM.

The classes scored are the LM tokens that occur in the stage's transcripts (plus blank), not
the whole vocabulary: a CTC head names the symbols of its data, and scoring 50,000 classes at
every audio token would cost more than the LM pass this stage avoids. The blank is the LM's
own embedding of a lone space where its tokenizer has one (GPT-2-style byte-level BPE does), so
the stretches between words read to the LM as extra spaces rather than as foreign vectors;
otherwise a fixed random direction (seeded: every rank and every resume has the same one).

Each sample is one ``<audio>`` clip with its transcript as the assistant's answer (the
``hear`` data of a speech -> transcript stage). The Whisper encoder's outputs are computed once
per clip, on first use, and kept in memory (fp16): a step then costs the bridge alone. As
cached frames repeat exactly every epoch, each training step masks time spans of them and
drops single values (:func:`mask_frames`), drawn from torch's generator, whose state the
trainer's checkpoints keep, so a resumed stage masks as an uninterrupted one does.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from chiasm.config import StageConfig
from chiasm.data.sample import DataError, Sample
from chiasm.model import VisionLanguageModel
from chiasm.train.contrastive import caption_text
from chiasm.train.features import FeatureCache
from chiasm.train.objectives import PREALIGN
from chiasm.train.prealign import read_samples

BLANK_SEED = 0


def ctc_room(ids: list[int]) -> int:
    """Audio tokens a CTC path for ``ids`` needs at least: one per token, plus a blank between repeats."""
    return len(ids) + sum(a == b for a, b in pairwise(ids))


def greedy_ctc(best: list[int], blank: int = 0) -> list[int]:
    """Best class per audio token -> the label sequence: repeats merged, then blanks dropped."""
    out, prev = [], blank
    for b in best:
        if b != prev and b != blank:
            out.append(b)
        prev = b
    return out


def transcript(sample: Sample) -> str:
    """What the clip says: the sample's assistant turns, in order, single-spaced (a lone space is the blank)."""
    return " ".join(caption_text(sample).split())


def blank_vector(model: VisionLanguageModel, norm: float) -> torch.Tensor:
    """The blank class's embedding: the LM's own for a lone space, else a seeded random direction of norm ``norm``."""
    table = model.lm.get_input_embeddings().weight.detach()
    ids = model.tokenizer(" ", add_special_tokens=False).input_ids
    if len(ids) == 1:
        return table[ids[0]].float().cpu()
    g = torch.Generator().manual_seed(BLANK_SEED)
    return norm * F.normalize(torch.randn(table.shape[1], generator=g), dim=0)


def mask_frames(frames: torch.Tensor, generator: torch.Generator | None = None, *, spans: int = 2, width: int = 10,
                drop: float = 0.1) -> torch.Tensor:
    """SpecAugment's time masks on the encoder's frames, plus dropout of single features.

    Cached frames are the same every epoch, so without them a bridge learns each clip by heart
    (every training clip decoded exactly while new voices fail): ``spans`` runs of up to
    ``width`` frames (20 ms each) are zeroed per clip, and a ``drop`` share of feature values.
    Without a ``generator`` the draws come from torch's global generator, whose state the
    trainer's checkpoints keep: a resumed stage masks as an uninterrupted one does."""
    b, t, _ = frames.shape
    keep = torch.ones(b, t, 1)
    for row in range(b):
        for _ in range(spans):
            w = int(torch.randint(0, width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, t - w), (1,), generator=generator))
            keep[row, start:start + w] = 0
    noise = (torch.rand(frames.shape, generator=generator) >= drop).float() / (1 - drop)
    return frames * (keep * noise).to(frames.device, frames.dtype)


@PREALIGN.register("ctc")
class CTCObjective:
    """Everything the trainer needs for an ``objective = "ctc"`` stage (see the module docstring)."""

    metric = "exact"  # share of a batch's clips whose greedy CTC decoding is their transcript, token for token
    component = "audio_bridge"  # the module this objective trains (and DDP wraps)
    mask_spans, mask_width, mask_drop = 2, 10, 0.1  # per training clip: see mask_frames

    def __init__(self, model: VisionLanguageModel, samples: list[Sample], stage: StageConfig):
        if model.audio_encoder is None:
            raise ValueError(f"stage {stage.name!r}: a ctc stage trains the audio bridge of a model that hears "
                             "(give the model [model.audio])")
        trained = {c: getattr(stage, c).mode for c in ("encoder", "bridge", "lm") if getattr(stage, c).mode != "frozen"}
        if trained or stage.audio_bridge.mode != "full":
            raise ValueError(f"stage {stage.name!r}: a ctc stage trains the audio bridge alone (audio_bridge "
                             f"'full', encoder, bridge and lm 'frozen'); got audio_bridge "
                             f"{stage.audio_bridge.mode!r}" + "".join(f", {k} {v!r}" for k, v in trained.items()))
        self.model = model
        self.paths: list[str] = []  # no image features are read
        self.temperature = stage.temperature
        self.slots = model.tokens_per_audio
        self.samples, rows, self.skipped = read_samples(samples, stage, self._read)
        if not self.samples:
            raise ValueError(f"stage {stage.name!r}: no usable speech -> transcript samples in {stage.data}")
        self._mels = dict(enumerate(mel for mel, _ in rows))  # each dropped once its frames are kept
        self.labels = [ids for _, ids in rows]
        self.vocab = torch.tensor(sorted({i for ids in self.labels for i in ids}))  # class k + 1 is vocab[k]
        self.klass = {int(v): k + 1 for k, v in enumerate(self.vocab)}
        table = model.lm.get_input_embeddings().weight.detach()
        self.scale = float(table[self.vocab].float().pow(2).sum(-1).mean())  # mean squared norm of a word
        self.blank = blank_vector(model, self.scale ** 0.5)
        self._frames: dict[int, torch.Tensor] = {}

    def _read(self, sample: Sample) -> tuple[torch.Tensor, list[int]]:
        if len(sample.audios) != 1 or sample.images:
            raise DataError("a ctc stage reads speech -> transcript samples: one audio clip, no image",
                            source=sample.source, sample_id=sample.id)
        text = transcript(sample)
        if not text:
            raise DataError("empty transcript", source=sample.source, sample_id=sample.id)
        ids = self.model.tokenizer(text, add_special_tokens=False).input_ids
        if ctc_room(ids) > self.slots:
            raise DataError(f"a transcript of {len(ids)} LM tokens needs {ctc_room(ids)} audio tokens for CTC; "
                            f"a clip has {self.slots} (a smaller bridge kernel gives more)",
                            source=sample.source, sample_id=sample.id)
        mel = self.model.audio_encoder.preprocessing.load(sample.audios[0])
        return mel.half(), ids

    def __len__(self) -> int:
        return len(self.samples)

    def frames(self, indices: list[int]) -> torch.Tensor:
        """Whisper encoder outputs of the clips ``indices``, computed on first use and kept."""
        new = [i for i in indices if i not in self._frames]
        if new:
            enc = self.model.audio_encoder
            mel = torch.stack([self._mels.pop(i) for i in new]).to(self.model.device, torch.float32)
            for i, f in zip(new, enc(mel), strict=True):
                self._frames[i] = f.half().cpu()
        return torch.stack([self._frames[i] for i in indices])

    def classes(self, device: torch.device) -> torch.Tensor:
        """``(1 + |vocab|, D)``: the blank's embedding, then the LM's embedding of each transcript token."""
        table = self.model.lm.get_input_embeddings().weight.detach()
        return torch.cat([self.blank.to(device)[None], table[self.vocab.to(device)].float()])

    def logits(self, tokens: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D)`` audio tokens -> ``(B, T, 1 + |vocab|)`` class scores (cosines / temperature), blank first;
        ``classes`` is :meth:`classes` when the caller already gathered it."""
        classes = F.normalize(self.classes(tokens.device) if classes is None else classes, dim=-1)
        return F.normalize(tokens.float(), dim=-1) @ classes.T / self.temperature

    def loss(self, indices: list[int], bridge: nn.Module, features: FeatureCache | None) -> tuple[torch.Tensor, float]:
        """CTC loss of one batch plus the pull term, and the share of clips decoded exactly.

        The pull term regresses each token onto the embedding its own posterior expects (the
        posterior-weighted mean of the class embeddings, held fixed): as CTC grows confident, a
        token becomes the very embedding of its word, or of the blank's space, at its norm."""
        device = self.model.device
        frames = self.frames(indices).to(device, next(bridge.parameters()).dtype)
        if bridge.training:
            frames = mask_frames(frames, spans=self.mask_spans, width=self.mask_width, drop=self.mask_drop)
        tokens = bridge(frames, self.model.audio_encoder.grid())
        classes = self.classes(device)  # gathered once: the scores' and the pull target's class embeddings
        logp = self.logits(tokens, classes).log_softmax(-1)
        targets = [torch.tensor([self.klass[i] for i in self.labels[j]]) for j in indices]
        lengths = torch.tensor([len(t) for t in targets])
        ctc = F.ctc_loss(logp.transpose(0, 1), torch.cat(targets).to(device),
                         torch.full((len(indices),), tokens.shape[1], dtype=torch.long), lengths, blank=0,
                         zero_infinity=True)
        expected = logp.detach().exp() @ classes
        pull = F.mse_loss(tokens.float(), expected, reduction="none").sum(-1).mean() / self.scale
        with torch.no_grad():
            decoded = [greedy_ctc(row) for row in logp.argmax(-1).tolist()]
            exact = sum(d == t.tolist() for d, t in zip(decoded, targets, strict=True)) / len(indices)
        return ctc + pull, exact
