"""The dense checkpoint read by tensor: positioned reads of kept rows on the CPU, safetensors on a device."""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from ..artifact import ArtifactError
from ..hf import SAFETENSORS_DTYPES
from ..layout import runs

INDEX_FILE = "model.safetensors.index.json"


class ShardFile:
    """One safetensors file read with positioned reads into fresh tensors: only the requested bytes are read
    and nothing stays mapped. The header (8-byte length, JSON of dtype/shape/offsets) is the format's own."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        n = int.from_bytes(os.pread(self.fd, 8, 0), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            self.close()
            raise ArtifactError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a "
                                f"{size}-byte file); restore it from the source model")
        try:
            self.entries = json.loads(os.pread(self.fd, n, 8))
        except ValueError:
            self.close()
            raise ArtifactError(f"{path}: unreadable safetensors header; restore it from the source model") from None
        self.entries.pop("__metadata__", None)
        self.base = 8 + n
        for name, e in self.entries.items():
            a, b = e["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(e["dtype"])
            if dtype is None:
                self.close()
                raise ArtifactError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which gisp-deploy does not read")
            if b - a != math.prod(e["shape"]) * dtype.itemsize or self.base + b > size:
                self.close()
                raise ArtifactError(f"{path}: tensor {name!r} runs past the end of the file or does not match "
                                    "its shape; the file is truncated or damaged, restore it from the source model")

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


class WeightReader:
    """Tensor name -> its safetensors file, over the artifact's weight files (sharded or not). `device="cpu"`
    reads with ShardFile (positioned reads); another device through safetensors onto that device."""

    def __init__(self, weights_dir: Path, device: str):
        self.dir = Path(weights_dir)
        self.device = device
        self._stack = ExitStack()
        self._handles: dict[tuple[str, str], object] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:  # one file, or shards without an index: their headers say what they hold
            self.where = {name: f.name for f in sorted(self.dir.glob("*.safetensors"))
                          for name in self._handle(f.name, "direct").keys()}
        if not self.where:
            raise ArtifactError(f"{self.dir}: no safetensors weights found")

    def _handle(self, fname: str, kind: str):
        """The open file: "direct" a ShardFile, "mapped" a safetensors handle on this reader's device."""
        if (kind, fname) not in self._handles:
            path = self.dir / fname
            if not path.is_file():
                raise ArtifactError(f"{path}: weight file missing; the artifact is incomplete")
            if kind == "direct":
                handle = ShardFile(path)
            else:
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt", device=self.device)
            self._handles[(kind, fname)] = self._stack.enter_context(handle)
        return self._handles[(kind, fname)]

    def _file(self, name: str) -> str:
        if name not in self.where:
            raise ArtifactError(f"{self.dir}: tensor {name!r} not found in the weights")
        return self.where[name]

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """A fresh CPU tensor of `name`, or of its `rows` only (positioned reads; nothing stays mapped)."""
        return self._handle(self._file(name), "direct").read(name, rows)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def source(self, name: str):
        """The tensor: memory-mapped (zero-copy, pages read on touch) on the CPU, whole on a GPU."""
        return self._handle(self._file(name), "mapped").get_tensor(name)

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

