"""Whisper training batches: log-mel features and decoder sequences whose prompt is masked in the labels.

A sequence is ``<|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|> text <|endoftext|>``;
the decoder reads it shifted right and the labels are its next tokens, with the prompt's
positions set to -100: the model is never trained to predict the language or task it was
given, only the words and the end token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chiasm.data.sample import DataError
from chiasm.speech.audio import SAMPLE_RATE
from chiasm.speech.loader import Whisper
from chiasm.speech.tokens import decoder_prompt

IGNORE = -100


@dataclass
class SpeechBatch:
    features: torch.Tensor | None  # (B, n_mels, 3000), None when encoder outputs are cached
    decoder_input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 on the prompt and the padding
    speech_frames: list[int]

    @property
    def n_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def label_sequence(w: Whisper, text: str, language: str | None, task: str, where: str) -> tuple[list[int], list[int]]:
    """(decoder input ids, labels) of one transcript; too long for the decoder is refused naming ``where``."""
    prompt = decoder_prompt(w.tokenizer, language, task)
    words = w.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
    if not words:
        raise DataError(f"{where}: the transcript has no tokens")
    eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    seq = prompt + words + [eot]
    if len(seq) > w.model.config.max_target_positions:
        raise DataError(f"{where}: transcript of {len(words)} tokens is longer than the decoder's "
                        f"{w.model.config.max_target_positions} positions")
    inputs, labels = seq[:-1], seq[1:]
    labels = [IGNORE] * (len(prompt) - 1) + labels[len(prompt) - 1 :]
    return inputs, labels


def collate(w: Whisper, audios: list[np.ndarray] | None, texts: list[tuple[str, str | None, str]], task: str,
            *, with_features: bool = True) -> SpeechBatch:
    """A padded batch; ``texts`` holds (text, language, where) per clip."""
    seqs = [label_sequence(w, t, lang, task, where) for t, lang, where in texts]
    eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    width = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), width), eot, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for b, (i, lab) in enumerate(seqs):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
    feats = None
    frames = [len(a) * 100 // SAMPLE_RATE for a in audios] if audios is not None else [3000] * len(seqs)
    if with_features and audios is not None:
        feats = w.features(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return SpeechBatch(feats, ids, labels, frames)
