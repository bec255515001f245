"""Run a recipe: its stages in order, in one process or under torchrun (DDP).

Batches are a pure function of (seed, stage, step), which makes the data position of a
checkpoint just its step number and lets ``--resume`` continue a killed run exactly.
Only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from chiasm.config import RunConfig, StageConfig
from chiasm.config_checks import check_run_config
from chiasm.data.llava import load_llava
from chiasm.jsonl import read_records
from chiasm.model import VisionLanguageModel
from chiasm.train import checkpoint as ckpt
from chiasm.train.budget import apply_token_budget
from chiasm.train.dist import (
    DistInfo,
    all_reduce_mean,
    barrier,
    env_world_size,
    init_distributed,
    supervised_tokens,
    token_weights,
)
from chiasm.train.features import FeatureCache
from chiasm.train.grouping import stage_order
from chiasm.train.init_from import resolve_init_from, start_model
from chiasm.train.loader import StageLoader
from chiasm.train.objectives import build_prealign
from chiasm.train.parallel import check_parallel_config, gradient_sync, needs_unused_search, unwrap, wrap
from chiasm.train.policy import COMPONENTS, apply_stage_policies, set_train_modes
from chiasm.train.replay import replay_loss, sample_text
from chiasm.train.resume_config import record_fresh_start, record_resume, resume_run_config
from chiasm.train.skips import SkipLog, drop_bad_images

log = logging.getLogger(__name__)
StageHook = Callable[[VisionLanguageModel, StageConfig, int], None]


class Interrupted(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a killed run in tests."""


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware runs it natively (CUDA bf16, CPUs with AMX/AVX512-BF16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    PyTorch's capability string names only the vector width ("AVX512"), not the bf16
    extension, so the kernel's CPU flags are read. Where they can't be (not Linux), fp32 is
    the safe answer: emulated bf16 is slower than fp32.
    """
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio``: the factor applied to each group's lr."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class StagePlan:
    """Which sample indices make up micro-batch ``k`` of optimizer step ``step`` on ``rank``.

    ``order`` may rearrange each epoch's shuffled permutation (e.g. length grouping); it gets
    the permutation and the epoch and must be deterministic.
    """

    def __init__(self, n: int, stage: StageConfig, world: int, seed: int,
                 order: Callable[[list[int], int], list[int]] | None = None):
        self.n, self.stage, self.world, self.seed, self.order = n, stage, world, seed, order
        per_step = stage.batch_size * stage.grad_accum * world
        if n < per_step:
            raise ValueError(f"stage {stage.name!r}: {n} samples is fewer than one optimizer step "
                             f"({stage.batch_size} x {stage.grad_accum} accum x {world} ranks)")
        self.steps_per_epoch = n // per_step
        self.total = stage.max_steps or max(1, math.ceil(stage.epochs * self.steps_per_epoch))
        self._perms: dict[int, list[int]] = {}

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perms[epoch] = self.order(perm, epoch) if self.order is not None else perm
        b = self.stage.batch_size
        start = ((within * self.stage.grad_accum + micro) * self.world + rank) * b
        return self._perms[epoch][start : start + b]

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch


def _stage_samples(stage: StageConfig, out: Path | None) -> tuple[list, SkipLog]:
    """The stage's samples, and its skip log holding the records left out (written into ``out``)."""
    result = load_llava(stage.data, stage.image_root, on_error=stage.on_error,
                        allow_outside_root=stage.allow_outside_image_root)
    skips = SkipLog(stage.name, stage.data, len(result.samples) + len(result.skipped), stage.max_skip_fraction, out)
    for sample_id, reason in result.skipped:
        skips.add(sample_id, reason)
    if result.skipped:
        log.warning("stage %s: skipped %d invalid records in %s", stage.name, len(result.skipped), stage.data)
    return result.samples, skips


def _optimizer(model: VisionLanguageModel, stage: StageConfig) -> torch.optim.Optimizer:
    groups = []
    for comp in COMPONENTS:
        params = [p for p in getattr(model, comp).parameters() if p.requires_grad]
        if not params:
            continue
        lr = getattr(stage, comp).lr or stage.lr
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for ps, wd in ((decay, stage.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": comp})
    if not groups:
        raise ValueError(f"stage {stage.name!r} trains nothing: every component is frozen")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


class Trainer:
    """Trains a :class:`VisionLanguageModel` through the stages of a :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, model: VisionLanguageModel | None = None,
                 dist_info: DistInfo | None = None, show_progress: bool = True):
        resolve_init_from(cfg)  # the saved folder's model config, checked with the rest
        check_run_config(cfg)  # before the model is built: a bad value costs no loading time
        self.cfg = cfg
        check_parallel_config(cfg, dist_info.world if dist_info else env_world_size(), torch.cuda.is_available())
        self.dist = dist_info or init_distributed(cfg.backend)
        self.run_dir = Path(cfg.output_dir)
        self.show_progress = show_progress and self.dist.is_main
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = model or start_model(cfg)
        self.model.to(self.dist.device)
        self.bf16 = use_bf16(cfg.precision, self.dist.device)
        self.trained: set[str] = set()
        self.stage_counts: dict[str, dict] = {}
        self.skipped: dict[str, list[dict]] = {}  # per LM stage: the samples left out under on_error = "skip"
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "stages.json").write_text(json.dumps([s.name for s in cfg.stages]))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def run(self, *, resume: bool = False, stop_after_steps: int | None = None,
            on_stage_end: StageHook | None = None) -> VisionLanguageModel:
        """Train every stage; ``resume`` continues from ``RUN/checkpoint`` if present.

        The config must match the run folder's ``config.json`` where the weights so far depend
        on it (:mod:`chiasm.train.resume_config`); a fresh start removes an earlier checkpoint,
        which the new ``config.json`` no longer describes.
        """
        state = self._open_run_folder(resume)
        self._steps_left = stop_after_steps
        for i, stage in enumerate(self.cfg.stages):
            self.stage_counts[stage.name] = apply_stage_policies(
                self.model, {c: getattr(stage, c) for c in COMPONENTS})
            self._mark_trained()
            if state is not None and (i < state.stage_index or (i == state.stage_index and state.stage_done)):
                if i == state.stage_index:
                    self.trained = ckpt.load_model_state(self.checkpoint_dir, self.model)
                    ckpt.load_rng(self.checkpoint_dir)  # the next stage's new weights (LoRA) draw from it
                    log.info("resumed after completed stage %s", stage.name)
                continue
            start = 0
            if state is not None and i == state.stage_index:
                self.trained = ckpt.load_model_state(self.checkpoint_dir, self.model) | self.trained
                start = state.step
                log.info("resuming stage %s at step %d", stage.name, start)
            try:
                self._train_stage(i, stage, start_step=start, resume_from=self.checkpoint_dir if start else None)
            finally:
                self.model.eval()  # also when a stage stops early: nothing after it should run dropout
            state = None
            if on_stage_end is not None and self.dist.is_main:
                on_stage_end(self.model, stage, i)
            barrier()
        if self.dist.is_main:
            self._plot()
        return self.model

    def _open_run_folder(self, resume: bool) -> ckpt.TrainState | None:
        if self.dist.is_main and resume:
            ckpt.recover(self.checkpoint_dir)  # a save cut short leaves its state beside the folder
        barrier()
        state = ckpt.read_state(self.checkpoint_dir) if resume else None
        if resume and state is None:
            log.info("no checkpoint in %s: starting from scratch", self.checkpoint_dir)
        changes = resume_run_config(self.cfg, self.run_dir, state, self.dist.world) if state is not None else []
        barrier()  # every rank has read the saved config before it is replaced
        if self.dist.is_main and state is not None:
            record_resume(self.cfg, self.run_dir, state, changes)
        elif self.dist.is_main:
            ckpt.remove_all(self.checkpoint_dir)
            record_fresh_start(self.cfg, self.run_dir)
        barrier()
        return state

    def _mark_trained(self) -> None:
        self.trained |= {n for n, p in self.model.named_parameters() if p.requires_grad}

    def _features(self, paths: list[str], stage: StageConfig, samples: list) -> FeatureCache | None:
        if stage.encoder.mode != "frozen":
            return None
        if not stage.feature_cache:
            if stage.objective != "lm":
                raise ValueError(f"stage {stage.name!r}: objective {stage.objective!r} reads cached features; "
                                 "it needs feature_cache = true")
            return None
        cache_dir = Path(self.cfg.feature_cache) if self.cfg.feature_cache else self.run_dir / "cache"
        # Each rank encodes its own shard; all then read every shard memory-mapped.
        return FeatureCache.build(self.model.encoder, paths, cache_dir=cache_dir, show_progress=self.show_progress,
                                  rank=self.dist.rank, world=self.dist.world, sync=barrier, on_error=stage.on_error,
                                  owners={str(p): (s.source, s.id) for s in samples for p in s.images},
                                  max_pixels=stage.max_image_pixels, **self._cache_views(stage))

    def _cache_views(self, stage: StageConfig) -> dict:
        """How the cache turns an image into encoder inputs: every view of a tiled image for an LM
        stage (rows in sequence order), else the one global view the pre-alignment objectives read."""
        proc = self.model.processor
        if proc.tiling is None or stage.objective != "lm":
            return {"preprocess": proc.image}
        return {"preprocess": proc.image_views, "views": (proc.view_count, proc.views_key())}

    def _train_stage(self, index: int, stage: StageConfig, *, start_step: int, resume_from: Path | None) -> None:
        model = self.model
        stage_dir = self.run_dir / "stages" / stage.name if self.dist.is_main else None
        samples, skips = _stage_samples(stage, stage_dir)
        if resume_from is not None:
            skips.restore()
        samples = apply_token_budget(samples, stage, model.processor.conversation, skips, stage_dir)
        # Pre-alignment objectives run the bridge alone on cached features, with no LM pass.
        prealign = build_prealign(model, samples, stage)
        if prealign is not None:
            n_items, paths = len(prealign), prealign.paths
        else:
            n_items, paths = len(samples), [str(p) for s in samples for p in s.images]
        # An objective with no image paths (ctc reads audio) needs no feature cache.
        features = self._features(paths, stage, samples) if prealign is None or paths else None
        if features is not None and features.bad:
            # The cache build decoded every image once: samples with a broken one go before step 1.
            samples = drop_bad_images(samples, features.bad, skips, stage.on_error)
            prealign = build_prealign(model, samples, stage) if prealign is not None else None
            n_items = len(prealign) if prealign is not None else len(samples)
        for sample_id, reason in getattr(prealign, "skipped", []):
            skips.add(sample_id, reason)
        if stage.on_error == "skip":
            skips.write()
        skips.check()
        seed = self.cfg.seed * 1000 + index
        order = stage_order(stage, samples, model, self.dist.world, seed) if prealign is None else None
        plan = StagePlan(n_items, stage, self.dist.world, seed, order=order)
        loader = None if prealign is not None else StageLoader(
            samples, model, stage, plan, rank=self.dist.rank, world=self.dist.world, start_step=start_step,
            features=features, stage_dir=self.run_dir / "stages" / stage.name)
        batches = iter(loader) if loader is not None else None
        replay = self._replay_pool(stage, plan.total, seed, resuming=resume_from is not None)
        # A pre-alignment stage runs only its bridge, so only that bridge is wrapped for DDP/FSDP.
        inner = getattr(model, getattr(prealign, "component", "bridge")) if prealign is not None else model
        set_train_modes(model, {c: getattr(stage, c) for c in COMPONENTS})
        if model.config.gradient_checkpointing:
            # transformers recomputes layers only in training mode, also for a frozen LM whose
            # activations carry the bridge's gradient (dropout of current LMs is zero).
            model.lm.train()
        if self.dist.world > 1:
            def first_loss(module: torch.nn.Module) -> torch.Tensor:
                indices = plan.indices(start_step, 0, self.dist.rank)
                if prealign is not None:
                    return prealign.loss(indices, module, features)[0]
                batch = loader.batch(indices).to(self.dist.device)
                with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    return module(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels,
                                  features=batch.features, position_ids=batch.position_ids, audio=batch.audio).loss

            # Samples without images (or, for a model that hears, without audio) leave a bridge ungraded.
            text_only = prealign is None and (any(not s.images for s in samples) or (
                model.audio_encoder is not None and any(not s.audios for s in samples)))
            unused = needs_unused_search(inner, first_loss, self.cfg.find_unused_parameters, self.dist.device,
                                         text_only_samples=text_only)
            wrapped = wrap(inner, model, self.cfg.strategy, self.dist, unused, text_only_samples=text_only)
        else:
            wrapped = inner
        # After wrapping: FSDP replaces the parameters the optimizer must hold.
        optimizer = _optimizer(model, stage)
        if resume_from is not None:
            ckpt.load_optimizer_and_rng(resume_from, optimizer)
        if start_step > plan.total:
            raise ValueError(f"stage {stage.name!r}: the checkpoint is at step {start_step}, past this config's "
                             f"{plan.total} steps; resume with at least as many")
        warmup = int(stage.warmup_ratio * plan.total)
        trainable = [p for p in model.parameters() if p.requires_grad]
        metrics_file = self.run_dir / "stages" / stage.name / "metrics.jsonl"
        if self.dist.is_main:
            _trim_metrics(metrics_file, start_step)
        bar = tqdm(total=plan.total, initial=start_step, desc=f"stage {stage.name}", unit="step",
                   disable=not self.show_progress)
        t_stage = time.perf_counter()
        for step in range(start_step, plan.total):
            t0 = time.perf_counter()
            factor = lr_at(step, plan.total, warmup, stage.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss_sum, n_tok, n_img, extra, dropped = 0.0, 0, 0, {}, 0
            # A step's micro-batches are read first: its loss is the mean over all their
            # supervised tokens on all ranks (chiasm.train.dist.token_weights).
            step_batches = [next(batches) for _ in range(stage.grad_accum)] if batches is not None else None
            weights = token_weights([supervised_tokens(b) for b in step_batches]) if step_batches else None
            for micro in range(stage.grad_accum):
                indices = plan.indices(step, micro, self.dist.rank)
                batch = step_batches[micro] if step_batches is not None else None
                if batches is not None and batch is None:
                    dropped += 1
                    continue  # every sample of this micro-batch was skipped (one process only)
                sync = micro == stage.grad_accum - 1
                with gradient_sync(wrapped, sync):
                    if prealign is not None:
                        loss_t, accuracy = prealign.loss(indices, wrapped, features)
                        total = loss_t
                        metric = prealign.metric
                        extra[metric] = extra.get(metric, 0.0) + accuracy / stage.grad_accum
                        n_img += len(indices)
                    else:
                        batch = batch.to(self.dist.device)
                        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                            loss_t = wrapped(batch.input_ids, batch.attention_mask, batch.labels,
                                             pixels=batch.pixels, features=batch.features,
                                             position_ids=batch.position_ids, audio=batch.audio).loss
                            loss_t = loss_t * weights[micro]
                            total = loss_t
                            if replay is not None and sync:
                                # The same rows on every rank, once per step: DDP's mean leaves
                                # their gradient as in one process; x grad_accum undoes the split.
                                k = stage.text_replay
                                rows = replay[[(step * k + j) % len(replay) for j in range(k)]]
                                text_loss = replay_loss(model.lm, rows.to(self.dist.device))
                                extra["replay_loss"] = float(text_loss.detach())
                                total = loss_t + stage.grad_accum * text_loss
                        n_tok += batch.n_tokens
                        n_img += len(batch.image_paths)
                    (total / stage.grad_accum).backward()
                loss_sum += float(loss_t.detach())  # the data's loss; replay's is logged apart
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            # The mean over micro-batches that had samples (NaN when none had: no step was learnt from);
            # token-weighted ones already count a dropped micro-batch as zero tokens.
            parts = stage.grad_accum if weights is not None else stage.grad_accum - dropped
            loss = all_reduce_mean(loss_sum / parts if dropped < stage.grad_accum else math.nan)
            record = {"stage": stage.name, "step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                      **({"tokens_per_s": n_tok * self.dist.world / dt} if prealign is None else {}),
                      "images_per_s": n_img * self.dist.world / dt,
                      "epoch": plan.epoch(step + 1), "time_s": time.perf_counter() - t_stage,
                      **({"skipped": loader.count(self.dist.device)} if loader is not None else {}),
                      **{k: all_reduce_mean(v) for k, v in extra.items()}}
            if loader is not None and self.dist.world == 1:
                skips.absorb(loader.skipped)  # one process: the cap is checked as soon as it is passed
            if self.dist.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if prealign is not None:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{record[prealign.metric]:.2f}")
            else:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1 == plan.total
            if done or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0):
                if loader is not None:  # the skips so far, beside the checkpoint a resumed run starts from
                    self.skipped[stage.name] = loader.gather_skipped()
                    skips.absorb(self.skipped[stage.name])  # every rank's, gathered: all ranks check alike
                self._checkpoint(optimizer, ckpt.TrainState(index, step + 1, done, self.dist.world))
            if self._steps_left is not None:
                self._steps_left -= 1
                if self._steps_left <= 0 and not done:
                    bar.close()
                    raise Interrupted(f"stopped after step {step + 1} of stage {stage.name}")
        bar.close()
        unwrap(wrapped)
        model.eval()

    def _replay_pool(self, stage: StageConfig, steps: int, seed: int, *, resuming: bool) -> torch.Tensor | None:
        """The LM's own samples for ``text_replay`` (see chiasm.train.replay), drawn before step 1.

        They are kept in the stage folder: a resumed stage must replay the text of the LM as
        it was at the stage's start, not as the checkpoint left it.
        """
        if not stage.text_replay:
            return None
        if stage.objective != "lm" or stage.lm.mode == "frozen":
            raise ValueError(f"stage {stage.name!r}: text_replay keeps a trained LM's language; "
                             "it needs objective 'lm' and an LM that trains")
        saved = self.run_dir / "stages" / stage.name / "replay.safetensors"
        if resuming and saved.is_file():
            return load_file(str(saved))["ids"]
        n = min(stage.text_replay * steps, stage.replay_pool)
        t0 = time.perf_counter()
        pool = sample_text(self.model.lm, self.model.tokenizer, max(n, stage.text_replay), stage.replay_tokens,
                           seed=seed)
        log.info("stage %s: %d replay texts of %d tokens sampled from the LM in %.0f s", stage.name,
                 len(pool), stage.replay_tokens, time.perf_counter() - t0)
        if self.dist.is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_file({"ids": pool.contiguous()}, str(saved))
        return pool

    def _checkpoint(self, optimizer: torch.optim.Optimizer, state: ckpt.TrainState) -> None:
        params, optimizer_state = ckpt.gather_state(self.model, self.trained, optimizer)
        if self.dist.is_main:
            ckpt.save_checkpoint(self.checkpoint_dir, params, self.trained, optimizer_state, state)
        barrier()

    def _plot(self) -> None:
        from chiasm.report.plots import plot_loss_curves

        plot_loss_curves(self.run_dir, self.run_dir / "loss.png")


def _trim_metrics(path: Path, keep_upto: int) -> None:
    """Keep only records up to the resumed step: a killed run may have logged past its checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    kept = [json.dumps(r) for r in read_records(path) if r.get("step", 0) <= keep_upto]
    tmp = path.with_name(path.name + ".tmp")  # renamed over the file: a kill now loses no line
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)
