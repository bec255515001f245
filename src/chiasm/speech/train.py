"""``chiasm speech train``: Whisper fine-tuning with chiasm's stage engine pieces.

The schedule (:func:`chiasm.train.trainer.lr_at`), the batch plan (:class:`StagePlan`: batches
a pure function of seed, stage and step, so a checkpoint's data position is its step), the
crash-safe checkpoint layout and its resume (:mod:`chiasm.train.checkpoint`), the precision
choice, DDP set-up and the run folder's metrics and loss plot are the VLM trainer's own; only
the forward pass (audio features -> Whisper) is the speech model's.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chiasm.config import save_config
from chiasm.lm.layers import unwrap_peft
from chiasm.speech.augment import add_noise, spec_augment
from chiasm.speech.batches import collate
from chiasm.speech.config import SpeechRunConfig, SpeechStage
from chiasm.speech.data_sets import load_set
from chiasm.speech.loader import Whisper, load_whisper, save_whisper
from chiasm.speech.manifest import SpeechSample
from chiasm.speech.policy import apply_mode, encoder_trains, plain_model
from chiasm.speech.transcribe import EncoderOutputs
from chiasm.train import checkpoint as ckpt
from chiasm.train.dist import all_reduce_mean, barrier, init_distributed
from chiasm.train.trainer import StagePlan, _trim_metrics, lr_at, use_bf16

# A frozen encoder's outputs kept for later epochs, as bf16: 1,500 frames x 512 (base) is 1.5 MB a
# clip, so 4 GiB keeps about 2,700 clips; past that, clips are encoded again at every step.
TRAIN_CACHE_BYTES = 4 << 30

log = logging.getLogger(__name__)


class SpeechTrainer:
    """Trains a Whisper through the stages of a :class:`SpeechRunConfig`."""

    def __init__(self, cfg: SpeechRunConfig, whisper: Whisper | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.dist = init_distributed(cfg.backend)
        self.run_dir = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.whisper = whisper or load_whisper(cfg.model)
        self.whisper.model.to(self.dist.device)
        self.model: torch.nn.Module = self.whisper.model
        self.bf16 = use_bf16(cfg.precision, self.dist.device)
        self.show_progress = show_progress and self.dist.is_main
        self.samples: list[SpeechSample] = []
        self.skipped: list[tuple[str, str]] = []
        for data in cfg.train:
            s = load_set(data, on_error=cfg.on_error)
            self.samples += s.samples
            self.skipped += s.skipped
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "stages.json").write_text(json.dumps([s.name for s in cfg.stages]))
            if self.skipped:
                (self.run_dir / "skipped.jsonl").write_text(
                    "".join(json.dumps({"id": i, "reason": r}) + "\n" for i, r in self.skipped))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def run(self, *, resume: bool = False, stop_after_steps: int | None = None) -> Whisper:
        """Train every stage (continuing from ``RUN/checkpoint`` with ``resume``); the model with LoRA merged."""
        state = None
        if resume:
            if self.dist.is_main:
                ckpt.recover(self.checkpoint_dir)
            barrier()
            state = ckpt.read_state(self.checkpoint_dir)
        elif self.dist.is_main:
            ckpt.remove_all(self.checkpoint_dir)
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.json")
        self._steps_left = stop_after_steps
        for i, stage in enumerate(self.cfg.stages):
            self.model = apply_mode(self.model, stage)
            if state is not None and (i < state.stage_index or (i == state.stage_index and state.stage_done)):
                if i == state.stage_index:
                    ckpt.load_model_state(self.checkpoint_dir, self.model)
                    ckpt.load_rng(self.checkpoint_dir)
                continue
            start = 0
            if state is not None and i == state.stage_index:
                ckpt.load_model_state(self.checkpoint_dir, self.model)
                start = state.step
                log.info("resuming stage %s at step %d", stage.name, start)
            self._train_stage(i, stage, start, resume_from=self.checkpoint_dir if start else None)
            state = None
        self.model.eval()
        if self.dist.is_main:
            from chiasm.report.plots import plot_loss_curves

            plot_loss_curves(self.run_dir, self.run_dir / "loss.png")
        self.whisper.model = plain_model(self.model)
        self.model = self.whisper.model
        return self.whisper

    def save(self, out: Path) -> Path:
        return save_whisper(self.whisper, out)

    # --- one stage --------------------------------------------------------------------

    def _audio(self, idx: int, stage: SpeechStage, step: int) -> np.ndarray:
        audio = self.samples[idx].load()
        if stage.noise_snr_db is not None:
            rng = np.random.default_rng([self.cfg.seed, idx, step])
            audio = add_noise(audio, stage.noise_snr_db, rng)
        return audio

    def _loss(self, indices: list[int], stage: SpeechStage, step: int, cache: EncoderOutputs | None,
              gen: torch.Generator) -> tuple[torch.Tensor, int]:
        texts = [(self.samples[i].text, self.samples[i].language, str(self.samples[i].audio_path)) for i in indices]
        audios = [self._audio(i, stage, step) for i in indices]
        batch = collate(self.whisper, audios, texts, self.cfg.task, with_features=cache is None)
        kwargs = {"decoder_input_ids": batch.decoder_input_ids.to(self.dist.device),
                  "labels": batch.labels.to(self.dist.device)}
        if cache is not None:  # a frozen encoder's outputs, computed once per clip (the audio is as loaded)
            kwargs["encoder_outputs"] = (cache(self.whisper, audios, unwrap_peft(self.model).model.encoder).float(),)
        else:
            feats = batch.features
            if stage.spec_augment:
                feats = spec_augment(feats, batch.speech_frames, gen)
            kwargs["input_features"] = feats.to(self.dist.device)
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.wrapped(**kwargs)
        return out.loss, batch.n_tokens

    def _train_stage(self, index: int, stage: SpeechStage, start: int, resume_from: Path | None) -> None:
        seed = self.cfg.seed * 1000 + index
        plan = StagePlan(len(self.samples), stage, self.dist.world, seed)
        cacheable = not encoder_trains(self.model) and not stage.spec_augment and stage.noise_snr_db is None
        cache = EncoderOutputs(TRAIN_CACHE_BYTES, keep_dtype=torch.bfloat16, bf16=self.bf16) if cacheable else None
        self.model.train()
        self.wrapped = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.wrapped = DDP(self.model, device_ids=ids, find_unused_parameters=cache is None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "lr": stage.lr, "base_lr": stage.lr,
                                        "weight_decay": stage.weight_decay},
                                       {"params": no_decay, "lr": stage.lr, "base_lr": stage.lr, "weight_decay": 0.0}])
        if resume_from is not None:
            ckpt.load_optimizer_and_rng(resume_from, optimizer)
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        metrics = self.run_dir / "stages" / stage.name / "metrics.jsonl"
        if self.dist.is_main:
            _trim_metrics(metrics, start)
        warmup = int(stage.warmup_ratio * plan.total)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(total=plan.total, initial=start, desc=f"stage {stage.name}", unit="step",
                   disable=not self.show_progress)
        t_stage = time.perf_counter()
        for step in range(start, plan.total):
            t0 = time.perf_counter()
            gen.manual_seed(seed * 7919 + step)  # masks a pure function of the step: a resume draws the same
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_at(step, plan.total, warmup, stage.min_lr_ratio)
            loss_sum, n_tok, n_clips = 0.0, 0, 0
            for micro in range(stage.grad_accum):
                indices = plan.indices(step, micro, self.dist.rank)
                loss, tokens = self._loss(indices, stage, step, cache, gen)
                (loss / stage.grad_accum).backward()
                loss_sum += float(loss.detach()) / stage.grad_accum
                n_tok += tokens
                n_clips += len(indices)
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            record = {"stage": stage.name, "step": step + 1, "loss": all_reduce_mean(loss_sum),
                      "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": n_tok * self.dist.world / dt,
                      "clips_per_s": n_clips * self.dist.world / dt, "epoch": plan.epoch(step + 1),
                      "time_s": time.perf_counter() - t_stage}
            if self.dist.is_main:
                with metrics.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            bar.update(1)
            done = step + 1 == plan.total
            if done or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0):
                params_sd, opt_sd = ckpt.gather_state(self.model, trained, optimizer)
                if self.dist.is_main:
                    ckpt.save_checkpoint(self.checkpoint_dir, params_sd, trained, opt_sd,
                                         ckpt.TrainState(index, step + 1, done, self.dist.world))
                barrier()
            if self._steps_left is not None:
                self._steps_left -= 1
                if self._steps_left <= 0 and not done:
                    bar.close()
                    from chiasm.train.trainer import Interrupted

                    raise Interrupted(f"stopped after step {step + 1} of stage {stage.name}")
        bar.close()
        self.model.eval()
