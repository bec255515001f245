"""Caption tokenizers: a BPE trained on the training captions (from-scratch text tower), or a
transformers tokenizer (pretrained text tower), behind one ``encode`` that never cuts silently.

A caption longer than the context is cut and counted (``too_long = "truncate"``) or refused
with its sample named (``"refuse"``); an empty caption is always refused: it would teach the
text tower that nothing matches an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chiasm.data.sample import DataError

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


@dataclass
class Encoded:
    ids: torch.Tensor  # (B, context) token ids, padded
    mask: torch.Tensor  # (B, context) 1 on real tokens
    truncated: int  # how many captions were cut to fit the context


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (its file saved with the model) or a transformers tokenizer."""

    def __init__(self, backend, context_length: int, *, too_long: str = "truncate", hf: bool = False):
        self.backend = backend
        self.context_length = context_length
        self.too_long = too_long
        self.hf = hf
        if hf:
            self.pad_id = backend.pad_token_id if backend.pad_token_id is not None else 0
            self.eos_id = backend.sep_token_id if backend.sep_token_id is not None else backend.eos_token_id
        else:
            self.pad_id = backend.token_to_id(PAD)
            self.eos_id = backend.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return len(self.backend) if self.hf else self.backend.get_vocab_size()

    @classmethod
    def train(cls, captions: Sequence[str], vocab_size: int, context_length: int, *,
              too_long: str = "truncate") -> CaptionTokenizer:
        """A lower-cased BPE learnt from ``captions``: CLIP's kind of tokenizer, sized to the data."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS], show_progress=False)
        tok.train_from_iterator(list(captions), trainer)
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}",
                                                           special_tokens=[(EOS, tok.token_to_id(EOS))])
        return cls(tok, context_length, too_long=too_long)

    @classmethod
    def load_file(cls, path: Path, context_length: int, *, too_long: str = "truncate") -> CaptionTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), context_length, too_long=too_long)

    @classmethod
    def from_pretrained(cls, source: str, context_length: int, *, too_long: str = "truncate",
                        trust_remote_code: bool = False) -> CaptionTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code), context_length,
                   too_long=too_long, hf=True)

    def save(self, folder: Path) -> None:
        if self.hf:
            self.backend.save_pretrained(folder / "tokenizer")
        else:
            self.backend.save(str(folder / "tokenizer.json"))

    def _ids(self, caption: str) -> list[int]:
        if self.hf:
            return self.backend(caption, add_special_tokens=True)["input_ids"]
        return self.backend.encode(caption).ids

    def encode(self, captions: Sequence[str], names: Sequence[str] | None = None, *, pad_to_context: bool = False
               ) -> Encoded:
        """Token ids, padded to the longest caption of the batch (or to the context); the end token is
        kept even when a caption is cut.

        Padding only to the batch's longest caption changes no embedding (padding sits after the end
        token the towers pool at, behind a causal or attention mask) and saves the compute of the rest.
        """
        n = self.context_length
        rows, cut = [], 0
        for i, caption in enumerate(captions):
            where = names[i] if names else f"caption {i}"
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where}: empty caption; every image needs text that describes it")
            row = self._ids(caption)
            if len(row) > n:
                if self.too_long == "refuse":
                    raise DataError(f"{where}: caption of {len(row)} tokens is longer than the text tower's "
                                    f"context of {n} (set model.text.too_long = 'truncate' to cut it): "
                                    f"{caption[:80]!r}")
                row = [*row[: n - 1], row[-1]]  # keep the closing token the tower pools at
                cut += 1
            rows.append(row)
        width = n if pad_to_context else max((len(r) for r in rows), default=1)
        ids = torch.full((len(captions), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(captions), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return Encoded(ids, mask, cut)
