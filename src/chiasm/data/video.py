"""A video as N sampled frames with time markers, and a per-sample image-token budget.

A video enters a conversation as frames, each an image with its own ``<image>``
placeholder after a time marker ("Frame 2 (1.5 s): <image>"), so the LM knows their order
and spacing. Frames come from a folder of frame images (sorted by the numbers in their
names) or from a video file decoded with PyAV (an optional dependency, ``pip install
av``); N frames are sampled evenly over the clip, first and last included.

:func:`fit_budget` keeps a sample within a number of image tokens: it refuses one that
does not fit, naming file and sample, or (``drop="frames"``) drops evenly spaced frames,
keeping the first and the last, and says which it dropped.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from chiasm.data.sample import IMAGE_PLACEHOLDER, DataError, Sample, Turn

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FRAME_TEXT = re.compile(r"Frame (\d+) \(([\d.]+) s\): " + re.escape(IMAGE_PLACEHOLDER) + r"\n?")


def frame_marker(index: int, seconds: float) -> str:
    """The text before frame ``index`` (1-based) taken at ``seconds``."""
    return f"Frame {index} ({seconds:.1f} s): {IMAGE_PLACEHOLDER}"


def video_turn_text(n_frames: int, *, fps: float = 1.0, times: list[float] | None = None) -> str:
    """One line per frame, each a time marker and its placeholder."""
    times = times if times is not None else [k / fps for k in range(n_frames)]
    return "\n".join(frame_marker(k + 1, t) for k, t in enumerate(times))


def evenly(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)``, first and last included."""
    if n >= n_total:
        return list(range(n_total))
    if n == 1:
        return [0]
    return [round(k * (n_total - 1) / (n - 1)) for k in range(n)]


def _natural(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def read_frames(source: str | Path, n_frames: int, *, fps: float = 1.0, cache_dir: str | Path | None = None,
                sample_id: str | None = None, data_file: str | None = None) -> tuple[list[Path], list[float]]:
    """``n_frames`` frame files of a folder of frames or a video file, and their times in seconds.

    A folder's frames are taken as ``fps`` frames per second. A video file's frames are
    decoded with PyAV into ``cache_dir`` (PNG) at their presentation times. Any failure is
    a :class:`DataError` naming the video and the sample.
    """
    source = Path(source)

    def fail(why: str) -> DataError:
        return DataError(f"{source}: {why}", source=data_file, sample_id=sample_id, image=str(source))

    if n_frames < 1:
        raise fail(f"n_frames must be 1 or more, got {n_frames}")
    if source.is_dir():
        files = sorted((p for p in source.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not files:
            raise fail(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in this folder")
        picked = evenly(len(files), n_frames)
        return [files[i] for i in picked], [i / fps for i in picked]
    if not source.is_file():
        raise fail("video not found (neither a file nor a folder of frames)")
    return _decode_video(source, n_frames, cache_dir, fail)


def _decode_video(source: Path, n_frames: int, cache_dir: str | Path | None, fail) -> tuple[list[Path], list[float]]:
    try:
        import av  # optional: only video files need it
    except ImportError:
        raise fail("cannot decode a video file without PyAV (pip install av); or give a folder of frames") from None
    try:
        with av.open(str(source)) as container:
            frames = [(f.to_image(), float(f.time or 0.0)) for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise fail(f"cannot decode the video: {exc}") from None
    if not frames:
        raise fail("the video holds no frame")
    out_dir = Path(cache_dir) if cache_dir is not None else source.with_suffix(".frames")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, times = [], []
    for i in evenly(len(frames), n_frames):
        path = out_dir / f"{source.stem}-{i:06d}.png"
        frames[i][0].save(path)
        paths.append(path)
        times.append(frames[i][1])
    return paths, times


def fit_budget(sample: Sample, counts: list[int], budget: int, *, drop: str = "none") -> tuple[Sample, list[str]]:
    """``sample`` within ``budget`` image tokens (``counts``: each image's, from the processor).

    ``drop="none"`` refuses a sample over the budget; ``drop="frames"`` removes evenly spaced
    frames (their markers and images; first and last kept) until it fits and returns what it
    dropped. A budget below one image's tokens (even the global view alone) is refused.
    """
    def fail(why: str) -> DataError:
        return DataError(why, source=sample.source, sample_id=sample.id)

    if drop not in ("none", "frames"):
        raise ValueError(f"drop must be 'none' or 'frames', not {drop!r}")
    if sum(counts) <= budget:
        return sample, []
    if counts and budget < min(counts):
        raise fail(f"an image-token budget of {budget} cannot hold even one image's global view "
                   f"({min(counts)} tokens)")
    frames = [m for t in sample.conversations for m in _FRAME_TEXT.finditer(t.text)]
    if drop == "none" or len(frames) != len(sample.images) or len(frames) < 2:
        raise fail(f"{len(sample.images)} image(s) take {sum(counts)} image tokens, over the budget of {budget}")
    keep = list(range(len(frames)))
    for n in range(len(frames) - 1, 1, -1):
        keep = evenly(len(frames), n)
        if sum(counts[i] for i in keep) <= budget:
            break
    if sum(counts[i] for i in keep) > budget:
        raise fail(f"even the first and last frame take {counts[0] + counts[-1]} image tokens, over the "
                   f"budget of {budget}")
    dropped_idx = [i for i in range(len(frames)) if i not in keep]
    dropped = [f"frame {frames[i].group(1)} ({frames[i].group(2)} s)" for i in dropped_idx]
    gone = {frames[i].group(0) for i in dropped_idx}
    turns = [Turn(t.role, _FRAME_TEXT.sub(lambda m: "" if m.group(0) in gone else m.group(0), t.text))
             for t in sample.conversations]
    meta = {**sample.meta, "dropped_frames": dropped}
    return replace(sample, conversations=turns, images=[sample.images[i] for i in keep], meta=meta), dropped
