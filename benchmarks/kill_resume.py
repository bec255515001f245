"""Kill ``chiasm train`` with SIGKILL at random instants, resume it, compare the final weights.

Builds a tiny two-stage run (tiny ViT -> MLP bridge -> tiny Llama, the tiny synthetic world;
align trains the bridge, instruct adds LoRA; a checkpoint after every step), trains it once
uninterrupted, then runs ``--trials`` times: start ``chiasm train --config`` in a subprocess,
SIGKILL it ``--kills`` times at random instants of its training (after a random number of
logged steps, plus a random fraction of one step's time measured on the uninterrupted run),
resuming with ``--resume`` after each kill, let the last ``--resume`` finish, and compare
every tensor of ``RUN/model/`` (bridge, encoder, LM adapter) with the uninterrupted run's:
bit-identical is expected on a CPU with one thread.
``CHIASM_CHECKPOINT_STEP_DELAY`` makes each step of a checkpoint save take ``--save-delay``
seconds, so many kills land inside a save; what each kill left behind (``checkpoint``,
``checkpoint.tmp``, ``checkpoint.old``) is recorded. Prints a summary and writes JSON.

    nice -n 19 python benchmarks/kill_resume.py --trials 20 --out kill_resume.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from chiasm.config import (
    BridgeConfig,
    EncoderConfig,
    LMConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    StageConfig,
    save_config,
)
from chiasm.synthetic.world import make_world
from chiasm.testing import make_tiny_lm

SIDE_FOLDERS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")


def write_config(root: Path, name: str, steps: int) -> Path:
    """A tiny align + LoRA instruct run config in ``root/NAME.json``, writing to ``root/NAME``."""
    lm = make_tiny_lm(root / "lm")
    world = make_world(root / "world", n_train=32, n_eval=4, image_size=64)
    frozen = PolicyConfig(mode="frozen")
    kw = {"encoder": frozen, "lr": 1e-2, "batch_size": 4, "max_steps": steps, "checkpoint_every": 1}
    cfg = RunConfig(
        model=ModelConfig(encoder=EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32}),
                          bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(lm))),
        stages=[StageConfig(name="align", data=str(world.align), lm=frozen, **kw),
                StageConfig(name="instruct", data=str(world.instruct),
                            lm=PolicyConfig(mode="lora", lora_r=4, lora_alpha=8), **kw)],
        output_dir=str(root / name), seed=3, precision="fp32")
    save_config(cfg, root / f"{name}.json")
    return root / f"{name}.json"


def _command(config: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "chiasm.cli", "train", "--config", str(config), "--no-eval",
            *(["--resume"] if resume else [])]


def _env(save_delay: float) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if save_delay:
        env["CHIASM_CHECKPOINT_STEP_DELAY"] = str(save_delay)
    return env


def _first_metrics(run: Path) -> bool:
    return any(p.stat().st_size for p in run.glob("stages/*/metrics.jsonl"))


def reference(config: Path, save_delay: float) -> tuple[float, float]:
    """Train uninterrupted; return (seconds to the first logged step, seconds to the end)."""
    run = config.with_suffix("")
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(config, False), env=_env(save_delay), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and _first_metrics(run):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"the uninterrupted run failed:\n{proc.stderr.read()[-3000:]}")
    return first or 0.0, time.perf_counter() - t0


def _left_behind(run: Path) -> dict[str, int | None]:
    """Each checkpoint folder present after a kill, with the step its state.json holds (None: incomplete)."""
    found = {}
    for name in SIDE_FOLDERS:
        folder = run / name
        if folder.exists():
            try:
                found[name] = json.loads((folder / "state.json").read_text())["step"]
            except (OSError, ValueError, KeyError):
                found[name] = None
    return found


def _steps_logged(run: Path) -> int:
    """Optimizer steps the run has logged so far, over all stages."""
    total = 0
    for path in run.glob("stages/*/metrics.jsonl"):
        with contextlib.suppress(OSError):
            total += path.read_bytes().count(b"\n")
    return total


def _kill_when(proc: subprocess.Popen, run: Path, after_steps: int, extra_s: float) -> float | None:
    """SIGKILL ``proc`` ``extra_s`` seconds after the run has logged ``after_steps`` steps.

    Returns the seconds since launch at which it was killed, or None if it ended first.
    """
    t0 = time.perf_counter()
    while _steps_logged(run) < after_steps:
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    try:
        proc.wait(timeout=extra_s)
        return None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return time.perf_counter() - t0


def killed_run(config: Path, kills: int, total_steps: int, step_s: float, rng: random.Random,
               save_delay: float) -> list[dict]:
    """Start the run, SIGKILL it ``kills`` times at random instants, resume until it finishes.

    Each instant is a random point of the training, not of the process start-up: after a
    random number of logged steps, a random fraction of one step's time (a step with its
    checkpoint save) later.
    """
    run = config.with_suffix("")
    events, resume = [], False
    for _ in range(kills):
        # A killed run may have logged a step past its last checkpoint: the resumed one logs it again.
        after = rng.randrange(min(_steps_logged(run), total_steps - 1), total_steps)
        extra = rng.uniform(0, step_s)
        proc = subprocess.Popen(_command(config, resume), env=_env(save_delay), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        at = _kill_when(proc, run, after, extra)
        if at is None:
            if proc.returncode:
                raise RuntimeError(f"{run}: a run failed with exit code {proc.returncode}")
            return events  # it finished before this instant
        events.append({"after_steps": after, "extra_s": round(extra, 3), "killed_after_s": round(at, 3),
                       "left": _left_behind(run)})
        resume = True
    proc = subprocess.run(_command(config, True), env=_env(save_delay), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{run}: the final resume failed:\n{proc.stderr[-3000:]}")
    return events


def same_weights(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Whether every safetensors file under two model folders holds bit-identical tensors."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    differ = []
    if files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return False, ["the folders hold different files"]
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        if x.keys() != y.keys():
            differ.append(f"{rel}: other tensor names")
            continue
        differ += [f"{rel}:{k}" for k in x if not torch.equal(x[k], y[k])]
    return not differ, differ


def run_trials(root: Path, trials: int, kills: int, seed: int = 0, save_delay: float = 0.05,
               steps: int = 6) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    ref_config = write_config(root, "reference", steps)
    first, total = reference(ref_config, save_delay)
    rng = random.Random(seed)
    results = []
    for t in range(trials):
        config = write_config(root, f"trial{t:02d}", steps)
        events = killed_run(config, kills, 2 * steps, (total - first) / (2 * steps), rng, save_delay)
        same, differ = same_weights(root / "reference" / "model", config.with_suffix("") / "model")
        inside = sum(1 for e in events if {"checkpoint.tmp", "checkpoint.old"} & set(e["left"]))
        results.append({"trial": t, "kills": events, "same_final_weights": same, "differing": differ[:5],
                        "kills_inside_a_save": inside})
        print(f"trial {t}: {len(events)} kill(s), {inside} inside a save, "
              f"final weights {'identical' if same else 'DIFFER'}", flush=True)
    delivered = [r for r in results if r["kills"]]
    summary = {"trials": trials, "kills_per_trial": kills, "steps_per_stage": steps, "save_step_delay_s": save_delay,
               "reference_s": round(total, 2), "first_step_s": round(first, 2),
               "kills_delivered": sum(len(r["kills"]) for r in results),
               "kills_inside_a_save": sum(r["kills_inside_a_save"] for r in results),
               "trials_killed": len(delivered),
               "trials_same_weights": sum(r["same_final_weights"] for r in results),
               "torch": torch.__version__, "results": results}
    same_killed = sum(r["same_final_weights"] for r in delivered)
    print(f"{same_killed} of {len(delivered)} killed and resumed runs gave the same final weights as the "
          f"uninterrupted run ({summary['kills_delivered']} kills, {summary['kills_inside_a_save']} inside a "
          f"checkpoint save; {trials - len(delivered)} runs ended before their kill instant)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--kills", type=int, default=1, help="SIGKILLs per trial before the last resume")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per stage")
    p.add_argument("--save-delay", type=float, default=0.05, help="seconds per step of a checkpoint save")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.root is None:
        import tempfile

        args.root = tempfile.mkdtemp(prefix="kill_resume_")
    summary = run_trials(Path(args.root), args.trials, args.kills, args.seed, args.save_delay, args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
