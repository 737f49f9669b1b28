"""The safetensors format as gisp-deploy reads it: torch dtypes, positioned reads, mapped views, rewrites.

Every file's header is validated first (safetensors_header.py), before anything is allocated from it.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .integrity import ArtifactError
from .safetensors_header import header_entries

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


STAGING_BYTES = 64 << 20  # the one reused buffer that staged reads go through (grown only to hold one row)
READ_CALL_BYTES = 32 << 10  # one read call costs about as much as copying 32 KiB (measured: 3.8 us per 4 KiB pread,
#                             7.6 GB/s for 1 MiB ones): kept rows are read run by run only when runs are that long


FRESH_PAGES_BYTES = 64 << 10  # a tensor this large gets pages of its own (fresh_zeros); smaller ones share the heap
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer dtype of each element size
MIN_COLUMN_RUN = 16  # kept columns are copied run by run when their runs average this many, else gathered


def _ints(t: torch.Tensor) -> np.ndarray:
    """A numpy view of `t`'s bits (integers of its element size): numpy copies single-threaded, so they never wait
    on a busy CPU's thread pool."""
    return t.view(BITS[t.element_size()]).numpy()


def _spans(index: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive values in sorted `index`."""
    return [(d0, n) for _, d0, n in _runs(index, index)]


_COUNT: list[int] = []  # 0, 1, 2, ...: comparing with a slice of it is twice as fast as with a fresh range
_COUNT_GROWING = threading.Lock()


def _is_run(positions: list[int], start: int, stop: int) -> bool:
    """positions == [start, start + 1, ..., stop - 1]."""
    if len(positions) != stop - start:
        return False
    if len(_COUNT) < stop:
        with _COUNT_GROWING:
            _COUNT.extend(range(len(_COUNT), 2 * stop))
    return positions == _COUNT[start:stop]


def _runs(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[int, int, int]]:
    """(source start, destination start, length) of each run where both src and dst go up one at a time."""
    if not len(src):
        return []
    brk = (torch.nonzero((src[1:] != src[:-1] + 1) | (dst[1:] != dst[:-1] + 1)).flatten() + 1).tolist()
    starts, ends = [0, *brk], [*brk, len(src)]
    s, d = src.tolist(), dst.tolist()
    return [(s[i], d[i], j - i) for i, j in zip(starts, ends)]


def fresh_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in fresh pages of its own (a private anonymous mapping, filled with zeros by the kernel when
    first touched): entries never written, such as padding, cost no time (and no memory outside the huge pages
    that are written), where torch.zeros writes every page. Huge pages where the kernel gives them on request
    (THP "madvise"): faulting in 2 MiB at a time made filling fresh tensors 1.6-2x as fast here. Freed with the
    last view of it; small ones (under FRESH_PAGES_BYTES) are torch.zeros."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < FRESH_PAGES_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        pages.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


def take(block: torch.Tensor, index: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """out = block's entries at `index` (checked, in range) along `dim`, bit for bit. numpy's take on integer
    views: single-threaded, so it never waits on a busy CPU's thread pool, and its column gather ran 2.5-4x as
    fast as torch.index_select's here (bench/results/host_memory.json)."""
    bits = BITS[block.element_size()]
    np.take(block.view(bits).numpy(), index.numpy(), axis=dim, out=out.view(bits).numpy(), mode="clip")


class StagingBuffer:
    """One reusable byte buffer for reads that cannot land in their destination directly (scattered columns,
    many short row runs): allocated on first use, STAGING_BYTES, or one row if that is more."""

    def __init__(self, nbytes: int = STAGING_BYTES):
        self.nbytes = nbytes
        self._buf: torch.Tensor | None = None

    def rows(self, row_bytes: int) -> int:
        """How many rows of `row_bytes` one block holds (at least one)."""
        return max(1, self.nbytes // max(row_bytes, 1))

    def take(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the buffer: uint8, [nbytes]."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(max(nbytes, self.nbytes), dtype=torch.uint8)
        return self._buf[:nbytes]


class ShardFile:
    """One safetensors file read with positioned reads into given (or fresh) tensors, or viewed through one
    copy-on-write mapping (`mapped`): copies gather from the mapping; only an entry that cannot be mapped (a
    misaligned offset) is read through a staging buffer, no more than one held besides the destination (plus,
    when converting dtypes, one block's gathered rows). The header (8-byte length, JSON of dtype/shape/offsets)
    is the format's own."""

    def __init__(self, path: Path):
        self.path = path
        self._map: mmap.mmap | None = None
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.entries, self.base = header_entries(self.fd, path)
        except BaseException:
            self.close()
            raise

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def mapped(self, name: str, positions: list[int] | None = None, dim: int = 0,
               dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Tensor `name`, or its entries at `positions` along `dim`, as a view of the file mapped copy-on-write
        (pages read from the page cache when first touched, as transformers maps a dense model; a write lands in
        a private copy, never in the file) — or None where no view can give them: positions that are not one
        contiguous run without padding, another dtype than `dtype`, a misaligned offset. A view of rows is
        contiguous; a view of columns is the run's columns of every row (strided, its rows `shape[1]` apart)."""
        e = self.entries[name]
        shape, file_dtype = list(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]]
        if dtype is not None and dtype != file_dtype:
            return None
        start, stop = 0, shape[dim] if len(shape) > dim else 0
        if positions is not None:
            if dim not in (0, 1) or len(shape) <= dim or not positions:
                return None
            start, stop = positions[0], positions[-1] + 1
            if start < 0 or stop > shape[dim] or not _is_run(positions, start, stop):
                return None
        whole = self._whole(e)
        if whole is None:
            return None
        if positions is None:
            return whole
        return whole.narrow(dim, start, stop - start)

    def _whole(self, e) -> torch.Tensor | None:
        """Entry `e` as a view of the file mapped copy-on-write; None where its offset is misaligned or it is
        empty."""
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        offset = self.base + e["data_offsets"][0]
        if offset % dtype.itemsize or e["data_offsets"][1] == e["data_offsets"][0]:
            return None
        if self._map is None:  # the views hold the mapping: it lives as long as the last of them
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=e["data_offsets"][1] - e["data_offsets"][0],
                                offset=offset).view(dtype).view(e["shape"])

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """The tensor, or only its `rows` (dim 0, in the given order)."""
        e = self.entries[name]
        shape = e["shape"] if rows is None else [len(rows), *e["shape"][1:]]
        out = torch.empty(shape, dtype=SAFETENSORS_DTYPES[e["dtype"]])
        self.read_into(name, out, rows)
        return out

    def read_into(self, name: str, out: torch.Tensor, positions: list[int] | None = None, dim: int = 0,
                  staging: StagingBuffer | None = None, zeroed: bool = False) -> None:
        """Fill `out` (contiguous) with tensor `name`, or with its entries at `positions` along `dim` (0 rows,
        1 columns of a matrix; -1 gives zeros, left as they are where `out` is `zeroed` already: fresh_zeros),
        converted to out's dtype. Whole tensors and long runs of kept
        rows are read straight into `out` (copied from the mapped file when converted: torch converts as it
        copies), long runs of kept columns copied from the mapped file (only their bytes are read); other
        columns and short row runs are gathered a block of rows at a time from the mapped file, or from `staging`
        where the entry cannot be mapped (a misaligned offset): gathering from the mapping instead of a staged
        copy made a source-order 0.4 slice of the 1.5B load 20-25% faster."""
        e = self.entries[name]
        shape, dtype = list(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]]
        want = list(shape)
        if positions is not None:
            if dim not in (0, 1) or len(shape) <= dim:
                raise ValueError(f"{name}: cannot select along dim {dim} of a tensor of shape {shape}")
            want[dim] = len(positions)
        if list(out.shape) != want or not out.is_contiguous():
            raise ValueError(f"{name}: a destination of shape {list(out.shape)} for {want}")
        if out.numel() == 0:
            return
        rows_src = shape[0] if shape else 1
        row_bytes = (e["data_offsets"][1] - e["data_offsets"][0]) // max(rows_src, 1)
        pos = torch.arange(want[0] if shape else 1) if positions is None else torch.tensor(positions, dtype=torch.long)
        if positions is not None and pos.numel() and not (-1 <= int(pos.min()) and int(pos.max()) < shape[dim]):
            raise IndexError(f"positions {int(pos.min())}..{int(pos.max())} of {name} (of {shape[dim]} along "
                             f"dim {dim})")
        dst = torch.nonzero(pos >= 0).flatten()  # [K] destination index of each real position
        src = pos[dst]  # [K] its source index along dim
        if not zeroed:
            for d0, n in _spans(torch.nonzero(pos < 0).flatten()):  # zero padding, a run of rows / columns at a time
                _ints(out.narrow(dim, d0, n))[...] = 0
        staging = staging or StagingBuffer(min(STAGING_BYTES, max(row_bytes, rows_src * row_bytes)))
        if dim == 1:
            self._read_cols(e, out, src, dst, dtype, row_bytes, staging)
        elif len(src):
            self._read_rows(e, out, src, dst, dtype, row_bytes, staging)

    def _read_rows(self, e, out, src, dst, dtype, row_bytes: int, staging: StagingBuffer) -> None:
        """Rows src[i] -> out rows dst[i]: straight into out run by run when runs are long, else staged."""
        order = torch.argsort(src)
        src, dst = src[order], dst[order]  # read the file front to back
        runs = _runs(src, dst)
        covered = (int(src[-1]) - int(src[0]) + 1) * row_bytes
        flat = out.view(out.shape[0] if out.dim() else 1, -1)  # [R_out, C]
        if len(runs) * READ_CALL_BYTES <= covered:
            whole = None if out.dtype == dtype else self._whole(e)
            if whole is not None:  # converted as it is copied from the mapped file: no staging copy
                have = whole.view(whole.shape[0] if whole.dim() else 1, -1)  # [R_src, C]
                for s0, d0, n in runs:
                    flat[d0:d0 + n].copy_(have[s0:s0 + n])
                return
            if out.dtype == dtype:
                for s0, d0, n in runs:
                    self._fill(flat[d0:d0 + n], self.base + e["data_offsets"][0] + s0 * row_bytes)
                return
        per = staging.rows(row_bytes)
        i = 0
        while i < len(src):  # a block from the next kept row on, as many rows as the staging buffer holds
            r0 = int(src[i])
            j = int(torch.searchsorted(src, r0 + per))
            n = int(src[j - 1]) - r0 + 1  # up to the block's last kept row
            block = self._stage(e, r0, n, row_bytes, staging, dtype)  # [n, C]
            local, d = src[i:j] - r0, dst[i:j]
            d0 = int(d[0])
            if not bool((d == torch.arange(d0, d0 + len(d))).all()):  # padding rows in between
                flat.index_copy_(0, d, block.index_select(0, local).to(out.dtype))
            elif out.dtype == dtype:
                take(block, local, 0, flat[d0:d0 + len(d)])  # no temporary
            elif len(local) == n and bool((local == torch.arange(n)).all()):  # every staged row, once
                flat[d0:d0 + n].copy_(block)  # converted in place, no temporary
            else:
                flat[d0:d0 + len(d)].copy_(block.index_select(0, local))
            i = j

    def _read_cols(self, e, out, src, dst, dtype, row_bytes: int, staging: StagingBuffer) -> None:
        """Columns src[i] -> out columns dst[i] of every row. Where the kept columns come in long runs (a
        rank-ordered artifact's groups) each run is copied from the mapped file, every row at once: only the
        kept bytes are read, with no staging copy (that made a 0.5 slice of a 1.5B load 5-10% faster). Else a
        block of rows at a time is gathered column by column (_stage)."""
        runs = _runs(src, dst)
        whole = self._whole(e) if len(runs) * MIN_COLUMN_RUN <= len(src) else None
        if whole is not None and out.dtype == dtype:
            have, want = _ints(whole), _ints(out)  # [R, C_src], [R, C_out]
            for s0, d0, k in runs:
                want[:, d0:d0 + k] = have[:, s0:s0 + k]
            return
        if whole is not None:  # converted as it is copied
            for s0, d0, k in runs:
                out[:, d0:d0 + k].copy_(whole[:, s0:s0 + k])
            return
        rows = e["shape"][0]
        direct = out.dtype == dtype and len(dst) == out.shape[1]  # no padding column, no conversion
        per = staging.rows(row_bytes)
        for r0 in range(0, rows, per):
            n = min(per, rows - r0)
            block = self._stage(e, r0, n, row_bytes, staging, dtype)  # [n, C_src]
            if direct:
                take(block, src, 1, out[r0:r0 + n])
            elif len(src):
                out[r0:r0 + n].index_copy_(1, dst, block.index_select(1, src).to(out.dtype))

    def _stage(self, e, r0: int, n: int, row_bytes: int, staging: StagingBuffer, dtype) -> torch.Tensor:
        """Rows r0..r0+n-1 of entry `e`, [n, C] of the file's dtype: a view of the mapped file (gathered from
        there, not copied first), or read into the staging buffer where the entry cannot be mapped."""
        whole = self._whole(e)
        if whole is not None:
            return whole.view(whole.shape[0] if whole.dim() else 1, -1)[r0:r0 + n]
        buf = staging.take(n * row_bytes)
        self._fill(buf, self.base + e["data_offsets"][0] + r0 * row_bytes)
        return buf.view(dtype).view(n, -1)

    def _fill(self, t: torch.Tensor, offset: int) -> None:
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # t is contiguous: writes land in it
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ArtifactError(f"{self.path}: the file ended early; it is truncated, restore it")
            done += n

    def close(self):
        self._map = None  # views already handed out keep the mapping alive; closing the fd does not unmap it
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rewrite(src: Path, dst: Path, transform) -> None:
    """Write safetensors file `src` to `dst` with each tensor replaced by transform(name, tensor), which must keep
    its shape and dtype: the header is copied byte for byte (metadata included), the data one tensor at a time."""
    with ShardFile(src) as f:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, os.pread(f.fd, f.base, 0), 0)
            for name, e in sorted(f.entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                t = f.read(name)
                new = transform(name, t)
                if new.shape != t.shape or new.dtype != t.dtype:
                    raise ValueError(f"{name}: rewritten as {new.dtype} {list(new.shape)}, not {t.dtype} "
                                     f"{list(t.shape)}")
                data = memoryview(new.contiguous().reshape(-1).view(torch.uint8).numpy())
                done, at = 0, f.base + e["data_offsets"][0]
                while done < len(data):
                    done += os.pwrite(fd, data[done:], at + done)
            os.ftruncate(fd, os.fstat(f.fd).st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
