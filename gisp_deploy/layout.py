"""Rows and columns of dense tensors that a compact layer keeps: the one padded-gather rule.

A compact tensor is described by source positions along one dimension, -1 standing for a zero (dummy) entry:
the padding heads that even out uneven KV groups, or padding channels. Every path that builds compact weights
(the loader, vLLM's weight slicing, the shrinking model GISP scores) selects with these functions.
"""

from __future__ import annotations

import re

import torch

LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def head_rows(heads, head_dim: int) -> list[int]:
    """Rows of head-major projections for `heads` (-1 heads give -1 rows): [h0*D .. h0*D+D-1, h1*D, ...]."""
    return [h * head_dim + d if h >= 0 else -1 for h in heads for d in range(head_dim)]


def consumer_inputs(lay, head_dim: int) -> dict[str, tuple[list[int], list[int]]]:
    """proj -> (dense input indices K, their positions among the compact layer's inputs) of o_proj and
    down_proj under the layout `lay` (modeling.LayerLayout): real inputs only, dummies left out. The refit of
    a slice (slicing/correction.py) and GISP's in-loop refit (pruning/refitting.py) both write through it."""
    out = {}
    for proj, src in (("o_proj", head_rows(lay.q_src, head_dim)), ("down_proj", list(lay.channels))):
        pos = [i for i, p in enumerate(src) if p >= 0]
        out[proj] = ([src[i] for i in pos], pos)
    return out


def runs(idx: list[int]) -> list[tuple[int, int]]:
    """[2, 3, 4, 9, 10] -> [(2, 5), (9, 11)]: maximal runs of consecutive indices as half-open ranges."""
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def kept(positions: list[int]) -> list[int]:
    """The real (non-dummy) source positions, in order."""
    return [p for p in positions if p >= 0]


def spread(t: torch.Tensor, positions: list[int], dim: int) -> torch.Tensor:
    """`t` holds the kept entries along `dim`, in order: place them at the real positions, zeros at the -1 ones."""
    if all(p >= 0 for p in positions):
        return t
    shape = list(t.shape)
    shape[dim] = len(positions)
    out = t.new_zeros(shape)
    dest = torch.tensor([i for i, p in enumerate(positions) if p >= 0], dtype=torch.long, device=t.device)
    return out.index_copy_(dim, dest, t)


def select(t: torch.Tensor, positions: list[int], dim: int) -> torch.Tensor:
    """`t`'s entries at `positions` along `dim`; -1 positions are zero."""
    real = torch.tensor(kept(positions), dtype=torch.long, device=t.device)
    return spread(t.index_select(dim, real), positions, dim)


def source_indices(key: str, layouts, head_dim: int):
    """(rows, cols) of the dense tensor `key` that compact tensor `key` keeps, given each layer's LayerLayout:
    source positions with -1 for zero padding, or None for 'all'. Outputs of o_proj / down_proj (and their bias)
    and the per-head norms of Qwen3 are never sliced."""
    m = LAYER_TENSOR.match(key)
    if not m:
        return None, None
    lay = layouts[int(m.group(1))]
    proj, kind = m.group(3), m.group(4)
    if proj == "q_proj":
        return head_rows(lay.q_src, head_dim), None
    if proj in ("k_proj", "v_proj"):
        return head_rows(lay.kv_src, head_dim), None
    if proj in ("gate_proj", "up_proj"):
        return list(lay.channels), None
    if kind == "bias":
        return None, None
    if proj == "o_proj":
        return None, head_rows(lay.q_src, head_dim)
    if proj == "down_proj":
        return None, list(lay.channels)
    return None, None
