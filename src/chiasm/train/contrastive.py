"""Pre-alignment: a prefix bridge learns the LM's word space without running the LM.

Why a stage before *align*: through a frozen LM a fresh bridge learns first what the LM's
gradients make easy, the high-variance directions of the features (for ImageNet CNNs:
shape and layout). Attributes that live in low-variance directions (colour) stay unread
after hundreds of align steps, although a linear probe reads them almost perfectly. This
objective asks each caption word (its frozen input embedding) to find a visual token of its
own image close to it, and each visual token to find a word of its own caption, against
the other image-caption pairs of the batch: token-wise late interaction as in FILIP (Yao
et al., 2021); BLIP-2 likewise aligns its bridge contrastively before the LM reads it. A
caption's colour words differ from its neighbours', so colour becomes a strong direction.
A second term pulls visual-token norms to the words' norm, so the LM then reads tokens that
sit among its own word embeddings, at their scale. No LM forward pass is needed, so a step
costs milliseconds on cached features and thousands of pairs fit in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chiasm.config import StageConfig
from chiasm.data.regions import Region, box_token_mask, sample_regions
from chiasm.data.sample import DataError, Sample
from chiasm.model import VisionLanguageModel
from chiasm.train.features import FeatureCache
from chiasm.train.objectives import PREALIGN
from chiasm.train.prealign import bridge_tokens, check_bridge_only, read_samples


def caption_text(sample: Sample) -> str:
    """The text an image is paired with: its assistant turns, in order."""
    return " ".join(t.text.strip() for t in sample.conversations if t.role == "gpt").strip()


def token_contrastive_loss(visual: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, float]:
    """FILIP-style loss over a batch of ``B`` pairs; returns (loss, caption->image top-1 accuracy).

    ``visual`` is ``(B, N, D)``, ``words`` ``(B, L, D)`` with ``word_mask`` ``(B, L)`` true on real
    tokens. Similarity of image ``i`` and caption ``j`` is, one way, the mean over ``j``'s
    words of their best cosine with a token of ``i``, and the other way, the mean over
    ``i``'s tokens of their best cosine with a word of ``j``. Both are scored against the
    batch in both directions (four cross-entropies, averaged).
    """
    v = F.normalize(visual.float(), dim=-1)
    w = F.normalize(words.float(), dim=-1)
    mask = word_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("every caption needs at least one token")
    cos = torch.einsum("ind,jld->ijnl", v, w)  # (B images, B captions, N tokens, L words)
    word_best = cos.max(dim=2).values  # each word's best token: (B, B, L)
    words_to_image = (word_best * mask[None]).sum(-1) / mask.sum(-1)[None]
    token_best = cos.masked_fill(~mask[None, :, None, :], float("-inf")).max(dim=3).values
    image_to_words = token_best.mean(-1)
    target = torch.arange(v.shape[0], device=v.device)
    loss = sum(F.cross_entropy(s / temperature, target)
               for sim in (words_to_image, image_to_words) for s in (sim, sim.T)) / 4
    accuracy = float((words_to_image.T.argmax(1) == target).float().mean())
    return loss, accuracy


def with_phrases(words: torch.Tensor, mask: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append to each caption's words the mean embeddings of its runs of ``span`` tokens.

    Matched word by word, the tokens of one object can split its attributes ("red" on one
    token, "circle" on its neighbour), which leaves the LM a binding problem. A phrase unit
    such as "red circle in" is matched only by a token that carries both.
    """
    if span <= 1 or words.shape[1] < span:
        return words, mask
    m = mask.to(words.dtype)
    sums = (words * m[..., None]).unfold(1, span, 1).sum(-1)  # (B, L - span + 1, D)
    full = m.unfold(1, span, 1).sum(-1) == span
    return torch.cat([words, sums / span], dim=1), torch.cat([mask.bool(), full], dim=1)


def region_contrastive_loss(visual: torch.Tensor, phrases: torch.Tensor, region_image: torch.Tensor,
                            region_tokens: torch.Tensor, region_phrase: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, float]:
    """Phrase-region loss over the ``R`` grounded phrases of a batch; returns (loss, phrase->region top-1).

    ``visual`` is ``(B, N, D)``; ``phrases`` ``(U, D)`` holds one embedding per distinct phrase.
    Region ``r`` lies in image ``region_image[r]`` on the tokens ``region_tokens[r]`` (``(R, N)``
    bool) and is named by phrase ``region_phrase[r]``. A region scores a phrase by its best
    token's cosine, as in GLIP's word-region alignment: "red circle" must be found *in the
    box of the red circle*, not anywhere in the image, and the image's other objects are the
    hardest negatives. That ties attributes to places, which image-level matching leaves
    free. Two regions are left out of each other's negatives when they share a phrase, or
    when they are the same tokens of the same image (two phrases for one box).
    """
    v = F.normalize(visual.float(), dim=-1)
    p = F.normalize(phrases.float(), dim=-1)
    if not bool(region_tokens.any(-1).all()):
        raise ValueError("every region needs at least one token")
    sims = torch.einsum("bnd,ud->bnu", v, p)[region_image]  # (R, N, U)
    best = sims.masked_fill(~region_tokens[..., None], float("-inf")).max(dim=1).values  # (R, U)
    logits = best[:, region_phrase]  # region r against the phrase of region r'
    same = region_phrase[:, None] == region_phrase[None, :]
    same |= (region_image[:, None] == region_image[None, :]) & (region_tokens[:, None] == region_tokens[None]).all(-1)
    target = torch.arange(len(region_phrase), device=v.device)
    logits = logits.masked_fill(same & (target[:, None] != target[None, :]), float("-inf")) / temperature
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    accuracy = float((logits.T.argmax(1) == target).float().mean())
    return loss, accuracy


def norm_penalty(visual: torch.Tensor, target_norm: float) -> torch.Tensor:
    """Mean squared log-ratio of each visual token's norm to the words' mean norm."""
    return ((visual.float().norm(dim=-1).clamp_min(1e-6) / target_norm).log() ** 2).mean()


@PREALIGN.register("contrastive")
class ContrastiveObjective:
    """Everything the trainer needs for a ``objective = "contrastive"`` stage.

    The stage must freeze the encoder (features come from the cache) and the LM (only its
    input embeddings are read), and the bridge must be a prefix bridge: in-LM bridges do
    not emit tokens that the LM reads as words.
    """

    metric = "retrieval_acc"

    def __init__(self, model: VisionLanguageModel, samples: list[Sample], stage: StageConfig):
        check_bridge_only(model, stage, "contrastive")
        self.model = model
        self.temperature = stage.temperature
        self.phrase_span = stage.phrase_span
        self.region_weight = stage.region_weight
        token_grid = None
        if self.region_weight > 0:
            token_grid = model.bridge.token_grid(model.encoder.grid())
            if token_grid is None:
                raise ValueError(f"stage {stage.name!r}: region_weight needs a bridge whose tokens lie on a grid; "
                                 f"{type(model.bridge).__name__} mixes the whole image into every token")
        def read(s: Sample) -> tuple[str, list[Region]]:
            text = caption_text(s)
            problem = ("needs exactly one image" if len(s.images) != 1
                       else "has no assistant text to pair with its image" if not text else None)
            if problem is not None:
                raise DataError(f"a contrastive stage pairs one image with one caption; this sample {problem}",
                                source=s.source, sample_id=s.id)
            return text, sample_regions(s) if token_grid is not None else []

        self.samples, read_out, self.skipped = read_samples(samples, stage, read)
        texts = [text for text, _ in read_out]
        regions = [found for _, found in read_out]
        if not self.samples:
            raise ValueError(f"stage {stage.name!r}: no usable image-caption pairs in {stage.data}")
        tok = model.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        self.ids, self.mask = tok.input_ids, tok.attention_mask.bool()
        table = model.lm.get_input_embeddings().weight.detach()
        used = self.ids[self.mask].unique()
        self.target_norm = float(table[used].float().norm(dim=-1).mean())
        self.paths = [str(s.images[0]) for s in self.samples]
        if token_grid is not None:
            self._index_regions(regions, token_grid)

    def _index_regions(self, regions: list[list[Region]], token_grid: tuple[int, int]) -> None:
        """Per sample: (phrase index, token mask) of each region; distinct phrases tokenised once."""
        vocab: dict[str, int] = {}
        self.regions: list[list[tuple[int, torch.Tensor]]] = []
        for sample, found in zip(self.samples, regions, strict=True):
            items = []
            for r in found:
                tokens = box_token_mask(r.box, token_grid)
                if not bool(tokens.any()):
                    raise DataError(f"region {r.phrase!r} covers no token", source=sample.source, sample_id=sample.id)
                items.append((vocab.setdefault(r.phrase, len(vocab)), tokens))
            self.regions.append(items)
        # A leading space: phrases are matched in the form the words take inside a sentence.
        tok = self.model.tokenizer([" " + p for p in vocab], add_special_tokens=False, padding=True,
                                   return_tensors="pt")
        # The stage keeps the LM frozen, so each phrase's mean word embedding is computed once.
        with torch.no_grad():
            emb = self.model.lm.get_input_embeddings()(tok.input_ids.to(self.model.device))
        m = tok.attention_mask.to(emb.device, emb.dtype)[..., None]
        self.phrase_emb = (emb * m).sum(1) / m.sum(1)

    def __len__(self) -> int:
        return len(self.samples)

    def loss(self, indices: list[int], bridge: nn.Module, features: FeatureCache) -> tuple[torch.Tensor, float]:
        """Loss of one batch, through ``bridge`` (the bridge or its DDP wrapper), on ``features`` of ``paths``."""
        device = self.model.device
        visual = bridge_tokens(self.model, bridge, features, [self.paths[i] for i in indices])
        with torch.no_grad():
            words = self.model.lm.get_input_embeddings()(self.ids[indices].to(device))
        words, mask = with_phrases(words, self.mask[indices].to(device), self.phrase_span)
        loss, accuracy = token_contrastive_loss(visual, words, mask, self.temperature)
        if self.region_weight > 0:
            loss = loss + self.region_weight * self._region_loss(indices, visual)
        return loss + norm_penalty(visual, self.target_norm), accuracy

    def _region_loss(self, indices: list[int], visual: torch.Tensor) -> torch.Tensor:
        device = visual.device
        items = [(b, phrase, tokens) for b, i in enumerate(indices) for phrase, tokens in self.regions[i]]
        image = torch.tensor([b for b, _, _ in items], device=device)
        tokens = torch.stack([t for _, _, t in items]).to(device)
        phrase = torch.tensor([p for _, p, _ in items], device=device)
        loss, _ = region_contrastive_loss(visual, self.phrase_emb.to(device), image, tokens, phrase, self.temperature)
        return loss
