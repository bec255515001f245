"""Encoder features computed once per image and cached: in memory, or on disk, sharded and memory-mapped.

When a stage keeps the encoder frozen its output never changes, so recomputing it every
epoch would waste most of the time. The cache is keyed by the encoder's config and weights
fingerprint and by the image list (paths, sizes, modification times), so a stale cache is
never reused.

On disk (``cache_dir`` given) the cache is a folder ``features-<fingerprint>/`` of shards:
under DDP every rank encodes only its own contiguous block of the sorted image list and
writes it as one ``.npy`` file of fp16 rows, so encoding a large data set is split across the
ranks instead of repeated on each. Readers map every shard with ``numpy.load(mmap_mode="r")``:
a lookup copies only the rows it asks for, and the pages stay in the OS page cache shared by
all ranks on a node, instead of a full copy of the data set in every process's heap.
Every file is written under a temporary name and renamed into place, and a shard's ``.json``
is renamed last, so a run killed mid-write never leaves a shard that looks complete.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chiasm.data.images import load_image
from chiasm.data.sample import DataError
from chiasm.encoders.base import VisionEncoder

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
_WINDOW = max(mmap.PAGESIZE, 65536)  # Linux's default fault_around_bytes


def _fingerprint(encoder: VisionEncoder, paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    h.update(str(encoder.image_size).encode())
    # Options that change the features without changing the weights (feature layers, grid).
    h.update(f"{encoder.dim}|{encoder.grid()}|{getattr(encoder, 'cache_key', '')}".encode())
    # A cheap weights fingerprint: sums of a few tensors change whenever weights do.
    for name, t in list(encoder.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(f"{float(t.double().sum()):.10e}".encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Maps image path -> its ``(N, Dv)`` frozen-encoder features; this base keeps them in memory.

    ``bad`` maps the images that could not be decoded (under ``on_error = "skip"``) to the
    reason, so that a lookup of one raises a :class:`DataError` naming it instead of
    returning made-up features.
    """

    def __init__(self, index: dict[str, int], features: torch.Tensor, bad: Mapping[str, str] | None = None):
        self.index = index
        self.features = features
        self.bad = dict(bad or {})

    def rows(self, paths: Sequence[str]) -> list[int]:
        out = []
        for p in paths:
            p = str(p)
            if p in self.bad:
                raise DataError(self.bad[p])
            if p not in self.index:
                raise KeyError(f"image {p} is not in the feature cache (built for {len(self.index)} images)")
            out.append(self.index[p])
        return out

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        """Features of ``paths`` in that order, as float32 ``(len(paths), N, Dv)``."""
        rows = self.rows(paths)
        return self.features[rows].float() if rows else self.features[:0].float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: VisionEncoder, paths: Sequence[str], *, cache_dir: Path | None = None,
              batch_size: int = 32, show_progress: bool = True, rank: int = 0, world: int = 1,
              sync: Callable[[], None] | None = None, on_error: str = "raise",
              owners: Mapping[str, tuple[str | None, str | None]] | None = None) -> FeatureCache:
        """Compute (or reuse from ``cache_dir``) the features of every unique path.

        Without ``cache_dir`` the features are one in-memory tensor (fine for an evaluation
        set). With it, the result is a :class:`MemmapFeatureCache`; every rank must call this
        with the same paths, and ``sync`` (a barrier) separates writing from reading.
        ``owners`` maps a path to the (data file, sample id) named when it cannot be decoded.
        """
        unique = sorted({str(p) for p in paths})
        if cache_dir is not None:
            return MemmapFeatureCache.build(encoder, unique, Path(cache_dir), batch_size=batch_size,
                                            show_progress=show_progress, rank=rank, world=world, sync=sync,
                                            on_error=on_error, owners=owners)
        n, dim = len(unique), encoder.dim
        feats = torch.zeros((n, encoder.grid()[0] * encoder.grid()[1], dim), dtype=torch.float16)
        bad = _encode_rows(encoder, unique, 0, n, feats, batch_size, show_progress, on_error, owners)
        return cls({p: i for i, p in enumerate(unique)}, feats, bad)


def _encode_rows(encoder: VisionEncoder, unique: Sequence[str], lo: int, hi: int, out: torch.Tensor | np.ndarray,
                 batch_size: int, show_progress: bool, on_error: str,
                 owners: Mapping[str, tuple[str | None, str | None]] | None) -> dict[str, str]:
    """Encode ``unique[lo:hi]`` into ``out[0 : hi - lo]`` chunk by chunk; return the undecodable images."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    bad: dict[str, str] = {}
    try:
        for i in tqdm(range(lo, hi, batch_size), desc="encoding images", unit="batch", disable=not show_progress):
            chunk, pixels = [], []
            for j in range(i, min(i + batch_size, hi)):
                source, sample_id = (owners or {}).get(unique[j], (None, None))
                try:
                    pixels.append(encoder.preprocess(load_image(Path(unique[j]), sample_id=sample_id, source=source)))
                    chunk.append(j)
                except DataError as err:
                    if on_error != "skip":
                        raise
                    bad[unique[j]] = err.message
            if not chunk:
                continue
            feats = encoder(torch.stack(pixels).to(device)).to(torch.float16).cpu()
            for k, j in enumerate(chunk):
                out[j - lo] = feats[k] if isinstance(out, torch.Tensor) else feats[k].numpy()
    finally:
        encoder.train(was_training)
    if bad:
        log.warning("feature cache: %d undecodable image(s) left out (first: %s)", len(bad), next(iter(bad.values())))
    return bad


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class MemmapFeatureCache(FeatureCache):
    """Shards of fp16 rows on disk, memory-mapped lazily in each process (and each DataLoader worker).

    After copying the rows it was asked for, a lookup drops them from this process's mapping
    (``madvise(MADV_DONTNEED)``; the pages stay in the OS page cache). Without that, every
    row ever read would stay mapped and counted in the process's resident memory, which over
    an epoch of random reads grows to the whole file on every rank.
    """

    def __init__(self, folder: Path, paths: list[str], bounds: list[int], files: list[Path],
                 bad: Mapping[str, str] | None = None):
        super().__init__({p: i for i, p in enumerate(paths)}, torch.zeros(0), bad)
        self.folder, self.bounds, self.files = folder, bounds, files
        self._maps: list[tuple[mmap.mmap, np.ndarray, int]] | None = None

    def __getstate__(self) -> dict:
        # A worker process maps the files itself; pickling an open map would copy its data.
        return {**self.__dict__, "_maps": None}

    def _arrays(self) -> list[tuple[mmap.mmap, np.ndarray, int]]:
        if self._maps is None:
            self._maps = [_map_npy(f) for f in self.files]
        return self._maps

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        rows = self.rows(paths)
        maps = self._arrays()
        out = np.empty((len(rows), *maps[0][1].shape[1:]), dtype=np.float16)
        for k, r in enumerate(rows):
            s = bisect.bisect_right(self.bounds, r) - 1
            mm, arr, offset = maps[s]
            local = r - self.bounds[s]
            out[k] = arr[local]
            _release(mm, offset + local * arr[0].nbytes, arr[0].nbytes)
        return torch.from_numpy(out).float()

    @classmethod
    def build(cls, encoder: VisionEncoder, unique: list[str], cache_dir: Path, *, batch_size: int = 32,
              show_progress: bool = True, rank: int = 0, world: int = 1, sync: Callable[[], None] | None = None,
              on_error: str = "raise", owners: Mapping[str, tuple[str | None, str | None]] | None = None,
              ) -> MemmapFeatureCache:
        fp = _fingerprint(encoder, unique)
        folder = cache_dir / f"features-{fp}"
        shape = [encoder.grid()[0] * encoder.grid()[1], encoder.dim]
        existing = _read_index(folder, fp, unique)
        if existing is not None:
            return cls(folder, unique, *existing)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(unique)
        bounds = [s * n // world for s in range(world + 1)]
        args = (encoder, unique, folder, fp, shape, bounds, world, batch_size, on_error, owners)
        _write_shard(*args, rank, show_progress)
        if sync is not None:
            sync()
        # Ranks that do not share this folder's file system find the others' shards missing.
        bad: dict[str, str] = {}
        for s in range(world):
            meta = _shard_meta(folder, s, world, fp)
            if meta is None:
                log.warning("feature cache: shard %d of %d not found in %s; encoding it here", s, world, folder)
                _write_shard(*args, s, False)
                meta = _shard_meta(folder, s, world, fp)
            bad.update(meta["bad"])
        index = {"fingerprint": fp, "paths": unique, "world": world, "bounds": bounds, "shape": shape,
                 "dtype": "float16", "bad": bad}
        if rank == 0:
            _write_json(folder / INDEX_FILE, index)
        return cls(folder, unique, bounds[:-1], [folder / _shard_name(s, world) for s in range(world)], bad)


def _shard_name(s: int, world: int) -> str:
    return f"shard-{s:05d}-of-{world:05d}.npy"


def _shard_meta(folder: Path, s: int, world: int, fp: str) -> dict | None:
    meta = folder / (_shard_name(s, world)[:-4] + ".json")
    if not meta.is_file() or not (folder / _shard_name(s, world)).is_file():
        return None
    data = json.loads(meta.read_text())
    return data if data.get("fingerprint") == fp else None


def _write_shard(encoder: VisionEncoder, unique: list[str], folder: Path, fp: str, shape: list[int],
                 bounds: list[int], world: int, batch_size: int, on_error: str,
                 owners: Mapping[str, tuple[str | None, str | None]] | None, s: int, show_progress: bool) -> None:
    """Encode shard ``s`` into a temporary ``.npy``, rename it, then its ``.json`` (the completion mark)."""
    if _shard_meta(folder, s, world, fp) is not None:
        return
    lo, hi = bounds[s], bounds[s + 1]
    final = folder / _shard_name(s, world)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(hi - lo, *shape))
    try:
        bad = _encode_rows(encoder, unique, lo, hi, out, batch_size, show_progress, on_error, owners)
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)
        raise
    del out
    os.replace(tmp, final)
    _write_json(final.with_suffix(".json"), {"fingerprint": fp, "lo": lo, "hi": hi, "bad": bad})


def _read_index(folder: Path, fp: str, unique: list[str]) -> tuple[list[int], list[Path], dict[str, str]] | None:
    """The shards of a complete earlier build (any world size) with this fingerprint, or None."""
    file = folder / INDEX_FILE
    if not file.is_file():
        return None
    index = json.loads(file.read_text())
    if index.get("fingerprint") != fp or index.get("paths") != unique:
        return None
    world = index["world"]
    if any(_shard_meta(folder, s, world, fp) is None for s in range(world)):
        return None
    return index["bounds"][:-1], [folder / _shard_name(s, world) for s in range(world)], index["bad"]


def _map_npy(file: Path) -> tuple[mmap.mmap, np.ndarray, int]:
    """A read-only map of a ``.npy`` file, the array view on it and the data's byte offset.

    ``np.load(mmap_mode="r")`` would hide the map, and the map is needed to release pages.
    """
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if fortran:
            raise ValueError(f"{file}: feature shards are written C-ordered; this one is not")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, np.ndarray(shape, dtype=dtype, buffer=mm, offset=offset), offset


def _release(mm: mmap.mmap, start: int, size: int) -> None:
    """Unmap the pages of bytes ``[start, start + size)`` from this process (Linux); a new read refaults them."""
    if not hasattr(mmap, "MADV_DONTNEED") or size == 0:
        return
    # Widened to Linux's fault-around window, which maps cached neighbours of a faulting page too.
    lo = start // _WINDOW * _WINDOW
    hi = min(len(mm), -(-(start + size) // _WINDOW) * _WINDOW)
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
