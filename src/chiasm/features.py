"""Encoder features computed once per image and cached: in memory, or on disk, sharded and memory-mapped.

When a stage keeps the encoder frozen its output never changes, so recomputing it every
epoch would waste most of the time. The cache is keyed by the encoder's config and weights
fingerprint and by the image list (paths, sizes, modification times), so a stale cache is
never reused.

On disk (``cache_dir`` given) the cache is a folder ``features-<fingerprint>/`` of shards:
under DDP every rank encodes only its own contiguous block of the sorted image list and
writes it as one ``.npy`` file of fp16 rows, so encoding is split across the ranks rather
than done by rank 0 while the others wait. After a barrier every rank memory-maps every
shard (a rank that cannot see a shard, on a file system that is not shared, encodes it
itself): a lookup copies only the rows it asks for, and the pages stay in the OS page cache
shared by all ranks on a node, instead of a full copy of the data set in every process.
Every file is written under a temporary name and renamed into place, and a shard's ``.json``
is renamed last, so a run killed mid-write never leaves a shard that looks complete.

A tiled image (:mod:`chiasm.highres.tiling`) is several encoder inputs: its global view and
tiles. Its views are rows ``offsets[i]:offsets[i + 1]`` of the cache, in sequence order, and a
lookup returns every view of every path asked for, as the pixel path would encode them. How
many views an image has follows from its size alone (read from the file header before any
encoding), so the rows of every shard are known before a pixel is decoded.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from chiasm.data.images import load_image
from chiasm.data.sample import DataError
from chiasm.encoders.base import VisionEncoder
from chiasm.encoders.preprocessing import ImagePreprocessing
from chiasm.errors import ModelFolderError

Preprocess = Callable[[Image.Image], torch.Tensor]
# path -> how many encoder inputs (views) its image becomes; raises DataError for an unreadable one
ViewCount = Callable[[str], int]

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
_WINDOW = max(mmap.PAGESIZE, 65536)  # Linux's default fault_around_bytes


def _fingerprint(encoder: VisionEncoder, paths: Sequence[str], preprocess: Preprocess,
                 max_pixels: int | None = None, views_key: str = "") -> str:
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    if views_key:  # how images are cut into views (a tiling config) changes every row
        h.update(f"views={views_key}".encode())
    if max_pixels is not None:  # which images are refused as too large depends on it
        h.update(f"max_pixels={max_pixels}".encode())
    # The image -> pixels steps (size, crop, normalisation, padding) change the features too.
    if isinstance(preprocess, ImagePreprocessing):
        h.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode())
    h.update(str(encoder.image_size).encode())
    # Options that change the features without changing the weights (feature layers, grid).
    h.update(f"{encoder.dim}|{encoder.grid()}|{getattr(encoder, 'cache_key', '')}".encode())
    # A cheap weights fingerprint over every tensor (a last_n policy changes only the last blocks).
    for name, t in encoder.state_dict().items():
        t = t.detach().double()
        h.update(name.encode())
        h.update(f"{float(t.sum()):.12e}|{float((t * t).sum()):.12e}".encode())
    for p in paths:
        try:
            st = Path(p).stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:  # missing or unreachable: refused when encoding, and a later fix changes the key
            h.update(f"{p}|missing".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Maps image path -> its views' ``(V, N, Dv)`` frozen-encoder features; this base keeps them in memory.

    ``offsets`` (one more than there are paths) says which rows hold each path's views; None:
    one view per image, row ``index[path]``. ``bad`` maps the images that could not be decoded
    (under ``on_error = "skip"``) to the reason, so that a lookup of one raises a
    :class:`DataError` naming it instead of returning made-up features.
    """

    def __init__(self, index: dict[str, int], features: torch.Tensor, bad: Mapping[str, str] | None = None,
                 offsets: Sequence[int] | None = None):
        self.index = index
        self.features = features
        self.bad = dict(bad or {})
        self.offsets = list(offsets) if offsets is not None else None

    def rows(self, paths: Sequence[str]) -> list[int]:
        """The cache rows of ``paths``' views, path after path, each image's views in sequence order."""
        out = []
        for p in paths:
            p = str(p)
            if p in self.bad:
                raise DataError(self.bad[p])
            if p not in self.index:
                raise KeyError(f"image {p} is not in the feature cache (built for {len(self.index)} images)")
            i = self.index[p]
            out.extend(range(self.offsets[i], self.offsets[i + 1]) if self.offsets is not None else (i,))
        return out

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        """Features of ``paths``' views in that order, as float32 ``(total views, N, Dv)``."""
        rows = self.rows(paths)
        return self.features[rows].float() if rows else self.features[:0].float()

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: VisionEncoder, paths: Sequence[str], *, cache_dir: Path | None = None,
              batch_size: int = 32, show_progress: bool = True, rank: int = 0, world: int = 1,
              sync: Callable[[], None] | None = None, on_error: str = "raise",
              owners: Mapping[str, tuple[str | None, str | None]] | None = None,
              preprocess: Preprocess | None = None, max_pixels: int | None = None,
              views: tuple[ViewCount, str] | None = None) -> FeatureCache:
        """Compute (or reuse from ``cache_dir``) the features of every unique path.

        Without ``cache_dir`` the features are one in-memory tensor (fine for an evaluation
        set). With it, the result is a :class:`MemmapFeatureCache`; every rank must call this
        with the same paths, and ``sync`` (a barrier) separates writing from reading.
        ``owners`` maps a path to the (data file, sample id) named when it cannot be decoded;
        ``preprocess`` turns an image into pixels (a processor's image steps), by default the
        encoder's own. ``max_pixels``: see :func:`~chiasm.data.images.load_image`.

        ``views`` = (count, key) caches several views per image: ``preprocess`` then returns
        an image's ``(V, 3, H, W)`` views, ``count(path)`` says V from the file's header, and
        ``key`` (the tiling config as text) enters the fingerprint.
        """
        unique = sorted({str(p) for p in paths})
        encoding = _Encoding(encoder, preprocess or encoder.preprocessing, unique, batch_size, on_error, owners or {},
                             max_pixels, views)
        if cache_dir is not None:
            return _Shards(encoding, Path(cache_dir), world).open(rank, sync, show_progress)
        blocks = list(encoding.chunks(0, len(unique), show_progress))
        feats = torch.from_numpy(np.concatenate(blocks) if blocks else np.zeros((0, *encoding.shape), np.float16))
        return cls({p: i for i, p in enumerate(unique)}, feats, encoding.bad, encoding.offsets)


class _Encoding:
    """Runs the frozen encoder over a slice of the sorted image list, in fp16 chunks."""

    def __init__(self, encoder: VisionEncoder, preprocess: Preprocess, unique: list[str], batch_size: int,
                 on_error: str, owners: Mapping[str, tuple[str | None, str | None]], max_pixels: int | None = None,
                 views: tuple[ViewCount, str] | None = None):
        self.encoder, self.preprocess, self.unique, self.batch_size, self.on_error, self.owners = (
            encoder, preprocess, unique, batch_size, on_error, owners)
        self.max_pixels = max_pixels
        self.shape = (encoder.grid()[0] * encoder.grid()[1], encoder.dim)
        self.bad: dict[str, str] = {}
        self.views_key = views[1] if views is not None else ""
        # offsets[i]:offsets[i + 1]: the rows of unique[i]'s views (None: one row per image)
        self.offsets = self._offsets(views[0]) if views is not None else None

    def _offsets(self, count: ViewCount) -> list[int]:
        """Row offsets from each image's view count; an unreadable image (``skip``) gets no row."""
        offsets = [0]
        for p in self.unique:
            try:
                n = count(p)
            except DataError as err:
                if self.on_error != "skip":
                    source, sample_id = self.owners.get(p, (None, None))
                    raise DataError(err.message, source=source, sample_id=sample_id, image=p) from None
                self.bad[p], n = err.message, 0
            offsets.append(offsets[-1] + n)
        return offsets

    def row_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The rows of images ``unique[lo:hi]``."""
        return (self.offsets[lo], self.offsets[hi]) if self.offsets is not None else (lo, hi)

    @torch.no_grad()
    def chunks(self, lo: int, hi: int, show_progress: bool) -> Iterator[np.ndarray]:
        """fp16 features of ``unique[lo:hi]`` in order; an undecodable image (``skip``) gets a zero row."""
        encoder = self.encoder
        was_training = encoder.training
        encoder.eval()
        device = next(encoder.parameters()).device
        try:
            for i in tqdm(range(lo, hi, self.batch_size), desc="encoding images", unit="batch",
                          disable=not show_progress):
                j_hi = min(i + self.batch_size, hi)
                first, last = self.row_range(i, j_hi)
                block = np.zeros((last - first, *self.shape), dtype=np.float16)
                kept: list[int] = []
                pixels: list[torch.Tensor] = []
                for j in range(i, j_hi):
                    if self.unique[j] in self.bad:  # refused while counting its views
                        continue
                    source, sample_id = self.owners.get(self.unique[j], (None, None))
                    try:
                        image = load_image(Path(self.unique[j]), sample_id=sample_id, source=source,
                                           max_pixels=self.max_pixels)
                    except DataError as err:
                        if self.on_error != "skip":
                            raise
                        self.bad[self.unique[j]] = err.message
                        continue
                    got = self.preprocess(image)
                    got = got[None] if self.offsets is None else got  # an image's views: (V, 3, H, W)
                    r0, r1 = self.row_range(j, j + 1)
                    if got.shape[0] != r1 - r0:
                        raise RuntimeError(f"{self.unique[j]}: {got.shape[0]} views, but its size gave {r1 - r0}")
                    pixels.append(got)
                    kept.extend(range(r0 - first, r1 - first))
                if kept:
                    block[kept] = encoder(torch.cat(pixels).to(device)).to(torch.float16).cpu().numpy()
                yield block
        finally:
            encoder.train(was_training)
        if self.bad:
            log.warning("feature cache: %d undecodable image(s) left out (first: %s)", len(self.bad),
                        next(iter(self.bad.values())))


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
                 bad: Mapping[str, str] | None = None, offsets: Sequence[int] | None = None):
        # bounds: the first row of each shard
        super().__init__({p: i for i, p in enumerate(paths)}, torch.zeros(0), bad, offsets)
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


class _Shards:
    """The folder ``features-<fingerprint>/`` of one cache: a ``.npy`` + ``.json`` pair per shard and an index.

    Shard ``s`` of ``world`` holds the contiguous rows ``bounds[s]:bounds[s + 1]`` of the
    sorted image list; its ``.json`` is renamed into place last and marks it complete.
    """

    def __init__(self, encoding: _Encoding, cache_dir: Path, world: int):
        self.encoding, self.world = encoding, world
        n = len(encoding.unique)
        self.bounds = [s * n // world for s in range(world + 1)]  # images of each shard
        self.fp = _fingerprint(encoding.encoder, encoding.unique, encoding.preprocess, encoding.max_pixels,
                               encoding.views_key)
        self.folder = cache_dir / f"features-{self.fp}"

    def row_bounds(self, bounds: list[int]) -> list[int]:
        """The first row of each shard (and the row count last)."""
        return [self.encoding.row_range(0, b)[1] for b in bounds]

    def open(self, rank: int, sync: Callable[[], None] | None, show_progress: bool) -> MemmapFeatureCache:
        unique = self.encoding.unique
        earlier = self._earlier()
        if earlier is not None:
            return earlier
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write(rank, show_progress)
        if sync is not None:
            sync()
        bad: dict[str, str] = {}
        for s in range(self.world):
            meta = self.meta(s, self.world)
            if meta is None:  # a rank that does not share this folder's file system
                log.warning("feature cache: shard %d of %d not found in %s; encoding it here", s, self.world,
                            self.folder)
                self.write(s, False)
                meta = self.meta(s, self.world)
            bad.update(meta["bad"])
        if rank == 0:
            _write_json(self.folder / INDEX_FILE, {
                "fingerprint": self.fp, "paths": unique, "world": self.world, "bounds": self.bounds,
                "offsets": self.encoding.offsets, "shape": list(self.encoding.shape), "dtype": "float16",
                "bad": bad})
        files = [self.folder / _shard_name(s, self.world) for s in range(self.world)]
        rows = self.row_bounds(self.bounds)
        return MemmapFeatureCache(self.folder, unique, rows[:-1], files, bad, self.encoding.offsets)

    def meta(self, s: int, world: int) -> dict | None:
        """Shard ``s`` of ``world``'s completion record, if it is complete and of this fingerprint."""
        meta = self.folder / (_shard_name(s, world)[:-4] + ".json")
        if not meta.is_file() or not (self.folder / _shard_name(s, world)).is_file():
            return None
        data = json.loads(meta.read_text())
        return data if data.get("fingerprint") == self.fp else None

    def write(self, s: int, show_progress: bool) -> None:
        """Encode shard ``s`` and write it sequentially under a temporary name, then rename it."""
        if self.meta(s, self.world) is not None:
            return
        lo, hi = self.bounds[s], self.bounds[s + 1]
        final = self.folder / _shard_name(s, self.world)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        first, last = self.encoding.row_range(lo, hi)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                  "shape": (last - first, *self.encoding.shape)}
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_2_0(f, header)
                for block in self.encoding.chunks(lo, hi, show_progress):
                    f.write(block.tobytes())
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        bad = {p: self.encoding.bad[p] for p in self.encoding.unique[lo:hi] if p in self.encoding.bad}
        _write_json(final.with_suffix(".json"), {"fingerprint": self.fp, "lo": lo, "hi": hi, "bad": bad})

    def _earlier(self) -> MemmapFeatureCache | None:
        """A complete earlier build of this fingerprint (any world size), or None."""
        file = self.folder / INDEX_FILE
        if not file.is_file():
            return None
        index = json.loads(file.read_text())
        world = index.get("world", 0)
        if index.get("fingerprint") != self.fp or index.get("paths") != self.encoding.unique:
            return None
        if any(self.meta(s, world) is None for s in range(world)):
            return None
        if index.get("offsets") != self.encoding.offsets:
            return None
        files = [self.folder / _shard_name(s, world) for s in range(world)]
        rows = self.row_bounds(index["bounds"])
        return MemmapFeatureCache(self.folder, self.encoding.unique, rows[:-1], files, index["bad"],
                                  self.encoding.offsets)


def _shard_name(s: int, world: int) -> str:
    return f"shard-{s:05d}-of-{world:05d}.npy"


def _map_npy(file: Path) -> tuple[mmap.mmap, np.ndarray, int]:
    """A read-only map of a ``.npy`` file, the array view on it and the data's byte offset.

    ``np.load(mmap_mode="r")`` would hide the map, and the map is needed to release pages.
    """
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
            if fortran:
                raise ValueError(f"{file}: feature shards are written C-ordered; this one is not")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm, np.ndarray(shape, dtype=dtype, buffer=mm, offset=offset), offset
    except (OSError, ValueError, TypeError) as exc:  # TypeError: numpy's "buffer is too small" (a truncated file)
        raise ModelFolderError(f"{file}: unreadable feature cache shard ({exc}); delete {file.parent} "
                               "to compute the features again") from exc


def _release(mm: mmap.mmap, start: int, size: int) -> None:
    """Unmap the pages of bytes ``[start, start + size)`` from this process (Linux); a new read refaults them."""
    if not hasattr(mmap, "MADV_DONTNEED") or size == 0:
        return
    # Widened to Linux's fault-around window, which maps cached neighbours of a faulting page too.
    lo = start // _WINDOW * _WINDOW
    hi = min(len(mm), -(-(start + size) // _WINDOW) * _WINDOW)
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
