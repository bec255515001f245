"""Peak memory of one gated cross-attention block forward: per-image keys/values vs per-token copies.

``per_image`` is chiasm's block (keys and values projected once per image, a mask picks each
token's image); ``per_token`` is the plain form that copies each token's image memory
(``chiasm.testing.per_token_cross_attention``) and projects it. Each measurement runs in its
own process, which resets the kernel's peak-RSS counter (Linux ``/proc/self/clear_refs``)
after the block and its inputs exist, so the figure is what the forward itself adds.

    python benchmarks/xattn_memory.py                      # LM width 2048, B=2, L=512, M=64
    python benchmarks/xattn_memory.py --dim 64 --length 32 --latents 8 --heads 4   # smoke run

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("per_token", "per_image")
MODES = ("no_grad", "autograd")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this measurement needs Linux)")


def measure(args: argparse.Namespace) -> dict:
    """One forward in this process; returns the peak RSS it added and the largest tensor it made."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from chiasm.bridges.gated_xattn import GatedXAttnDense
    from chiasm.testing import per_token_cross_attention

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes = max(self.bytes, t.numel() * t.element_size())
            return out

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    block = GatedXAttnDense(args.dim, args.heads)
    b, n, m = args.batch, args.length, args.latents
    h = torch.randn(b, n, args.dim, requires_grad=args.mode == "autograd")
    memory = torch.randn(b, m, args.dim)  # one image per row
    image_of_token = torch.zeros(b, n, dtype=torch.long)
    image_of_token[:, : n // 8] = -1  # some text before the image
    if args.variant == "per_image":
        def run(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return block._attend(x, memory[:, None], index)
    else:
        image_of_token = torch.where(image_of_token >= 0, image_of_token + torch.arange(b)[:, None], -1)

        def run(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return per_token_cross_attention(block, x, memory, index)
    grad = torch.enable_grad() if args.mode == "autograd" else torch.no_grad()
    with grad:  # warm up on the last token alone: first-call set-up is not the forward's memory
        run(h[:, -1:], image_of_token[:, -1:])
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with grad, Largest() as largest:
        out = run(h, image_of_token)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    del out
    return {"variant": args.variant, "mode": args.mode, "peak_added_mib": (peak - before) / 1024,
            "largest_tensor_mib": largest.bytes / 2**20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--latents", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("xattn_memory.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: one measurement, printed as JSON
        print(json.dumps(measure(args)))
        return
    shape = {k: getattr(args, k) for k in ("dim", "heads", "batch", "length", "latents")}
    rows = []
    for mode in MODES:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, *[f"--{k}={v}" for k, v in shape.items()],
                   f"--threads={args.threads}", f"--variant={variant}", f"--mode={mode}"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
            if done.returncode:
                raise SystemExit(f"{variant}/{mode} failed:\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"gated xattn block, one forward: {shape}")
    print(f"{'mode':<9} {'variant':<10} {'peak added MiB':>15} {'largest tensor MiB':>19} {'seconds':>8}")
    for r in rows:
        print(f"{r['mode']:<9} {r['variant']:<10} {r['peak_added_mib']:>15.1f} {r['largest_tensor_mib']:>19.1f}"
              f" {r['seconds']:>8.2f}")
    args.out.write_text(json.dumps({"shape": shape, "threads": args.threads, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
