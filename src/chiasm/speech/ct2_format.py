"""Read CTranslate2's ``model.bin``: the only form in which Whisper weights ship in registry packages.

The layout (CTranslate2's ``ModelSpec._serialize``, binary version 6): a uint32 version, the
spec name and a uint32 revision, a uint32 count of variables, each a name, a rank, its dims,
a dtype id and a byte count followed by the raw bytes, then a uint32 count of aliases, each
a name and the variable it points at. Strings are a uint16 length (with the NUL) and the
bytes. ``ctranslate2`` writes this format but has no reader, hence this one (numpy only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chiasm.errors import ModelFolderError

# The order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
SUPPORTED_VERSIONS = (5, 6)


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model, aliases resolved to the arrays they name."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following an alias (e.g. the output projection tied to the embeddings)."""
        seen = name
        while name not in self.variables and name in self.aliases:
            name = self.aliases[name]
        if name not in self.variables:
            raise KeyError(f"CTranslate2 model has no variable {seen!r}")
        return self.variables[name]

    def __contains__(self, name: object) -> bool:
        return name in self.variables or name in self.aliases


class _Reader:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ModelFolderError(f"{self.path}: truncated CTranslate2 model (wanted {n} bytes at offset "
                                   f"{self.pos} of {len(self.data)}); the file is incomplete")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        return raw.rstrip(b"\0").decode("utf-8")


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse ``model.bin`` (or a folder holding it) into numpy arrays; float16 stays float16."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ModelFolderError(f"{path}: no CTranslate2 model.bin there")
    raw = path.read_bytes()
    r = _Reader(memoryview(raw), path)
    version = r.u32()
    if version not in SUPPORTED_VERSIONS:
        raise ModelFolderError(f"{path}: CTranslate2 binary version {version} is not supported "
                               f"(known: {', '.join(map(str, SUPPORTED_VERSIONS))}); is this a CTranslate2 model.bin?")
    spec = r.string()
    revision = r.u32()
    model = CT2Model(spec=spec, revision=revision)
    for _ in range(r.u32()):
        name = r.string()
        shape = tuple(r.u32() for _ in range(r.u8()))
        type_id = r.u8()
        if type_id >= len(_DTYPES):
            raise ModelFolderError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        nbytes = r.u32()
        dtype = np.dtype(_DTYPES[type_id]) if _DTYPES[type_id] != "bfloat16" else np.dtype("uint16")
        buf = r.take(nbytes)
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape) if shape else np.frombuffer(buf, dtype=dtype)[0]
        if _DTYPES[type_id] == "bfloat16":  # numpy has no bf16: widen the bits into float32
            arr = (np.asarray(arr, dtype=np.uint32) << 16).view(np.float32)
        model.variables[name] = np.asarray(arr)
    for _ in range(r.u32()):
        alias = r.string()
        model.aliases[alias] = r.string()
    return model
