"""Broken, unusual and misplaced images, run through ``chiasm train``, ``eval`` and ``chat``."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from .env import Env, Expect, good_records, record
from .registry import BAD, _eval_err, _train_err, _with_bad, case


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


RED = Image.new("RGB", (64, 64), (200, 30, 30))


def _image_case(env: Env, image_name: str, *named: str, skip: bool = False) -> Expect:
    data = _with_bad(env, record(BAD, image=image_name))
    if skip:
        return Expect(env.train(data, skip=True), skipped=True, sample=BAD)
    # A missing file is found when the data is read; a broken one when training decodes it.
    return _train_err(env, data, *named, before_model=image_name in ("missing.png", "folder.png"))


@case("image", "train")
def image_missing(env: Env) -> Expect:
    return _image_case(env, "missing.png", str(env.data_dir() / "missing.png"), "not found")


@case("image", "train")
def image_zero_bytes(env: Env) -> Expect:
    env.write_bytes(b"", "empty.png")
    return _image_case(env, "empty.png", str(env.data_dir() / "empty.png"))


@case("image", "train")
def image_text_named_png(env: Env) -> Expect:
    env.write_bytes(b"this is a caption, not an image\n", "text.png")
    return _image_case(env, "text.png", str(env.data_dir() / "text.png"))


@case("image", "train")
def image_truncated_png(env: Env) -> Expect:
    data = _png(Image.effect_noise((64, 64), 40).convert("RGB"))
    env.write_bytes(data[: len(data) // 2], "cut.png")
    return _image_case(env, "cut.png", str(env.data_dir() / "cut.png"))


@case("image", "train")
def image_truncated_jpeg(env: Env) -> Expect:
    data = _jpeg(Image.effect_noise((64, 64), 40).convert("RGB"))
    env.write_bytes(data[: len(data) // 2], "cut.jpg")
    return _image_case(env, "cut.jpg", str(env.data_dir() / "cut.jpg"))


@case("image", "train")
def image_truncated_png_skipped(env: Env) -> Expect:
    data = _png(Image.effect_noise((64, 64), 40).convert("RGB"))
    env.write_bytes(data[: len(data) // 2], "cut.png")
    return _image_case(env, "cut.png", skip=True)


@case("image", "train")
def image_directory_named_png(env: Env) -> Expect:
    (env.data_dir() / "folder.png").mkdir()
    return _image_case(env, "folder.png", str(env.data_dir() / "folder.png"))


@case("image", "train")
def image_svg_text(env: Env) -> Expect:
    env.write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect fill="red"/></svg>',
                    "pic.svg")
    return _image_case(env, "pic.svg", str(env.data_dir() / "pic.svg"))


@case("image", "train")
def image_outside_root_dotdot(env: Env) -> Expect:
    (env.root / "outside.png").write_bytes(_png(RED))
    return _image_case(env, "../outside.png", "../outside.png", "image root")


@case("image", "train")
def image_absolute_path(env: Env) -> Expect:
    (env.root / "outside.png").write_bytes(_png(RED))
    return _image_case(env, str(env.root / "outside.png"), str(env.root / "outside.png"), "image root")


@case("image", "train")
def image_outside_root_allowed(env: Env) -> Expect:
    """With ``allow_outside_image_root = true`` a path outside the root is read: the refusal is a default."""
    (env.root / "outside.png").write_bytes(_png(RED))
    data = env.write_json([*good_records(), record("out-1", image="../outside.png")])
    return Expect(env.train(data, stage="allow_outside_image_root = true\n"), ok=True)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` pixels, followed by a tiny (wrong) body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@case("image", "train")
def image_decompression_bomb(env: Env) -> Expect:
    env.write_bytes(_bomb_png(60000, 60000), "bomb.png")
    return _image_case(env, "bomb.png", str(env.data_dir() / "bomb.png"))


@case("image", "chat")
def chat_image_decompression_bomb(env: Env) -> Expect:
    path = env.write_bytes(_bomb_png(60000, 60000), "bomb.png")
    return Expect(env.chat(images=(path,)), named=(str(path),), before_model=True)


@case("image", "chat")
def image_16bit_grey_decodes(env: Env) -> Expect:
    """A 16-bit grey PNG is an ordinary image (medical, scientific): it must be read, and read right."""
    grey = Image.new("I;16", (64, 64), 32768)  # mid-grey on a 16-bit scale
    path = env.write_bytes(_png(grey), "grey16.png")

    def check() -> None:
        from chiasm.data.images import load_image

        value = load_image(path).getpixel((0, 0))
        assert all(120 <= v <= 136 for v in value), f"16-bit mid-grey read as {value}"

    return Expect(env.chat(images=(path,)), ok=True, verify=check)


@case("image", "chat")
def image_cmyk_jpeg_decodes(env: Env) -> Expect:
    path = env.write_bytes(_jpeg(RED.convert("CMYK")), "cmyk.jpg")

    def check() -> None:
        from chiasm.data.images import load_image

        r, g, b = load_image(path).getpixel((32, 32))
        assert r > 150 and g < 80 and b < 80, f"CMYK red read as {(r, g, b)}"

    return Expect(env.chat(images=(path,)), ok=True, verify=check)


@case("image", "chat")
def image_palette_with_transparency_decodes(env: Env) -> Expect:
    path = env.write_bytes(_png(RED.convert("P")), "palette.png")
    return Expect(env.chat(images=(path,)), ok=True)


@case("image", "chat")
def chat_image_not_an_image(env: Env) -> Expect:
    path = env.write_bytes(b"%PDF-1.4 not an image", "doc.png")
    return Expect(env.chat(images=(path,)), named=(str(path),), before_model=True)


@case("image", "chat")
def chat_image_missing(env: Env) -> Expect:
    path = env.root / "nope.png"
    return Expect(env.chat(images=(path,)), named=(str(path), "not found"), before_model=True)


@case("image", "chat")
def chat_image_is_folder(env: Env) -> Expect:
    return Expect(env.chat(images=(env.root,)), named=(str(env.root),), before_model=True)


@case("image", "chat")
def chat_image_truncated_jpeg(env: Env) -> Expect:
    data = _jpeg(Image.effect_noise((64, 64), 40).convert("RGB"))
    path = env.write_bytes(data[: len(data) // 3], "cut.jpg")
    return Expect(env.chat(images=(path,)), named=(str(path),), before_model=True)


@case("image", "eval")
def eval_image_missing(env: Env) -> Expect:
    data = _with_bad(env, record(BAD, image="missing.png"))
    return _eval_err(env, data, str(env.data_dir() / "missing.png"))


@case("image", "eval")
def eval_image_root_missing(env: Env) -> Expect:
    missing = env.root / "no-images"
    argv = [*env.eval(_with_bad(env, record(BAD))), "--image-root", str(missing)]
    return Expect(argv, named=(str(missing), "--image-root"), absent=env.eval_leftovers(), before_model=True)


@case("image", "eval")
def eval_image_truncated(env: Env) -> Expect:
    data = _png(Image.effect_noise((64, 64), 40).convert("RGB"))
    env.write_bytes(data[: len(data) // 2], "cut.png")
    return _eval_err(env, _with_bad(env, record(BAD, image="cut.png")), str(env.data_dir() / "cut.png"),
                     before_model=False)  # decoded when evaluating


@case("image", "train")
def image_name_with_nul(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image="img\u0000.png")), "'image'")


@case("image", "train")
def image_name_too_long(env: Env) -> Expect:
    name = "x" * 400 + ".png"
    return _train_err(env, _with_bad(env, record(BAD, image=name)), name)
