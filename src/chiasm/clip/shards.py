"""WebDataset-style tar shards: write pairs into them, stream them back without loading a data set.

A shard is a plain tar file; the files of one sample share a key (``000017.png``,
``000017.txt``, optionally ``000017.cls``), which is the WebDataset layout, so shards written
here are read by ``webdataset`` and shards written by it (images + ``.txt``/``.caption``)
are read here. Streaming splits the shards over ranks and DataLoader workers; an image that
fails to decode is named by shard and key, and skipped and counted when asked.
"""

from __future__ import annotations

import glob
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from chiasm.clip.pairs import PairSet
from chiasm.data.images import decode_image
from chiasm.data.sample import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
TEXT_EXTS = (".txt", ".caption")


def write_shards(pairs: PairSet, out: str | Path, per_shard: int = 1000) -> list[Path]:
    """Write every pair as PNG + caption lines (+ label) into ``out/shard-000000.tar``, ...."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar = None
    for i in tqdm(range(len(pairs)), desc="writing shards", unit="pair", leave=False):
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(out / f"shard-{len(paths):06d}.tar")
            tar = tarfile.open(paths[-1], "w")
        buf = io.BytesIO()
        pairs.image(i).save(buf, format="PNG")
        files = {".png": buf.getvalue(), ".txt": "\n".join(pairs.captions(i)).encode()}
        if pairs.labels is not None:
            files[".cls"] = str(pairs.labels[i]).encode()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{i:09d}{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    return paths


def shard_files(spec: str) -> list[Path]:
    """A folder (its ``*.tar``), a glob, or one file; sorted by name so every rank sees one order."""
    p = Path(spec)
    found = sorted(p.glob("*.tar")) if p.is_dir() else sorted(Path(f) for f in glob.glob(spec))
    if not found:
        raise FileNotFoundError(f"no tar shards at {spec!r} (give a folder of .tar files or a glob)")
    return found


@dataclass
class ShardSample:
    key: str
    shard: str
    image: Image.Image
    captions: list[str]
    label: int | None


def iter_shard(path: Path, *, on_error: str = "raise", skipped: list | None = None) -> Iterator[ShardSample]:
    """The samples of one shard in file order; groups consecutive members by key."""
    def finish(key: str, files: dict[str, bytes]) -> ShardSample | None:
        where = f"{path.name}:{key}"
        try:
            image_ext = next((e for e in IMAGE_EXTS if e in files), None)
            text_ext = next((e for e in TEXT_EXTS if e in files), None)
            if image_ext is None or text_ext is None:
                raise DataError(f"sample {key} needs an image ({'/'.join(IMAGE_EXTS)}) and a caption "
                                f"({'/'.join(TEXT_EXTS)}); it has {sorted(files)}", source=str(path))
            captions = [c for c in files[text_ext].decode("utf-8", "replace").splitlines() if c.strip()]
            if not captions:
                raise DataError(f"sample {key}: empty caption", source=str(path))
            image = decode_image(files[image_ext], describe=where)
            label = int(files[".cls"].decode().strip()) if ".cls" in files else None
            return ShardSample(key, str(path), image, captions, label)
        except (DataError, ValueError) as exc:
            if on_error == "raise":
                raise DataError(f"{where}: {exc}", source=str(path), sample_id=key) from None
            if skipped is not None:
                skipped.append((where, str(exc)))
            return None

    try:
        tar = tarfile.open(path)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: not a readable tar shard ({exc})", source=str(path)) from None
    with tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            stem, dot, ext = member.name.rpartition(".")
            if not dot:
                continue
            if stem != key and key is not None:
                done = finish(key, files)
                if done is not None:
                    yield done
                files = {}
            key = stem
            files["." + ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            done = finish(key, files)
            if done is not None:
                yield done


def stream(files: list[Path], *, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1,
           on_error: str = "raise", skipped: list | None = None) -> Iterator[ShardSample]:
    """This rank's and worker's samples: shards dealt round-robin over ``world * workers`` readers.

    With fewer shards than readers, every reader reads every shard and keeps its own stride of
    samples, so no sample is read twice per epoch.
    """
    readers, me = world * workers, rank * workers + worker
    if len(files) >= readers:
        for path in files[me::readers]:
            yield from iter_shard(path, on_error=on_error, skipped=skipped)
        return
    n = 0
    for path in files:
        for sample in iter_shard(path, on_error=on_error, skipped=skipped):
            if n % readers == me:
                yield sample
            n += 1
