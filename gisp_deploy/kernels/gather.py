"""Ragged gathers of kept rows / kept columns of many weight matrices in one Triton launch per group."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

try:  # triton is optional: without it everything falls back to torch.index_select
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["gather_rows", "gather_cols", "use_triton", "HAS_TRITON", "interpreting"]

# Same-size integer views: the kernels move bits, so they only care about the element size.
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ALIGN_BYTES = 16  # one 128-bit vector access

# Default tiles (output tile BLOCK_R x BLOCK_C elements; 16 KiB (rows) / 8 KiB (cols) of payload
# per program for 2-byte dtypes). They can be overridden per call; bench/gpu_gather.py sweeps
# some. On an H200 (Llama-2-7B shapes, bf16) the kernels alone ran at 0.96-0.97 of copy bandwidth
# for rows and whole-head columns, and random 60% columns at 0.74 of copy (the ceiling there is
# 0.75: every source sector still has to be read); all tried tiles were within a few percent.
ROW_BLOCK_R = 8
ROW_BLOCK_BYTES = 2048  # bytes of one row chunk -> BLOCK_C = ROW_BLOCK_BYTES // element_size
ROW_NUM_WARPS = 4
COL_BLOCK_R = 16
COL_BLOCK_K = 256
COL_NUM_WARPS = 4


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (Triton's CPU interpreter) is requested."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(t: Tensor) -> bool:
    """True when the Triton path applies to tensor `t` (CUDA + triton, or the interpreter)."""
    if not HAS_TRITON:
        return False
    return bool(t.is_cuda) or interpreting()


# --------------------------------------------------------------------------------------------
# Kernel bodies. They are plain functions turned into kernels lazily (see _kernel) because
# triton.jit decides between compiled and interpreted mode when it is applied: TRITON_INTERPRET
# may be set after this module is imported. (Going back to compiled mode in a process that has
# already imported triton under TRITON_INTERPRET=1 does not work: triton fixes parts of its
# standard library at import time; the GPU test therefore runs in a subprocess.)
#
# meta (int64, on device) holds, for the L layers of one launch:
#   [0L:1L) source base addresses (table mode) | [1L:2L) destination base addresses (table mode)
#   [2L:3L) offset of the layer's indices in idx | [3L:4L) number of kept indices
#   [4L:5L) source leading dimension (cols only; row stride of the source)
#   [5L:5L+P) first tile of each layer, padded to P = 2**LOG2_P with a huge sentinel
# --------------------------------------------------------------------------------------------


def _layer_tile_body(pid, meta_ptr, L, LOG2_P: tl.constexpr):
    """(layer, tile inside that layer) of program `pid`: the largest l with tile_start[l] <= pid, by a
    branch-free binary search over the padded prefix sum."""
    layer = pid * 0
    for k in tl.static_range(LOG2_P):
        cand = layer + ((1 << LOG2_P) >> (k + 1))
        start = tl.load(meta_ptr + 5 * L + cand)
        layer = tl.where(start <= pid, cand, layer)
    return layer, pid - tl.load(meta_ptr + 5 * L + layer)


_layer_tile = None  # _layer_tile_body jitted in the current mode; set by _kernel before each launch


def _gather_rows_body(
    src_ptr,  # typed pointer: the layer's source [R, C] (per-layer mode) or a dtype carrier
    dst_ptr,  # typed pointer: the layer's output [K, C] (per-layer mode) or a dtype carrier
    idx_ptr,  # int32 [sum K_l]: concatenated kept row indices
    meta_ptr,  # int64 tables, see above
    L,  # number of layers in this launch
    C,  # columns (same for every layer of the launch); row stride of source and output
    COL_TILES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_P: tl.constexpr,
    USE_TABLE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    layer, t = _layer_tile(tl.program_id(0), meta_ptr, L, LOG2_P)
    rt = t // COL_TILES
    ct = t % COL_TILES
    n_keep = tl.load(meta_ptr + 3 * L + layer)
    idx_off = tl.load(meta_ptr + 2 * L + layer)
    if USE_TABLE:
        elem = dst_ptr.dtype.element_ty
        src = tl.load(meta_ptr + layer).to(tl.pointer_type(elem))
        dst = tl.load(meta_ptr + L + layer).to(tl.pointer_type(elem))
        if ALIGNED:
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)
    else:
        src = src_ptr
        dst = dst_ptr

    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] output rows
    rmask = rows < n_keep
    src_rows = tl.load(idx_ptr + idx_off + rows, mask=rmask, other=0).to(tl.int64)  # [BR]
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    mask = rmask[:, None] & (cols < C)[None, :]  # [BR, BC]
    vals = tl.load(src + src_rows[:, None] * C + cols[None, :], mask=mask)  # [BR, BC]
    tl.store(dst + rows.to(tl.int64)[:, None] * C + cols[None, :], vals, mask=mask)


def _gather_cols_body(
    src_ptr,  # typed pointer: the layer's source [R, C_l] (per-layer mode) or a dtype carrier
    dst_ptr,  # typed pointer: the layer's output [R, K_l] (per-layer mode) or a dtype carrier
    idx_ptr,  # int32 [sum K_l]: concatenated kept column indices
    meta_ptr,  # int64 tables, see above
    L,
    R,  # rows (same for every layer of the launch)
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOG2_P: tl.constexpr,
    USE_TABLE: tl.constexpr,
    DST_ALIGNED: tl.constexpr,  # every output base is 16-byte aligned and K_l % VEC == 0
    SRC_ALIGNED: tl.constexpr,  # every source base is 16-byte aligned
    VEC: tl.constexpr,  # elements per 16 bytes
    SORTED: tl.constexpr,  # every layer's indices strictly increase (checked or trusted on host)
):
    layer, t = _layer_tile(tl.program_id(0), meta_ptr, L, LOG2_P)
    n_keep = tl.load(meta_ptr + 3 * L + layer)  # K_l: output row stride
    idx_off = tl.load(meta_ptr + 2 * L + layer)
    ld = tl.load(meta_ptr + 4 * L + layer)  # C_l: source row stride
    if USE_TABLE:
        elem = dst_ptr.dtype.element_ty
        src = tl.load(meta_ptr + layer).to(tl.pointer_type(elem))
        dst = tl.load(meta_ptr + L + layer).to(tl.pointer_type(elem))
        if DST_ALIGNED:
            dst = tl.multiple_of(dst, 16)
            n_keep = tl.multiple_of(n_keep, VEC)
        if SRC_ALIGNED:
            src = tl.multiple_of(src, 16)
    else:
        src = src_ptr
        dst = dst_ptr
    k_tiles = (n_keep + BLOCK_K - 1) // BLOCK_K
    kt = t % k_tiles  # neighbouring programs take neighbouring column spans of the same rows
    rt = t // k_tiles

    rows = (rt * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
    rmask = rows < R
    k0 = kt * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)  # [BK] output columns
    ks = tl.max_contiguous(tl.multiple_of(ks, BLOCK_K), BLOCK_K)
    kmask = ks < n_keep
    out_ptrs = dst + rows[:, None] * n_keep + ks[None, :]  # [BR, BK] contiguous along dim 1
    # A full tile whose indices are first, first+1, ... (whole heads, dense spans) is a plain
    # 2-D copy. For strictly increasing indices the two ends tell; otherwise check them all.
    if SORTED:
        first = tl.load(idx_ptr + idx_off + k0)
        last = tl.load(idx_ptr + idx_off + tl.minimum(k0 + BLOCK_K, n_keep) - 1)
        run = (k0 + BLOCK_K <= n_keep) & (last - first == BLOCK_K - 1)
    else:
        shift = tl.load(idx_ptr + idx_off + ks, mask=kmask, other=0) - ks  # [BK]
        first = tl.min(shift, axis=0) + k0
        run = (k0 + BLOCK_K <= n_keep) & (tl.max(shift, axis=0) + k0 == first)
    if SRC_ALIGNED:
        run = run & (first % VEC == 0) & (ld % VEC == 0)
    if run:
        # (x // VEC) * VEC lets the compiler prove alignment and use vector loads.
        if SRC_ALIGNED:
            base = (first // VEC) * VEC  # == first here
            ld_a = (ld // VEC) * VEC  # == ld here
        else:
            base = first
            ld_a = ld
        cols = base.to(tl.int64) + tl.arange(0, BLOCK_K)  # [BK]
        vals = tl.load(src + rows[:, None] * ld_a + cols[None, :], mask=rmask[:, None])  # [BR, BK]
        tl.store(out_ptrs, vals, mask=rmask[:, None])
    else:
        # The gather is done on a transposed [BK, BR] tile: Triton orders threads by pointer
        # contiguity and, for a gather (contiguity 1 everywhere), puts dim 0 first, so a warp
        # reads 32 neighbouring kept columns of one source row (few cache lines per load).
        # Keeping its order different from the stores' also keeps the load at one element per
        # thread instead of inheriting the stores' 16-byte vectors (8 scattered lines per load).
        src_cols = tl.load(idx_ptr + idx_off + ks, mask=kmask, other=0)  # [BK]
        mask_t = kmask[:, None] & rmask[None, :]  # [BK, BR]
        src_t = src + src_cols.to(tl.int64)[:, None] + rows[None, :] * ld  # [BK, BR]
        vals_t = tl.load(src_t, mask=mask_t)  # [BK, BR]
        tl.store(out_ptrs, tl.trans(vals_t), mask=rmask[:, None] & kmask[None, :])  # [BR, BK]


_KERNELS: dict = {}


def _kernel(name: str):
    """The jitted (or interpreted) kernel for the current TRITON_INTERPRET mode, its helper set to the same."""
    global _layer_tile
    mode = interpreting()
    bodies = {"layer_tile": _layer_tile_body, "rows": _gather_rows_body, "cols": _gather_cols_body}
    for key in ("layer_tile", name):
        if (key, mode) not in _KERNELS:
            _KERNELS[(key, mode)] = triton.jit(bodies[key])
    _layer_tile = _KERNELS[("layer_tile", mode)]
    return _KERNELS[(name, mode)]


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _check(weights: Sequence[Tensor], keep: Sequence[Tensor]) -> None:
    if len(weights) != len(keep):
        raise ValueError(f"got {len(weights)} weights but {len(keep)} index sets")
    for i, (w, k) in enumerate(zip(weights, keep)):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] must be 2-D, got shape {tuple(w.shape)}")
        if k.dim() != 1:
            raise ValueError(f"keep[{i}] must be 1-D, got shape {tuple(k.shape)}")
        if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(f"keep[{i}] must be an integer tensor, got {k.dtype}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _log2_ceil(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def _indices_int32(ks: list, sizes: list, device: torch.device, what: str) -> tuple:
    """(the distinct index tensors of `ks` concatenated as one int32 tensor on `device` ([sum K], at least 1
    long), each layer's offset in it, whether every layer's indices strictly increase).

    A tensor passed for several layers (q, k and v rows of one layer, gate and up) is copied once.
    Indices that live on the host are checked here (a few vectorized passes, no device sync): out of
    range raises IndexError; unsorted or repeated ones are fine (the kernels then take an exact
    but slower run test). Indices already on the device are trusted to be in range and sorted,
    as the API promises: checking them would need a device sync per call.
    """
    slot: dict = {}  # id(tensor) -> its position in `uniq`
    uniq, limits, starts, offsets = [], [], [0], []
    for k, size in zip(ks, sizes):
        j = slot.get(id(k))
        if j is None:
            j = slot[id(k)] = len(uniq)
            uniq.append(k)
            limits.append(size)
            starts.append(starts[-1] + k.numel())
        elif size < limits[j]:
            limits[j] = size
        offsets.append(starts[j])
    if not all(k.device.type == "cpu" for k in uniq):
        if not all(k.device == device for k in uniq):
            uniq = [k.to(device=device, non_blocking=True) for k in uniq]
        idx = torch.cat(uniq).to(torch.int32) if starts[-1] else None
        return (idx if idx is not None else torch.zeros(1, dtype=torch.int32, device=device)), offsets, True
    is_sorted = True
    if starts[-1] == 0:
        idx = torch.zeros(1, dtype=torch.int32)
    else:
        flat = torch.cat(uniq).to(torch.int64).numpy()  # [sum K]
        ends = np.asarray(starts[1:], dtype=np.int64)
        begins = ends - np.diff(np.asarray(starts, dtype=np.int64))
        full = ends > begins  # non-empty tensors
        step_up = flat[1:] > flat[:-1]  # [sum K - 1]
        inner = ends[(ends > 0) & (ends < flat.size)]
        step_up[inner - 1] = True  # steps across tensor boundaries do not count
        is_sorted = bool(step_up.all())
        if is_sorted:  # the ends of each tensor bound it
            lo, hi = flat[begins[full]], flat[ends[full] - 1]
        else:
            lo, hi = np.minimum.reduceat(flat, begins[full]), np.maximum.reduceat(flat, begins[full])
        limit = np.asarray(limits, dtype=np.int64)[full]
        bad = (lo < 0) | (hi >= limit)
        if bad.any():
            j = int(bad.argmax())
            seg = flat[begins[full][j]:ends[full][j]]
            v = int(seg[(seg < 0) | (seg >= limit[j])][0])
            raise IndexError(f"{what} index {v} out of range for size {int(limit[j])}")
        idx = torch.from_numpy(flat.astype(np.int32))
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True), offsets, is_sorted
    return idx.to(device), offsets, is_sorted


@dataclass
class _Layers:
    """What one launch needs of each layer of a group, gathered in one pass over the layers (host time per
    layer is what a single call waits for)."""

    sizes: list  # rows: each source's row count; cols: its column count (the index bound)
    counts: list  # kept rows / columns
    lds: list  # leading dimension (columns) of each source
    tiles: list  # programs of each layer
    src_ptrs: list
    dst_ptrs: list
    src_aligned: bool  # every non-empty source starts on a 16-byte boundary
    dst_aligned: bool
    counts_aligned: bool  # every layer's kept count spans a multiple of 16 bytes


def _layers(rows: bool, ws: list, ks: list, dsts: list, esize: int, block_r: int, blocks_other: int,
            block_c: int) -> _Layers:
    """`dsts`: (data pointer, numel) of each layer's output."""
    t = _Layers([], [], [], [], [], [], True, True, True)
    for w, k, (dst, numel) in zip(ws, ks, dsts):
        n = k.numel()
        rr, cc = w.shape
        t.sizes.append(rr if rows else cc)
        t.counts.append(n)
        t.lds.append(cc)
        t.tiles.append(_cdiv(n, block_r) * blocks_other if rows else blocks_other * _cdiv(n, block_c))
        src = w.data_ptr()
        t.src_ptrs.append(src)
        t.dst_ptrs.append(dst)
        t.src_aligned &= not (src % _ALIGN_BYTES and rr and cc)
        t.dst_aligned &= not (dst % _ALIGN_BYTES and numel)
        t.counts_aligned &= (n * esize) % _ALIGN_BYTES == 0
    return t


def _meta(t: _Layers, layers: list, idx_offsets: list, table: bool, device: torch.device) -> tuple[Tensor, int, int]:
    """The kernels' per-layer table on the device, its program count and log2 of its padded length."""
    n = len(layers)
    log2_p = _log2_ceil(n)
    tile_start, acc = [], 0
    for li in layers:
        tile_start.append(acc)
        acc += t.tiles[li]
    tile_start += [2**62] * ((1 << log2_p) - n)  # sentinels: never <= a program id
    meta = torch.tensor(
        [t.src_ptrs[li] if table else 0 for li in layers]
        + [t.dst_ptrs[li] if table else 0 for li in layers]
        + idx_offsets
        + [t.counts[li] for li in layers]
        + [t.lds[li] for li in layers]
        + tile_start,
        dtype=torch.int64,
    )  # [5 * n + P]
    meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta
    return meta, acc, log2_p


def _launch(kind: str, ws: list, ks: list, outs: list, device: torch.device, *, block_r: int,
            block_c: int, num_warps: int) -> None:
    """One launch for the whole group (pointer tables), or one per layer where the interpreter
    has to copy device tensors to the host (raw addresses would then be meaningless).

    `outs` holds one output per layer, or (flat_buffer, element_offsets, numels) when all the
    outputs are slices of one buffer."""
    esize = ws[0].element_size()
    idt = _INT_VIEW[esize]
    rows = kind == "rows"
    C = ws[0].shape[1]  # rows: shared column count
    R = ws[0].shape[0]  # cols: shared row count
    blocks_other = _cdiv(C, block_c) if rows else _cdiv(R, block_r)
    if isinstance(outs, tuple):
        buf, offs, numels = outs
        base = buf.data_ptr()
        dsts = [(base + o * esize, m) for o, m in zip(offs, numels)]
        out_view = lambda li: buf[offs[li]:offs[li] + numels[li]].view(idt)  # noqa: E731
    else:
        dsts = [(o.data_ptr(), o.numel()) for o in outs]
        out_view = lambda li: outs[li].view(idt)  # noqa: E731
    t = _layers(rows, ws, ks, dsts, esize, block_r, blocks_other, block_c)
    per_layer = interpreting() and device.type != "cpu"
    if not per_layer:  # also validates host-side indices
        idx, idx_offsets, is_sorted = _indices_int32(ks, t.sizes, device, kind[:-1])
    if sum(t.tiles) == 0:
        return
    kern = _kernel(kind)

    def run(layers: list, src: Tensor, dst: Tensor, idx: Tensor, idx_offsets: list, table: bool,
            is_sorted: bool):
        meta, programs, log2_p = _meta(t, layers, idx_offsets, table, device)
        if rows:
            aligned = t.src_aligned and t.dst_aligned and (C * esize) % _ALIGN_BYTES == 0
            kern[(programs,)](src, dst, idx, meta, len(layers), C, COL_TILES=blocks_other, BLOCK_R=block_r,
                              BLOCK_C=block_c, LOG2_P=log2_p, USE_TABLE=table, ALIGNED=aligned,
                              num_warps=num_warps)
        else:
            kern[(programs,)](src, dst, idx, meta, len(layers), R, BLOCK_R=block_r, BLOCK_K=block_c,
                              LOG2_P=log2_p, USE_TABLE=table, DST_ALIGNED=t.dst_aligned and t.counts_aligned,
                              SRC_ALIGNED=t.src_aligned, VEC=max(1, _ALIGN_BYTES // esize), SORTED=is_sorted,
                              num_warps=num_warps)

    # Tensors freed after the launch are safe: the caching allocator orders reuse on the stream,
    # and pinned staging buffers are recycled only after their copy completed.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if per_layer:  # interpreter + device tensors: it copies arguments, raw addresses are void
            for li in range(len(ws)):
                if t.tiles[li]:
                    idx, offsets, srt = _indices_int32([ks[li]], [t.sizes[li]], device, kind[:-1])
                    run([li], ws[li].detach().view(idt), out_view(li), idx, offsets, False, srt)
        else:
            first = next(i for i in range(len(ws)) if t.tiles[i])  # dtype carriers (same-size ints)
            run(list(range(len(ws))), ws[first].detach().view(idt), out_view(first), idx, idx_offsets,
                True, is_sorted)


def _gather(kind: str, weights: Sequence[Tensor], keep: Sequence[Tensor], *, flat: bool,
            block_r: Optional[int], block_c: Optional[int], num_warps: Optional[int]) -> list:
    _check(weights, keep)
    dim = 0 if kind == "rows" else 1
    out: list = [None] * len(weights)
    groups: dict = {}
    for i, w in enumerate(weights):
        if not (use_triton(w) and w.element_size() in _INT_VIEW and w.layout == torch.strided):
            k = keep[i]
            out[i] = w.detach().index_select(dim, k.to(device=w.device, dtype=torch.long))
            continue
        shared = w.shape[1] if kind == "rows" else w.shape[0]
        groups.setdefault((shared, w.dtype, w.device), []).append(i)
    for (_, dtype, device), members in groups.items():
        ws = [weights[i] for i in members]
        ws = [w if w.is_contiguous() else w.detach().contiguous() for w in ws]
        ks = [keep[i] for i in members]
        if kind == "rows":
            shapes = [(k.numel(), w.shape[1]) for w, k in zip(ws, ks)]  # [K_l, C]
            br = block_r or ROW_BLOCK_R
            bc = block_c or min(1 << _log2_ceil(max(ws[0].shape[1], 1)),
                                max(16, ROW_BLOCK_BYTES // ws[0].element_size()))
            nw = num_warps or ROW_NUM_WARPS
        else:
            shapes = [(w.shape[0], k.numel()) for w, k in zip(ws, ks)]  # [R, K_l]
            br, bc, nw = block_r or COL_BLOCK_R, block_c or COL_BLOCK_K, num_warps or COL_NUM_WARPS
        if flat:
            numels = [a * b for a, b in shapes]
            offs = [0]
            for n in numels:
                offs.append(offs[-1] + n)
            buf = torch.empty(offs[-1], dtype=dtype, device=device)  # [sum numel]
            _launch(kind, ws, ks, (buf, offs, numels), device, block_r=br, block_c=bc, num_warps=nw)
            outs = [buf[o:o + n].view(shp) for o, n, shp in zip(offs, numels, shapes)]  # after launch
        else:
            outs = [torch.empty(shp, dtype=dtype, device=device) for shp in shapes]
            _launch(kind, ws, ks, outs, device, block_r=br, block_c=bc, num_warps=nw)
        for i, o in zip(members, outs):
            out[i] = o
    return out


def gather_rows(weights: Sequence[Tensor], keep: Sequence[Tensor], *, flat: bool = False,
                block_r: Optional[int] = None, block_c: Optional[int] = None,
                num_warps: Optional[int] = None) -> list:
    """[w.index_select(0, k) for w, k in zip(weights, keep)] in one launch per (C, dtype, device).

    weights[i] is [R_i, C]; keep[i] is a 1-D integer tensor of kept row indices, sorted (strictly
    increasing), possibly empty. Returns contiguous [len(keep[i]), C] tensors, bit-exact,
    detached.
    flat=False: each output owns its storage. flat=True: the outputs of one group are views of one
    buffer (one allocation instead of one per layer: less host time per call, but the tensors
    share storage, which e.g. safetensors.save_file refuses and which stays alive while any lives).
    Indices on the host are checked: out of range raises IndexError, unsorted or repeated ones
    still give exact results. Indices already on the GPU are trusted (in range, and for
    gather_cols strictly increasing), since checking them would cost a device sync.
    block_r / block_c / num_warps override the tile (benchmarking).
    """
    return _gather("rows", weights, keep, flat=flat, block_r=block_r, block_c=block_c,
                   num_warps=num_warps)


def gather_cols(weights: Sequence[Tensor], keep: Sequence[Tensor], *, flat: bool = False,
                block_r: Optional[int] = None, block_k: Optional[int] = None,
                num_warps: Optional[int] = None) -> list:
    """[w.index_select(1, k) for w, k in zip(weights, keep)] in one launch per (R, dtype, device).

    weights[i] is [R, C_i]; keep[i] is a 1-D integer tensor of kept column indices, sorted (that
    makes the per-row gathers coalesce and lets runs of whole heads go as plain copies), possibly
    empty. Returns contiguous [R, len(keep[i])] tensors, bit-exact, detached. `flat`, index
    checks and tile overrides as in gather_rows.
    """
    return _gather("cols", weights, keep, flat=flat, block_r=block_r, block_c=block_k,
                   num_warps=num_warps)
