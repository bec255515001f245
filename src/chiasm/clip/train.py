"""CLIP training: one process or torchrun (DDP), locked towers cached, resumable to the exact batch.

The checkpoint is chiasm's (``chiasm.train.checkpoint``: crash-safe folder with weights,
optimizer, RNG and step); a batch is a pure function of (seed, step) (``chiasm.clip.batches``),
so ``--resume`` continues a killed run with the same batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chiasm.clip.batches import Batch, Plan, StepBatches, StreamBatches
from chiasm.clip.config import ClipRunConfig
from chiasm.clip.features import locked_image_features, pixel_cache
from chiasm.clip.model import ClipModel
from chiasm.clip.sources import build_pairs, build_shards
from chiasm.clip.tokenizer import CaptionTokenizer
from chiasm.config import ConfigError, to_dict
from chiasm.train import checkpoint as ckpt
from chiasm.train.dist import all_reduce_mean, barrier, init_distributed
from chiasm.train.trainer import _trim_metrics, lr_at, use_bf16

log = logging.getLogger(__name__)
TOKENIZER_SAMPLES = 20_000  # captions the from-scratch tokenizer learns from (enough for its vocabulary)


class Interrupted(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a killed run in tests."""


def _tokenizer(cfg: ClipRunConfig, out: Path, captions: list[str], resume: bool) -> CaptionTokenizer:
    t = cfg.model.text
    if t.kind == "hf":
        from chiasm.bridges.bert_init import resolve_source
        from chiasm.sources import hub_errors

        path, _ = resolve_source(t.source or "")
        with hub_errors(t.source or "", "text tower", "[model.text]"):
            return CaptionTokenizer.from_pretrained(path, t.context_length, too_long=t.too_long,
                                                    trust_remote_code=t.trust_remote_code)
    saved = out / "tokenizer.json"
    if resume and saved.is_file():
        return CaptionTokenizer.load_file(saved, t.context_length, too_long=t.too_long)
    tok = CaptionTokenizer.train(captions, t.vocab_size, t.context_length, too_long=t.too_long)
    return tok


def _param_groups(model: ClipModel, weight_decay: float) -> list[dict]:
    """CLIP's practice: no weight decay on gains, biases, embeddings and the temperature."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim < 2 or "embedding" in name or name.startswith("logit_") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _lock(model: ClipModel, cfg: ClipRunConfig) -> None:
    """Locked towers: the trunk frozen (and in eval mode), the projection still trained."""
    for tower, locked in ((model.visual, cfg.model.image.locked), (model.text, cfg.model.text.locked)):
        if not locked:
            continue
        for name, p in tower.named_parameters():
            p.requires_grad = name in ("proj", "proj.weight", "text_projection")


class ClipTrainer:
    def __init__(self, cfg: ClipRunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.dist = init_distributed(cfg.train.backend)
        self.skipped: list[tuple[str, str]] = []  # (sample, why) left out: images that failed to decode
        self._skipped_ids: set[str] = set()
        self.truncated = 0  # captions cut to the text context (distinct captions per batch, summed over steps)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def run(self, *, resume: bool = False, stop_after_steps: int | None = None) -> ClipModel:
        cfg, t, main = self.cfg, self.cfg.train, self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._open(resume)
        if self.dist.is_main and state is None:
            (self.out / "skipped.jsonl").unlink(missing_ok=True)
        start = state.step if state is not None else 0
        streamed = cfg.data.kind == "shards"
        pairs = None if streamed else build_pairs(cfg.data)
        captions = self._tokenizer_captions(pairs)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        tok = _tokenizer(cfg, self.out, captions, resume=state is not None)
        model = ClipModel(cfg.model, tok).to(self.dist.device)
        _lock(model, cfg)
        if t.grad_checkpointing:
            model.visual.set_checkpointing(True)
            model.text.set_checkpointing(True)
        if main:
            tok.save(self.out)
            self._log_trainable(model)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.98), eps=1e-6)
        for g in optimizer.param_groups:
            g["base_lr"] = t.lr
        if state is not None:
            ckpt.load_model_state(self.checkpoint_dir, model)
            ckpt.load_optimizer_and_rng(self.checkpoint_dir, optimizer)
            log.info("resuming at step %d", start)
        net = model
        if self.dist.world > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        loader, cached = self._loader(model, pairs, start)
        bf16 = use_bf16(t.precision, self.dist.device)
        metrics = self.out / "metrics.jsonl"
        if main and state is None:
            metrics.write_text("")
        elif main:
            _trim_metrics(metrics, start - 1)  # a killed run may have logged steps past its checkpoint
        bar = tqdm(total=t.steps, initial=start, desc="clip train", unit="step", disable=not main)
        t0, done = time.perf_counter(), 0
        model.train()
        for tower, locked in ((model.visual, cfg.model.image.locked), (model.text, cfg.model.text.locked)):
            if locked:  # a frozen trunk runs as it will at inference: no dropout
                tower.eval()
        for step, batch in zip(range(start, t.steps), loader, strict=False):
            loss = self._step(net, model, optimizer, batch, cached, step, bf16)
            done += 1
            bar.update(1)
            if main and (step % t.log_every == 0 or step == t.steps - 1):
                scale = float(model.scale().detach())
                record = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                          "logit_scale": scale, "temperature": 1 / scale,
                          "seconds": round(time.perf_counter() - t0, 3)}
                if model.logit_bias is not None:
                    record["logit_bias"] = float(model.logit_bias.detach())
                with metrics.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss:.3f}", T=f"{record['temperature']:.3f}")
            last = step == t.steps - 1
            if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or last:
                self._checkpoint(model, trained, optimizer, step + 1, last)
            if stop_after_steps is not None and done >= stop_after_steps and not last:
                bar.close()
                raise Interrupted(f"stopped after {done} steps (step {step + 1})")
        bar.close()
        self.train_seconds = time.perf_counter() - t0
        model.eval()
        if main:
            folder = model.save(self.out / "model")
            (folder / "training.json").write_text(json.dumps({
                "train_templates": list(cfg.data.templates or []) or None, "data": to_dict(cfg.data),
                "steps": t.steps, "batch_size": t.batch_size, "train_seconds": round(self.train_seconds, 2),
                "skipped": len(self.skipped), "truncated_captions": self.truncated}, indent=2) + "\n")
        barrier()
        return model

    # ---- pieces ---------------------------------------------------------------------------------
    def _open(self, resume: bool):
        if self.dist.is_main and resume:
            ckpt.recover(self.checkpoint_dir)
        barrier()
        state = ckpt.read_state(self.checkpoint_dir) if resume else None
        saved = self.out / "config.json"
        mine = to_dict(self.cfg)
        if state is not None and saved.is_file():
            before = json.loads(saved.read_text())
            keys = ("model", "data")
            changed = [k for k in keys if before.get(k) != mine.get(k)]
            if changed or before.get("train", {}).get("seed") != mine["train"]["seed"]:
                raise ConfigError(f"{saved}: the run was started with a different {' and '.join(changed) or 'seed'}; "
                                  "resume needs the same model, data and seed (start a new run with another --out)")
        if self.dist.is_main:
            if state is None:
                ckpt.remove_all(self.checkpoint_dir)
            saved.write_text(json.dumps(mine, indent=2) + "\n")
        barrier()
        return state

    def _tokenizer_captions(self, pairs) -> list[str]:
        if self.cfg.model.text.kind != "transformer":
            return []
        if pairs is not None:
            n = len(pairs)
            pick = range(n) if n <= TOKENIZER_SAMPLES else np.random.default_rng(0).choice(n, TOKENIZER_SAMPLES,
                                                                                          replace=False)
            return [c for i in pick for c in pairs.captions(int(i))]
        from chiasm.clip.shards import stream

        out = []
        for sample in stream(build_shards(self.cfg.data), on_error="skip"):
            out.extend(sample.captions)
            if len(out) >= TOKENIZER_SAMPLES:
                break
        return out

    def _log_trainable(self, model: ClipModel) -> None:
        for part, module in (("image tower", model.visual), ("text tower", model.text)):
            total = sum(p.numel() for p in module.parameters())
            train = sum(p.numel() for p in module.parameters() if p.requires_grad)
            state = "locked (projection trains)" if train < total else "trained"
            log.info("%s: %s, %d of %d parameters train", part, state, train, total)

    def _loader(self, model: ClipModel, pairs, start: int):
        cfg, t = self.cfg, self.cfg.train
        pre = model.preprocessing
        if pairs is None:
            files = build_shards(cfg.data)
            data = StreamBatches(files, t.batch_size, self.dist.rank, self.dist.world, t.seed, pre, skip=start,
                                 on_error=cfg.data.on_error)
            return torch.utils.data.DataLoader(data, batch_size=None, num_workers=min(t.workers, 1),
                                               collate_fn=lambda b: b), None
        skip = cfg.data.on_error == "skip"
        cached = None
        if cfg.model.image.locked:
            features, bad = locked_image_features(model, pairs, self.out / "cache", main=self.dist.is_main,
                                                  skip_bad=skip)
            keep = self._drop_bad(pairs, bad)
            pairs = pairs.subset(keep) if bad else pairs
            cached = (features, np.asarray(keep))
            data = StepBatches(pairs, Plan(len(pairs), t.batch_size, self.dist.world, t.seed), self.dist.rank, None)
        else:
            pixels, bad = pixel_cache(pairs, pre, t.cache_pixels_gb, skip_bad=skip)
            keep = self._drop_bad(pairs, bad)
            if bad:
                pairs = pairs.subset(keep)
                pixels = pixels[keep] if pixels is not None else None
            data = StepBatches(pairs, Plan(len(pairs), t.batch_size, self.dist.world, t.seed), self.dist.rank, pre,
                               pixels, skip_bad=skip)
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, t.steps),
                                             num_workers=t.workers, collate_fn=lambda b: b)
        return loader, cached

    def _drop_bad(self, pairs, bad: dict[int, str]) -> list[int]:
        """The samples to keep; each one left out is logged and listed in RUN/skipped.jsonl."""
        for i, why in sorted(bad.items()):
            self._skip(pairs.ids[i], why)
        if bad:
            log.warning("skipped %d of %d samples whose image failed to decode (on_error = 'skip'); see %s",
                        len(bad), len(pairs), self.out / "skipped.jsonl")
        return [i for i in range(len(pairs)) if i not in bad]

    def _skip(self, sample: str, why: str) -> None:
        if sample in self._skipped_ids:
            return
        self._skipped_ids.add(sample)
        self.skipped.append((sample, why))
        if self.dist.is_main:
            with (self.out / "skipped.jsonl").open("a") as fh:
                fh.write(json.dumps({"sample": sample, "reason": why}) + "\n")

    def _step(self, net, model: ClipModel, optimizer, batch: Batch, cached, step: int, bf16: bool) -> float:
        t = self.cfg.train
        factor = lr_at(step, t.steps, t.warmup, t.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        unique = list(dict.fromkeys(batch.captions))
        where = {c: k for k, c in enumerate(unique)}
        enc = model.tokenizer.encode(unique)
        if enc.truncated and not self.truncated:
            log.warning("captions longer than the text context (%d tokens) are cut to fit; the count is in "
                        "model/training.json (set model.text.too_long = 'refuse' to stop instead)",
                        model.tokenizer.context_length)
        self.truncated += enc.truncated
        device = self.dist.device
        kwargs = {"caption_index": torch.tensor([where[c] for c in batch.captions], device=device)}
        for sample, why in batch.skipped:
            self._skip(sample, why)
        if cached is not None:
            features, rows = cached
            kwargs["pooled"] = torch.from_numpy(np.ascontiguousarray(features[rows[batch.indices]])).to(device)
        else:
            kwargs["pixels"] = batch.pixels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = net(enc.ids.to(device), enc.mask.to(device), **kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return all_reduce_mean(float(loss.detach()))

    def _checkpoint(self, model: ClipModel, trained: set[str], optimizer, step: int, done: bool) -> None:
        if self.dist.is_main:
            params = dict(model.state_dict())
            ckpt.save_checkpoint(self.checkpoint_dir, params, trained, optimizer.state_dict(),
                                 ckpt.TrainState(0, step, done, self.dist.world))
        barrier()
