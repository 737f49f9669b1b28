"""Copy a compact state dict from host memory onto a GPU at host bandwidth: threads, pinned buffers, streams."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch

from ..safetensors_file import BITS

HOST_THREADS = max(2, min(8, os.cpu_count() or 2))  # host copy threads: one per CPU, 2 to 8 (page faults and
#                                                      copies run in parallel; numpy releases the GIL)
CHUNK_BYTES = 32 << 20  # each thread's two pinned buffers: one filled while the other's copy to the GPU runs


def upload(tensors: dict[str, torch.Tensor], device: torch.device, *, threads: int = HOST_THREADS,
           chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """`tensors` (host tensors, views of mapped files included, strided or not) copied bit for bit onto `device`,
    same keys, shapes and dtypes. Each of `threads` threads copies its share (balanced by bytes, largest first)
    row block by row block into one of two pinned buffers (numpy: the GIL is released, mapped pages fault in on
    every thread at once), and from there to the device on a stream of its own while it fills the other buffer.
    A host tensor is read once and never kept: host memory grows by the pinned buffers only.
    Off CUDA the same blocks go through plain buffers (the path the CPU tests check)."""
    out = {key: torch.empty(t.shape, dtype=t.dtype, device=device) for key, t in tensors.items()}
    parts = balanced(list(tensors), lambda key: tensors[key].nbytes, threads)
    row_max = max((_row_bytes(t) for t in tensors.values()), default=0)
    buffer_bytes = max(chunk_bytes, row_max)
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(_upload_part, [(tensors[k], out[k]) for k in part], device, buffer_bytes)
                  for part in parts if part]:
            f.result()
    return out


def _upload_part(pairs: list, device: torch.device, buffer_bytes: int) -> None:
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied = [None, None]  # the event after each buffer's last copy to the device
    k = 0
    with torch.cuda.stream(stream) if cuda else nullcontext():
        for src, dst in pairs:
            if src.dim() == 0:
                dst.copy_(src)
                continue
            per_block = max(1, buffer_bytes // max(1, _row_bytes(src)))
            for r0 in range(0, src.shape[0], per_block):
                b = k % 2
                k += 1
                if copied[b] is not None:
                    copied[b].synchronize()  # its last copy has left the buffer
                block = src[r0:r0 + per_block]  # [n, ...], a view (of a mapped file: read here)
                staged = buffers[b][:block.numel() * block.element_size()].view(block.dtype).view(block.shape)
                bits = BITS[block.element_size()]
                np.copyto(staged.view(bits).numpy(), block.view(bits).numpy())
                dst[r0:r0 + per_block].copy_(staged, non_blocking=cuda)
                if cuda:
                    copied[b] = torch.cuda.Event()
                    copied[b].record(stream)
    if cuda:
        stream.synchronize()


def balanced(items: list, nbytes, parts: int) -> list[list]:
    """`items` split into `parts` lists of about equal `nbytes(item)` in all: largest first, each to the list with
    the fewest bytes so far (lists may be empty)."""
    out, loads = [[] for _ in range(parts)], [0] * parts
    for item in sorted(items, key=lambda i: -nbytes(i)):
        w = loads.index(min(loads))
        out[w].append(item)
        loads[w] += nbytes(item)
    return out


def _row_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size() if t.dim() and t.shape[0] else 0
