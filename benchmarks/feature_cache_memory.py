"""Peak resident memory of the frozen-encoder feature cache: memory-mapped shards vs one in-memory tensor.

Writes a cache of ``--n`` images x ``--tokens`` x ``--dim`` fp16 features (default 100,000 x
196 x 768, a ViT-B/16 at 224 px: about 29 GB) in the on-disk layout ``chiasm.features``
reads, then reads ``--batches`` random batches of ``--batch`` images in a fresh process per
mode, so each peak (``VmHWM``, the resident high-water mark of the process's own memory map;
``ru_maxrss`` would carry over the parent's peak from writing the file) is that mode's own:

- ``memmap``: :class:`MemmapFeatureCache` as training uses it (rows released after each read);
- ``memmap-keep``: the same file through a plain ``numpy.load(mmap_mode="r")`` that keeps
  every page it read mapped (what the release avoids);
- ``in-memory``: the previous approach, the whole tensor loaded into the process, run on
  ``--in-memory-n`` rows (a size that fits in RAM) and extrapolated linearly to ``--n``.

Workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so that each batch's
freed buffers go back to the system and the peaks measure the data, not the allocator's
cache of freed blocks (which grows by a few batches' worth and then plateaus; pass
``--glibc-default`` to see it). ``--sparse`` writes no data (a sparse file of the full
size, reads return zeros): the memory measured is the same, only the disk and its speed are
left out. Prints a table and writes JSON.

    python benchmarks/feature_cache_memory.py --n 20000 --in-memory-n 5000 --out fc.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def write_cache(folder: Path, n: int, tokens: int, dim: int, sparse: bool) -> Path:
    """A one-shard cache folder in the layout ``MemmapFeatureCache`` reads; row i holds the value i % 2048."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "shard-00000-of-00001.npy"
    arr = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=(n, tokens, dim))
    if not sparse:
        chunk = 256
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            arr[lo:hi] = (np.arange(lo, hi) % 2048).astype(np.float16)[:, None, None]
        arr.flush()
    del arr
    fd = os.open(file, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start the reads from a cold page cache
    os.close(fd)
    return file


def measure(mode: str, file: Path, n: int, batch: int, batches: int, seed: int) -> dict:
    """Run in a fresh process: open the cache in ``mode`` and read random batches."""
    import torch

    from chiasm.features import FeatureCache, MemmapFeatureCache

    paths = [f"img{i}" for i in range(n)]
    fd = os.open(file, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # every mode starts from a cold page cache
    os.close(fd)
    base_rss = _status_kb("VmRSS")  # after every import: what follows is the cache's own
    t0 = time.perf_counter()
    if mode == "memmap":
        cache = MemmapFeatureCache(file.parent, paths, [0], [file])
    elif mode == "memmap-keep":
        cache = FeatureCache({p: i for i, p in enumerate(paths)}, torch.from_numpy(np.load(file, mmap_mode="r")))
    elif mode == "in-memory":
        with open(file, "rb") as f:  # read() straight into the process, as loading a tensor file does
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = header(f)[0]
            data = np.fromfile(f, dtype=np.float16, count=n * shape[1] * shape[2]).reshape(n, *shape[1:])
        cache = FeatureCache({p: i for i, p in enumerate(paths)}, torch.from_numpy(data))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    checked = 0
    for _ in range(batches):
        rows = rng.integers(0, n, batch)
        feats = cache.lookup([paths[r] for r in rows])
        if checked < 4 and not Path(str(file) + ".sparse").exists():
            assert float(feats[0, 0, 0]) == float(np.float16(rows[0] % 2048)), "wrong row read"
            checked += 1
    read_s = time.perf_counter() - t0
    return {"mode": mode, "rows": n, "baseline_rss_mb": base_rss / 1024,
            "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "end_rss_mb": _status_kb("VmRSS") / 1024, "end_rss_file_mb": _status_kb("RssFile") / 1024,
            "end_rss_anon_mb": _status_kb("RssAnon") / 1024, "open_s": open_s,
            "ms_per_batch": 1000 * read_s / batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="images in the cache")
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--in-memory-n", type=int, default=5_000, help="rows for the in-memory comparison")
    ap.add_argument("--sparse", action="store_true", help="write a sparse file (no data) of the full size")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the cache (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=Path("feature_cache_memory.json"))
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds alone")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, file = args.worker
        rows = args.in_memory_n if mode == "in-memory" else args.n
        print(json.dumps(measure(mode, Path(file), rows, args.batch, args.batches, seed=0)))
        return
    row_bytes = args.tokens * args.dim * 2
    need = args.n * row_bytes
    root = args.dir or Path(tempfile.mkdtemp(prefix="chiasm-fc-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if not args.sparse and need > 0.9 * free:
        sys.exit(f"{need / 2**30:.1f} GiB of features do not fit the {free / 2**30:.1f} GiB free in {root}: "
                 "pass a smaller --n, or --sparse")
    folder = root / "features-bench"
    t0 = time.perf_counter()
    file = folder / "shard-00000-of-00001.npy"
    if args.dir is not None and file.is_file() and np.load(file, mmap_mode="r").shape == (args.n, args.tokens,
                                                                                          args.dim):
        write_s = None  # reused from an earlier run in --dir
    else:
        file = write_cache(folder, args.n, args.tokens, args.dim, args.sparse)
        write_s = time.perf_counter() - t0
    if args.sparse:
        Path(str(file) + ".sparse").touch()
    results = []
    env = {**os.environ} if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    try:
        for mode in ("memmap", "memmap-keep", "in-memory"):
            cmd = [sys.executable, __file__, "--worker", mode, str(file), "--n", str(args.n), "--batch",
                   str(args.batch), "--batches", str(args.batches), "--in-memory-n", str(args.in_memory_n)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    mem = next(r for r in results if r["mode"] == "in-memory")
    per_row_mb = (mem["peak_rss_mb"] - mem["baseline_rss_mb"]) / mem["rows"]
    report = {"n": args.n, "tokens": args.tokens, "dim": args.dim, "cache_gb": need / 1e9, "sparse": args.sparse,
              "batch": args.batch, "batches": args.batches, "write_s": write_s,
              "malloc_mmap_threshold": None if args.glibc_default else 2**20, "results": results,
              "in_memory_extrapolated_peak_mb_at_n": mem["baseline_rss_mb"] + per_row_mb * args.n}
    print(f"cache: {args.n} images x {args.tokens} x {args.dim} fp16 = {need / 1e9:.1f} GB "
          f"({'sparse' if args.sparse else 'reused' if write_s is None else f'written in {write_s:.0f} s'}); "
          f"{args.batches} random batches of "
          f"{args.batch}")
    print(f"{'mode':<12} {'rows':>8} {'base MB':>8} {'peak MB':>8} {'end MB':>8} {'file MB':>8} {'anon MB':>8} "
          f"{'ms/batch':>9}")
    for r in results:
        print(f"{r['mode']:<12} {r['rows']:>8} {r['baseline_rss_mb']:>8.0f} {r['peak_rss_mb']:>8.0f} "
              f"{r['end_rss_mb']:>8.0f} {r['end_rss_file_mb']:>8.0f} {r['end_rss_anon_mb']:>8.0f} "
              f"{r['ms_per_batch']:>9.2f}")
    print(f"in-memory extrapolated to {args.n} rows: peak {report['in_memory_extrapolated_peak_mb_at_n']:.0f} MB")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
