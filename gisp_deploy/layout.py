"""Rows and columns of dense tensors that a compact layer keeps: the one padded-gather rule.

A compact tensor is described by source positions along one dimension, -1 standing for a zero (dummy) entry:
the padding heads that even out uneven KV groups, or padding channels. Every path that builds compact weights
(the loader, vLLM's weight slicing, the shrinking model GISP scores) selects with these functions.

A padding row of q_proj, gate_proj or up_proj only feeds zero columns of o_proj / down_proj, so its values never
reach the output: the loader may take the file's next row there instead of a zero (`padding_from_file`), which
turns a padded group into one run of the file's rows it can map instead of copy.
"""

from __future__ import annotations

import re

import torch

LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def head_rows(heads, head_dim: int) -> list[int]:
    """Rows of head-major projections for `heads` (-1 heads give -1 rows): [h0*D .. h0*D+D-1, h1*D, ...]."""
    rows: list[int] = []
    for h in heads:  # whole heads at a time: a model's rows are built in C, not one by one
        rows.extend(range(h * head_dim, (h + 1) * head_dim) if h >= 0 else [-1] * head_dim)
    return rows


def consumer_inputs(lay, head_dim: int) -> dict[str, tuple[list[int], list[int]]]:
    """proj -> (dense input indices K, their positions among the compact layer's inputs) of o_proj and
    down_proj under the layout `lay` (modeling.LayerLayout): real inputs only, dummies left out. The refit of
    a slice (slicing/correction.py) and GISP's in-loop refit (pruning/refitting.py) both write through it."""
    out = {}
    for proj, src in (("o_proj", head_rows(lay.q_src, head_dim)), ("down_proj", list(lay.channels))):
        pos = [i for i, p in enumerate(src) if p >= 0]
        out[proj] = ([src[i] for i in pos], pos)
    return out


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


CANCELLED_PADDING = ("q_proj", "gate_proj", "up_proj")  # their padding outputs meet zero o_proj / down_proj columns


def padding_from_file(key: str, rows: list[int] | None) -> list[int] | None:
    """`rows` of compact tensor `key` with each padding row (-1) taken as the file's row after the one before
    it, where the padding's values cannot matter (CANCELLED_PADDING: any finite values there give the same model,
    as their consumer's columns are zero); None where `key` is another tensor or has no such padding. A
    rank-ordered artifact's padded groups then often read as one run: heads 0, 1, -1, -1, 4, ... of groups of
    four become rows of heads 0..4, ...."""
    m = LAYER_TENSOR.match(key)
    if not m or m.group(3) not in CANCELLED_PADDING or not rows or rows[0] < 0 or min(rows) >= 0:
        return None
    filled = list(rows)
    for i in range(1, len(filled)):
        if filled[i] < 0:
            filled[i] = filled[i - 1] + 1
    return filled


def source_indices(key: str, layouts, head_dim: int):
    """(rows, cols) of the dense tensor `key` that compact tensor `key` keeps, given each layer's LayerLayout:
    source positions with -1 for zero padding, or None for 'all'. Outputs of o_proj / down_proj (and their bias)
    and the per-head norms of Qwen3 are never sliced; nor is a tensor of a layer the layouts do not have (a key
    of the checkpoint that no model asks for)."""
    m = LAYER_TENSOR.match(key)
    if not m or int(m.group(1)) >= len(layouts):
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
