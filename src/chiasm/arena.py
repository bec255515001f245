"""``chiasm arena``: every bridge trained on the same data, steps, seed and base parts.

It answers "which bridge, for which budget?" with measurements: per bridge, VQA accuracy
(overall and per type), blank-image accuracy, visual tokens per image, bridge and trainable
parameters, training tokens/s and step time, peak memory, and language retention. Results
go to ``arena.json``, ``arena.md`` and two plots (accuracy vs. visual tokens, accuracy vs.
training time).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch
from matplotlib.figure import Figure

from chiasm.config import BridgeConfig, EvalConfig, ModelConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.report.plots import read_metrics, save_figure
from chiasm.synthetic.world import WorldFiles

# Options that fit each bridge to a 4 x 4 grid (EfficientNet-Lite0 at 128 px, or tiny-vit at 64 px).
DEFAULT_BRIDGES: dict[str, dict] = {
    "linear": {},
    "mlp": {},
    "pixel_shuffle": {"factor": 2},
    "pooling": {"kernel": 2},
    "c_abstractor": {"num_queries": 4, "depth": 1},
    "resampler": {"num_queries": 4},
    "perceiver": {"num_queries": 4, "depth": 2},
    "qformer": {"num_queries": 4, "depth": 2},
    "gated_xattn": {"num_latents": 4, "every": 4},
    "visual_expert": {},
}


# The arena's parts are Llama-family (SmolLM2, or the tiny Llama of --quick); its README table
# was measured with LoRA on the attention projections, so the recipe names them rather than
# taking the all-linear default.
ARENA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class ArenaBudget:
    """What every bridge gets: the same steps, batch and learning rates.

    The default is sized so that all ten bridges, evaluation included, run in well under an
    hour on a 2-core CPU with the demo's real parts; the README records how long they took.
    """

    align_steps: int = 18
    instruct_steps: int = 36
    batch_size: int = 8
    align_lr: float = 2e-3
    instruct_lr: float = 1e-3
    lora_lr: float = 3e-4
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=32, max_new_tokens=6,
                                                                scorer="synthetic"))


class PeakMemory:
    """Peak device memory during a block: CUDA's allocator peak, or sampled process RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        proc = psutil.Process()
        self._base = proc.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss - self._base)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def arena_recipe(model: ModelConfig, world: WorldFiles, out: Path, budget: ArenaBudget, seed: int) -> RunConfig:
    """One bridge's run; every bridge reads the same frozen encoder's features from one cache."""
    frozen = PolicyConfig(mode="frozen")
    return RunConfig(
        model=model, output_dir=str(out), seed=seed, feature_cache=str(out.parent / "cache"),
        stages=[
            StageConfig(name="align", data=str(world.align), encoder=frozen, lm=frozen, max_steps=budget.align_steps,
                        batch_size=budget.batch_size, lr=budget.align_lr),
            StageConfig(name="instruct", data=str(world.instruct), encoder=frozen,
                        lm=PolicyConfig(mode="lora", lora_r=8, lora_alpha=16, lr=budget.lora_lr,
                                        lora_targets=ARENA_LORA_TARGETS),
                        max_steps=budget.instruct_steps, batch_size=budget.batch_size, lr=budget.instruct_lr)],
        eval=replace(budget.eval, data=str(world.eval)))


def run_one(name: str, options: dict, base: ModelConfig, world: WorldFiles, out: Path, budget: ArenaBudget,
            seed: int = 0, show_progress: bool = True, base_lm: dict | None = None) -> dict:
    """Train and evaluate one bridge; returns its row of the arena table.

    ``base_lm`` holds the base LM's retention results (perplexity, greedy answers): every
    bridge shares the same base LM, so they are computed for the first bridge only and
    filled in here for the next ones.
    """
    from chiasm.eval.evaluate import evaluate
    from chiasm.train.trainer import Trainer

    model_cfg = replace(base, bridge=BridgeConfig(name=name, options=dict(options)))
    cfg = arena_recipe(model_cfg, world, out / name, budget, seed)
    torch.manual_seed(seed)
    trainer = Trainer(cfg, show_progress=show_progress)
    t0 = time.perf_counter()
    with PeakMemory(trainer.dist.device) as mem:
        model = trainer.run()
    train_s = time.perf_counter() - t0
    results = evaluate(model, cfg.eval, out_dir=out / name, base=base_lm or None)
    if base_lm is not None and not base_lm:
        base_lm.update(results["retention"]["base"])
    steps = [r for s in ("align", "instruct") for r in read_metrics(out / name / "stages" / s / "metrics.jsonl")]
    step_times = [b["time_s"] - a["time_s"] for a, b in itertools.pairwise(steps) if b["step"] > a["step"]]
    counts = trainer.stage_counts["instruct"]
    return {
        "bridge": name, "options": options, "visual_tokens": model.tokens_per_image,
        "vqa": results["vqa"]["overall"], "per_type": results["vqa"]["per_type"],
        "blank": results["blank"]["overall"], "chance": results["chance"]["overall"],
        "bridge_params": sum(p.numel() for p in model.bridge.parameters()),
        "trainable_params": sum(c["trainable"] for c in counts.values()),
        "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / max(1, len(steps)),
        "step_s": sum(step_times) / max(1, len(step_times)),
        "train_s": train_s, "peak_memory_mb": mem.peak_bytes / 2**20,
        "ppl_ratio": results["retention"]["ppl_ratio"], "unchanged_share": results["retention"]["unchanged_share"],
    }


def write_arena(rows: list[dict], out: Path) -> None:
    """arena.json, arena.md and the two comparison plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "arena.json").write_text(json.dumps(rows, indent=2) + "\n")
    types = sorted({t for r in rows for t in r["per_type"]})
    head = ["bridge", "tokens", "VQA", *types, "blank", "bridge params", "trainable", "tok/s", "step s",
            "train s", "peak MB", "ppl ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bridge"], str(r["visual_tokens"]), f"{r['vqa']:.1%}",
                 *(f"{r['per_type'].get(t, float('nan')):.1%}" for t in types), f"{r['blank']:.1%}",
                 f"{r['bridge_params']:,}", f"{r['trainable_params']:,}", f"{r['tokens_per_s']:.0f}",
                 f"{r['step_s']:.2f}", f"{r['train_s']:.0f}", f"{r['peak_memory_mb']:.0f}", f"{r['ppl_ratio']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "arena.md").write_text("# chiasm arena\n\n" + "\n".join(lines) + "\n")
    for key, label, file in (("visual_tokens", "visual tokens per image", "accuracy_vs_tokens.png"),
                             ("train_s", "training time (s)", "accuracy_vs_time.png")):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        placed: dict[tuple[float, float], int] = {}
        for r in rows:
            point = (r[key], r["vqa"])
            ax.scatter(*point)
            # bridges on the same point get their names stacked instead of printed on top of each other
            nth = placed[point] = placed.get(point, -1) + 1
            ax.annotate(r["bridge"], point, fontsize=8, xytext=(3, 3 - 9 * nth), textcoords="offset points")
        chance = max((r.get("chance", 0.0) for r in rows), default=0.0)
        if chance:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="best constant answer")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("VQA accuracy")
        ax.grid(alpha=0.3)
        save_figure(fig, out / file)


def run_arena(out: Path, base: ModelConfig, world: WorldFiles, budget: ArenaBudget,
              bridges: dict[str, dict] | None = None, show_progress: bool = True) -> list[dict]:
    base_lm: dict = {}
    rows = [run_one(name, opts, base, world, out, budget, show_progress=show_progress, base_lm=base_lm)
            for name, opts in (bridges or DEFAULT_BRIDGES).items()]
    write_arena(rows, out)
    return rows


def quick_setup(out: Path) -> tuple[ModelConfig, WorldFiles, ArenaBudget]:
    """Tiny from-scratch parts and a few steps: every bridge end to end in seconds (used by the tests)."""
    from chiasm.config import EncoderConfig, LMConfig
    from chiasm.synthetic.world import make_world
    from chiasm.testing import make_tiny_lm

    lm = make_tiny_lm(out / "tiny-lm")
    world = make_world(out / "world", n_train=32, n_eval=4, image_size=64)
    base = ModelConfig(encoder=EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32}),
                       lm=LMConfig(source=str(lm)))
    budget = ArenaBudget(align_steps=2, instruct_steps=2, batch_size=4,
                         eval=EvalConfig(batch_size=8, max_new_tokens=4, retention_tokens=600, retention_prompts=2,
                                         scorer="synthetic"))
    return base, world, budget


def real_setup(out: Path) -> tuple[ModelConfig, WorldFiles, ArenaBudget]:
    """The demo's real parts and world (EfficientNet-Lite0 at 128 px, SmolLM2-135M-Instruct)."""
    from chiasm.demo import DemoSize, demo_config, demo_world

    size = DemoSize()
    world = demo_world(out / "world", size)
    demo = demo_config(out, world, size)
    return arena_model(demo.model), world, ArenaBudget()


def arena_model(demo: ModelConfig) -> ModelConfig:
    """The demo's parts on the grid and layout that every bridge can take.

    The demo pools its features to one per quadrant and lays tokens out by quadrant, which
    suits its upsampling MLP only: a resampler's tokens have no place in the image, and pixel
    shuffle on a 2 x 2 grid leaves one token. The arena compares bridges on the encoder's own
    4 x 4 grid in raster order (:data:`DEFAULT_BRIDGES` fit it).
    """
    options = {k: v for k, v in demo.encoder.options.items() if k != "grid"}
    return replace(demo, encoder=replace(demo.encoder, options=options), image_layout="raster")
