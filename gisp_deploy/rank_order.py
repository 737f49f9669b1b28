"""The rank-ordered layout: every layer's heads and channels renumbered in the order a ranking keeps them.

Renumbering channels (gate / up rows with down_proj's columns), KV groups (k / v rows with their query heads) and
query heads within their group does not change what the model computes. Numbered so that the structure removed
last comes first, every slice of the ranking keeps a prefix: the first channels of each layer, its first KV
groups and the first query heads of each group. A slice of a rank-ordered artifact is then a contiguous row
prefix of gate / up / k / v, a strided column prefix of down_proj, and (when its groups are even) one run of q
rows and o_proj columns: the CPU loader maps those straight from the file instead of copying them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .layout import select, source_indices
from .modeling import LayerLayout
from .ranking import CHANNEL, HEAD, Ranking

LAYOUT_KEY = "layout"  # manifest key; value RANK_ORDERED for an artifact written in this layout
RANK_ORDERED = "rank_ordered"


def layer_orders(ranking: Ranking) -> list[LayerLayout]:
    """Per layer, the dense source of every position of the rank-ordered layer (a full-width LayerLayout):
    channels and KV groups by how late the ranking removes them (never removed first), query heads likewise
    within their group. Ties (structures the run never removed) keep the ranking's order."""
    shape = ranking.shape
    at = np.arange(len(ranking))  # [S] position of each structure in removal order
    g = shape.group_size
    orders = []
    for layer in range(shape.num_layers):
        mine = ranking.layer == layer
        ch = mine & (ranking.kind == CHANNEL)
        channels = ranking.index[ch][np.argsort(-at[ch], kind="stable")]  # [I] last removed first
        hd = mine & (ranking.kind == HEAD)
        idx, when = ranking.index[hd], at[hd]
        if ranking.unit == "kv_group":
            groups = idx[np.argsort(-when, kind="stable")]  # [KV]
            heads = [kv * g + j for kv in groups for j in range(g)]
        else:
            head_when = np.empty(shape.num_heads, dtype=np.int64)
            head_when[idx] = when  # [H] removal position of each query head
            group_last = head_when.reshape(shape.num_kv_heads, g).max(1)  # [KV] a group goes with its last head
            groups = np.argsort(-group_last, kind="stable")
            heads = [int(kv) * g + int(j) for kv in groups for j in np.argsort(-head_when[kv * g:(kv + 1) * g],
                                                                                kind="stable")]
        orders.append(LayerLayout(q_src=tuple(int(h) for h in heads), kv_src=tuple(int(k) for k in groups),
                                  channels=tuple(int(c) for c in channels)))
    return orders


def reordered_ranking(ranking: Ranking, orders: list[LayerLayout]) -> Ranking:
    """The same removals in the same order, each naming its structure's index in the rank-ordered layout."""
    index = ranking.index.copy()
    for layer, lay in enumerate(orders):
        heads = lay.kv_src if ranking.unit == "kv_group" else lay.q_src
        for kind, src in ((HEAD, heads), (CHANNEL, lay.channels)):
            new = np.empty(len(src), dtype=index.dtype)
            new[np.asarray(src, dtype=np.int64)] = np.arange(len(src))  # dense index -> rank-ordered index
            sel = (ranking.layer == layer) & (ranking.kind == kind)
            index[sel] = new[ranking.index[sel]]
    return dataclasses.replace(ranking, index=index)


def permuted(name: str, tensor, orders: list[LayerLayout], head_dim: int):
    """Dense tensor `name` in the rank-ordered layout (the same tensor for everything that is not renumbered)."""
    rows, cols = source_indices(name, orders, head_dim)
    if rows is not None:
        return select(tensor, rows, 0)
    if cols is not None:
        return select(tensor, cols, 1)
    return tensor


def is_rank_ordered(ranking: Ranking) -> bool:
    """Whether every prefix of the ranking keeps a prefix of each layer's channels, KV groups and query heads
    within their group (what `layer_orders` makes; a renumbering that is already the identity)."""
    return all(lay.channels == tuple(range(len(lay.channels))) and lay.q_src == tuple(range(len(lay.q_src)))
               for lay in layer_orders(ranking))
