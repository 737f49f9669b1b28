"""The dense checkpoint read by tensor name over its shards: mapped views and positioned reads on the CPU,
safetensors on a device."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from ..artifact import INDEX_FILE, ArtifactError, weight_files
from ..integrity import inside
from ..safetensors_file import ShardFile, StagingBuffer

class WeightReader:
    """Tensor name -> its safetensors file, over the artifact's weight files (sharded or not). `device="cpu"`
    reads with ShardFile (mapped views, positioned reads); another device through safetensors onto that device."""

    def __init__(self, weights_dir: Path, device: str, *, links_may_leave: bool = False):
        self.dir = Path(weights_dir)
        self.device = device
        self.links_may_leave = links_may_leave  # a --no-copy-weights source in the Hugging Face cache
        self._stack = ExitStack()
        self._handles: dict[tuple[str, str], object] = {}
        self.staging = StagingBuffer()  # the one buffer staged reads share, over every shard
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                where = json.loads(index.read_text())["weight_map"]
                if not (isinstance(where, dict) and all(isinstance(v, str) for v in where.values())):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ArtifactError(f"{index}: no weight_map of tensor -> file names; the index is damaged") from None
            self.where = dict(where)
        else:  # one file, or shards without an index: their headers say what they hold
            self.where = {name: f.name for f in weight_files(self.dir) for name in self._handle(f.name, "direct").keys()}
        if not self.where:
            raise ArtifactError(f"{self.dir}: no safetensors weights found")

    def _handle(self, fname: str, kind: str):
        """The open file: "direct" a ShardFile, "mapped" a safetensors handle on this reader's device."""
        if (kind, fname) not in self._handles:
            path = inside(self.dir, fname, "weight file", links_may_leave=self.links_may_leave)
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

    def shape(self, name: str) -> list[int]:
        return self._handle(self._file(name), "direct").shape(name)

    def read_into(self, name: str, out: torch.Tensor, positions: list[int] | None = None, dim: int = 0,
                  staging: StagingBuffer | None = None, zeroed: bool = False) -> None:
        """Fill CPU tensor `out` with `name`, or its entries at `positions` along `dim` (-1: zero, or left
        alone where `out` is `zeroed`), converting to out's dtype (positioned reads through `staging`, by
        default this reader's one staging buffer)."""
        self._handle(self._file(name), "direct").read_into(name, out, positions, dim, staging or self.staging,
                                                           zeroed)

    def mapped(self, name: str, positions: list[int] | None = None, dim: int = 0, dtype: torch.dtype | None = None):
        """`name` (or its one contiguous run of `positions` along `dim`) as a copy-on-write view of its file, or
        None where only a copy can give it (ShardFile.mapped)."""
        return self._handle(self._file(name), "direct").mapped(name, positions, dim, dtype)

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

