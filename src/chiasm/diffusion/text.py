"""Prompts to token embeddings with a frozen text tower (all-MiniLM-L6-v2, packaged on PyPI).

Stable Diffusion reads a frozen text encoder's per-token outputs through cross-attention;
this is the same with a small BERT that installs offline. The empty prompt "" is the null
condition of classifier-free guidance (its tokens are just [CLS] [SEP]). Embeddings of a
prompt are cached: the synthetic world's captions repeat, and the tower costs more than a
small UNet step.
"""

from __future__ import annotations

import torch

MAX_PROMPT_CHARS = 200
DEFAULT_TOWER = "packaged:all-minilm-l6-v2"


class TextTower:
    """(embeddings (B, L, D), attention mask (B, L)) for a list of prompts, padded to ``max_tokens``."""

    def __init__(self, source: str = DEFAULT_TOWER, max_tokens: int = 16) -> None:
        from transformers import AutoModel, AutoTokenizer

        from chiasm.bridges.bert_init import resolve_source

        path, local = resolve_source(source)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).eval()
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check(self, prompt: str) -> None:
        """An empty or over-long prompt is an error, not a silently cut one."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("--prompt is empty: describe the image, e.g. 'a large red circle in the top left'")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"--prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        n = len(self.tokenizer(prompt)["input_ids"])
        if n > self.max_tokens:
            raise ValueError(f"--prompt is {n} tokens; this model reads at most {self.max_tokens}")

    @torch.no_grad()
    def _one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._cache:
            enc = self.tokenizer(prompt, padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt")
            out = self.model(**enc).last_hidden_state[0]
            self._cache[prompt] = (out, enc["attention_mask"][0].bool())
        return self._cache[prompt]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._one(p) for p in prompts]
        return torch.stack([e for e, _ in pairs]), torch.stack([m for _, m in pairs])

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt, repeated ``batch`` times."""
        e, m = self._one("")
        return e.expand(batch, -1, -1).clone(), m.expand(batch, -1).clone()
