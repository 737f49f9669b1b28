"""The safetensors format as gisp-deploy reads it: dtype codes, validated headers, and positioned reads.

Headers are validated (a JSON object; dims non-negative; data offsets inside the file and matching the shape)
before anything is allocated from them, and before transformers or vLLM is given the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .integrity import ArtifactError
from .layout import runs

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


def _entry_problem(e, data_bytes: int) -> str | None:
    """What is wrong with one header entry (before anything is allocated from it), or None."""
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
        return "has no dtype"
    dtype = SAFETENSORS_DTYPES.get(e["dtype"])
    if dtype is None:
        return f"has dtype {e['dtype']}, which gisp-deploy does not read"
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has shape {shape!r}, not a list of sizes >= 0"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"has data offsets {offsets!r} outside the file's {data_bytes} data bytes"
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        return "does not match its shape"
    return None


def _header(fd: int, path: Path) -> tuple[dict, int]:
    """(tensor name -> entry, offset of the data) of an open safetensors file, every entry validated."""
    size = os.fstat(fd).st_size
    n = int.from_bytes(os.pread(fd, 8, 0), "little") if size >= 8 else -1
    if not 0 < n <= size - 8:
        raise ArtifactError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a "
                            f"{size}-byte file); restore it from the source model")
    try:
        entries = json.loads(os.pread(fd, n, 8))
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise ArtifactError(f"{path}: unreadable safetensors header; restore it from the source model") from None
    entries.pop("__metadata__", None)
    for name, e in entries.items():
        problem = _entry_problem(e, size - 8 - n)
        if problem:
            raise ArtifactError(f"{path}: tensor {name!r} {problem}; the file is truncated, damaged or crafted, "
                                "restore it from the source model")
    return entries, 8 + n


def check_header(path: Path) -> None:
    """Refuse a safetensors file whose header another reader (transformers, vLLM) should not be given."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _header(fd, path)
    finally:
        os.close(fd)


class ShardFile:
    """One safetensors file read with positioned reads into fresh tensors: only the requested bytes are read
    and nothing stays mapped. The header (8-byte length, JSON of dtype/shape/offsets) is the format's own."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.entries, self.base = _header(self.fd, path)
        except BaseException:
            self.close()
            raise

    def keys(self):
        return self.entries.keys()

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """The tensor, or only its `rows` (dim 0, in the given order)."""
        e = self.entries[name]
        shape, (a, b) = e["shape"], e["data_offsets"]
        out = torch.empty(shape if rows is None else [len(rows), *shape[1:]], dtype=SAFETENSORS_DTYPES[e["dtype"]])
        if rows is None:
            self._fill(out, self.base + a)
            return out
        row_bytes = (b - a) // shape[0] if shape[0] else 0
        pos = 0
        for r0, r1 in runs(rows):
            if not 0 <= r0 < r1 <= shape[0]:
                raise IndexError(f"rows {r0}..{r1 - 1} of {name} (of {shape[0]})")
            self._fill(out[pos:pos + r1 - r0], self.base + a + r0 * row_bytes)
            pos += r1 - r0
        return out

    def _fill(self, t: torch.Tensor, offset: int) -> None:
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # t is contiguous: writes land in it
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ArtifactError(f"{self.path}: the file ended early; it is truncated, restore it")
            done += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
