"""GISP with the least-squares refit in the loop (`prune --in-loop-refit ls`).

After every step's removals, the consumers of the removed structures (o_proj of the heads, down_proj of the
channels) are refitted by least squares from the *dense* model's input moments E[x̃ x̃ᵀ] (refit.least_squares,
the load-time `--refit ls`), so the next step's gradients are taken on the corrected model and the ranking
orders what a refitted slice keeps. The moments come from one forward pass over the calibration windows
before the first step (about a third of one scoring pass); they cost (H+1)² + (I+1)² fp64 values per prunable
layer on the model's device (10 MB per layer on the reference model, 1.1 GB per layer for a 7B shape).

The load-time ls refit from dense moments depends only on the kept set, the windows and the ridge, and the
artifact stores the same windows: so at every step boundary (0.2 / 0.3 / 0.4 / 0.5 for 20 steps to 0.5 under
the params schedule) `load(artifact, s, refit="ls")` computes what the in-loop model computed, up to the
rounding of two ways of running the same dense forward (tests/pruning/test_refitting.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..families import ModelShape
from ..layout import consumer_inputs, head_rows
from ..modeling import LayerLayout
from ..plan import kept_structures
from ..refit import Moments, least_squares
from .scoring import consumer_input_pass

CONSUMERS = ("o_proj", "down_proj")


def _consumer(block: nn.Module, proj: str):
    return block.self_attn.o_proj if proj == "o_proj" else block.mlp.down_proj


class LoopRefit:
    """The dense consumers and their input moments for `layers`, and the refit that rewrites them in a model
    (masked: full width, removed columns zero; compact: `shrinking`'s layouts) after each step."""

    def __init__(self, model: nn.Module, shape: ModelShape, unit: str, layers, ridge: float):
        self.shape, self.unit, self.layers, self.ridge = shape, unit, list(layers), ridge
        self.dense: dict[tuple[int, str], torch.Tensor] = {}  # (layer, proj) -> dense weight [out, in]
        self.moments: dict[tuple[int, str], torch.Tensor] = {}  # (layer, proj) -> E[x̃ x̃ᵀ] [in+1, in+1]
        full = kept_structures(shape, unit, [])
        self.applied = {layer: full[layer] for layer in self.layers}  # layer -> kept set its consumers fit
        for layer in self.layers:
            block = model.model.layers[layer]
            for proj in CONSUMERS:
                lin = _consumer(block, proj)
                if lin.bias is not None:
                    raise ValueError(f"{proj} has a bias of its own; the in-loop refit is for bias-free consumers")
                self.dense[layer, proj] = lin.weight.detach().clone()
                # the correction's bias: zero until the first refit; the shrinking model carries it along
                lin.bias = nn.Parameter(lin.weight.new_zeros(lin.out_features), requires_grad=False)

    def record(self, model: nn.Module, calib, batch_size: int, progress=None, reduce=None) -> None:
        """The dense input moments of every refitted consumer: one forward pass (the model must be dense).
        `reduce` (data parallel: distributed.Ranks.sum) adds up the sums of all processes' shares."""
        sums = {key: Moments() for key in self.dense}
        consumer_input_pass(model, self.shape, calib, batch_size, lambda l, p, x: sums[l, p].add(x), progress,
                            self.layers)
        totals = [m.sum for m in sums.values()]  # [in+1, in+1] fp64 each
        count = torch.tensor([float(next(iter(sums.values())).count)], dtype=torch.float64, device=totals[0].device)
        if reduce is not None:
            reduce([*totals, count])
        self.moments = {key: total / count for key, total in zip(sums, totals)}

    @torch.no_grad()
    def apply(self, model: nn.Module, removed, layouts: list[LayerLayout] | None = None) -> None:
        """Refit the consumers of every layer whose kept set changed since the last call. `removed`: all
        removals so far; `layouts`: the shrinking model's (compact), None for the masked model (full width)."""
        kept = kept_structures(self.shape, self.unit, removed)
        hd = self.shape.head_dim
        for layer in self.layers:
            if self.applied.get(layer) == kept[layer]:
                continue
            heads, channels = kept[layer]
            if layouts is None:  # masked: a kept input sits at its source index
                inputs = {"o_proj": (head_rows(heads, hd),) * 2, "down_proj": (list(channels),) * 2}
            else:
                inputs = consumer_inputs(layouts[layer], hd)
            block = model.model.layers[layer]
            for proj in CONSUMERS:
                source, positions = inputs[proj]
                weight, bias = least_squares(self.dense[layer, proj], source, self.moments[layer, proj],
                                             ridge=self.ridge)  # [out, k], [out] fp64
                lin = _consumer(block, proj)  # a BiasOnly once the layer lost every head / channel
                if positions:
                    cols = torch.tensor(positions, dtype=torch.long, device=lin.weight.device)
                    lin.weight.index_copy_(1, cols, weight.to(lin.weight))
                lin.bias.copy_(bias.to(lin.bias))
            self.applied[layer] = kept[layer]


def refitted_layers(shape: ModelShape, protected) -> list[int]:
    """The layers whose consumers the in-loop refit rewrites: every prunable one."""
    return [l for l in range(shape.num_layers) if l not in set(protected)]
