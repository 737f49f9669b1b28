"""The safetensors header, validated without torch: before anything is allocated from it, and before transformers or
vLLM is given the file (a JSON object; dims non-negative; data offsets inside the file and matching the shape)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .integrity import ArtifactError

# bytes per element of each dtype code gisp-deploy reads (safetensors_file.SAFETENSORS_DTYPES: torch's; a test
# checks they agree)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}


def _entry_problem(e, data_bytes: int) -> str | None:
    """What is wrong with one header entry (before anything is allocated from it), or None."""
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
        return "has no dtype"
    itemsize = ITEMSIZE.get(e["dtype"])
    if itemsize is None:
        return f"has dtype {e['dtype']}, which gisp-deploy does not read"
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has shape {shape!r}, not a list of sizes >= 0"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"has data offsets {offsets!r} outside the file's {data_bytes} data bytes"
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        return "does not match its shape"
    return None


def header_entries(fd: int, path: Path) -> tuple[dict, int]:
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
        header_entries(fd, path)
    finally:
        os.close(fd)
