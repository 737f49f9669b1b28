"""Load-time correction of a compact slice (`load(..., refit="ls" | "ec")`), streamed layer by layer.

The artifact stores the calibration windows prune scored on (artifact.STATISTICS, 128 KB for 128 × 256).
At load time the dense model is run over them one decoder layer at a time — each dense layer read from the
checkpoint, used, dropped — so memory stays at the compact model plus one dense layer, the windows' hidden
states and one layer's moments. Per layer the kept columns of o_proj and down_proj and a bias are refitted
(gisp_deploy/refit.py):

- ls: from the dense inputs' moments E[x̃ x̃ᵀ] alone; one dense pass per layer.
- ec: the dense output regressed on the *slice's* inputs, the slice's earlier layers (and this layer's
  o_proj before its down_proj) already corrected: two dense and three compact passes per layer.
- ecr: as ec, and the target also holds the residual stream's discrepancy where the layer adds to it
  (dense minus slice, before attention / before the MLP): each layer undoes the error that reached it.

Padding (dummy heads / channels, -1 in the layout) keeps zero columns; only real inputs are refitted.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ..layout import consumer_inputs
from ..refit import DEFAULT_RIDGE, Moments, error_correcting, least_squares

_NOTICED: set = set()
BATCH = 16  # windows per pass: bounds the activations held beyond the hidden states
# ls moments depend on the dense model and the windows only, not on the slice: those of the last artifact are
# kept for its next slice (deploy many) when they are small (the reference model's: 76 MB); a 7B's (33 GB in
# fp64) never are.
CACHE_BYTES = 512 << 20
_LS_CACHE: dict = {"key": None, "moments": {}}


def statistics_or_notice(artifact, refit: str):
    """The artifact's calibration windows, or None (said once per artifact) when it has none."""
    if refit == "none":
        return None
    windows = artifact.statistics()
    if windows is None and str(artifact.path) not in _NOTICED:
        _NOTICED.add(str(artifact.path))
        sys.stderr.write(f"notice: {artifact.path} records no calibration statistics (written before gisp-deploy "
                         f"stored them); loaded without the {refit!r} correction. Re-run `gisp-deploy prune` to "
                         "record them.\n")
    return windows


def refit_record(name: str, ridge: float, artifact) -> dict:
    """What a corrected slice's config records (`gisp_refit`)."""
    return {"name": name, "ridge": ridge, "statistics_sha256": artifact.manifest["statistics"]["sha256"]}


@torch.no_grad()
def correct(model: nn.Module, reader, dense_config, layouts, windows, refit: str, ridge: float = DEFAULT_RIDGE,
            head_dim: int | None = None, cache_key=None) -> None:
    """Refit o_proj / down_proj of every layer of the compact `model` in place (module docstring). `cache_key`
    (what pins the dense weights and windows, e.g. the artifact's digest) lets ls reuse the moments of the last
    call with the same key when they fit CACHE_BYTES."""
    if refit not in ("ls", "ec", "ecr"):
        raise ValueError(f"refit={refit!r}: choose ls, ec or ecr")
    head_dim = head_dim or model.config.head_dim
    ids, mask = windows
    dev, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    stream = _Stream(model, ids.to(dev), mask.to(dev), dtype)
    key = (cache_key, str(dev), str(dtype))
    cached = _LS_CACHE["moments"] if refit == "ls" and cache_key is not None and _LS_CACHE["key"] == key else None
    dense_h = None if cached else stream.embed()  # [N, T, H]
    slice_h = None if refit == "ls" else dense_h.clone()
    computed: dict | None = {} if cache_key is not None and not cached else None
    for layer, lay in enumerate(layouts):
        dense = _dense_layer(reader, model, dense_config, layer, dev, dtype)
        compact = model.model.layers[layer]
        inputs = consumer_inputs(lay, head_dim)
        if refit == "ls":
            moments = cached[layer] if cached else stream.dense_moments(dense, dense_h)  # advances dense_h
            if computed is not None:  # kept for the cache only while they fit it: a 7B's never are
                computed[layer] = moments
                if sum(m.numel() * m.element_size() for ms in computed.values() for m in ms.values()) > CACHE_BYTES:
                    computed = None
            for proj in ("o_proj", "down_proj"):
                w, b = _dense_params(dense, proj)
                k, pos = inputs[proj]
                _apply(compact, proj, pos, *least_squares(w, k, moments[proj], bias=b, ridge=ridge))
        else:
            for proj in ("o_proj", "down_proj"):
                w, b = _dense_params(dense, proj)
                k, pos = inputs[proj]
                cross, gram, residual = stream.paired_moments(dense, compact, proj, dense_h, slice_h, k, pos,
                                                              residual=refit == "ecr")
                _apply(compact, proj, pos, *error_correcting(w, k, cross, gram, bias=b, ridge=ridge,
                                                             residual_cross=residual))
            stream.advance(dense, dense_h)
            stream.advance(compact, slice_h)
        del dense
    if refit == "ls" and cache_key is not None and not cached and computed is not None:
        _LS_CACHE.update(key=key, moments=computed)


def _dense_params(dense: nn.Module, proj: str):
    lin = dense.self_attn.o_proj if proj == "o_proj" else dense.mlp.down_proj
    return lin.weight, lin.bias


def _consumer(block: nn.Module, proj: str):
    return block.self_attn.o_proj if proj == "o_proj" else block.mlp.down_proj


def _apply(compact: nn.Module, proj: str, pos: list[int], weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write the refitted kept columns (at their compact positions) and the bias into the compact layer."""
    lin = _consumer(compact, proj)
    if lin is None:
        raise ValueError(f"{proj} of a corrected slice has no bias to hold the correction; build it with gisp_refit")
    if hasattr(lin, "weight"):
        cols = torch.tensor(pos, dtype=torch.long, device=lin.weight.device)
        lin.weight.index_copy_(1, cols, weight.to(lin.weight))  # [out, k] into [out, in_compact]
    lin.bias.copy_(bias.to(lin.bias))


def _dense_layer(reader, model: nn.Module, config, layer: int, device, dtype) -> nn.Module:
    """Decoder layer `layer` of the dense model, its weights read from the checkpoint (the family's class)."""
    cls = type(model.model.layers[layer])  # shrinking resizes modules inside it; the class is the family's
    with torch.device("meta"):
        block = cls(config, layer)
    prefix = f"model.layers.{layer}."
    sd = {}
    for k in block.state_dict():
        sd[k] = torch.empty(reader.shape(prefix + k), dtype=dtype)
        reader.read_into(prefix + k, sd[k])  # converted to `dtype` while read
        sd[k] = sd[k].to(device)
    block.load_state_dict(sd, assign=True)
    return block.eval()


class _Stream:
    """The calibration windows' hidden states through one decoder layer at a time, in batches of BATCH."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
        self.model, self.ids, self.mask, self.dtype = model, ids, mask, dtype
        n, t = ids.shape
        self.positions = torch.arange(t, device=ids.device)[None].expand(n, t)  # [N, T]

    def embed(self) -> torch.Tensor:
        return self.model.model.embed_tokens(self.ids)  # [N, T, H]

    def _batches(self):
        for i in range(0, self.ids.shape[0], BATCH):
            sl = slice(i, i + BATCH)
            m = self.mask[sl]  # [B, T]
            causal = torch.ones(m.shape[1], m.shape[1], dtype=torch.bool, device=m.device).tril()  # [T, T]
            allowed = causal[None, None] & m[:, None, None, :]  # [B, 1, T, T]
            allowed |= torch.eye(m.shape[1], dtype=torch.bool, device=m.device)  # padded rows attend to themselves
            additive = torch.zeros(allowed.shape, dtype=self.dtype, device=m.device)
            additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            yield sl, m, additive

    def _run(self, block: nn.Module, h: torch.Tensor, sl, additive) -> torch.Tensor:
        pos = self.positions[sl]
        emb = self.model.model.rotary_emb(h[sl], position_ids=pos)
        return block(h[sl], attention_mask=additive, position_ids=pos, position_embeddings=emb)

    def advance(self, block: nn.Module, h: torch.Tensor) -> None:
        """h <- block(h), batch by batch, in place."""
        for sl, _, additive in self._batches():
            h[sl] = self._run(block, h, sl, additive)

    def dense_moments(self, dense: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """E[x̃ x̃ᵀ] of the dense layer's o_proj and down_proj inputs over the windows' real tokens; h advances."""
        sums = {"o_proj": Moments(), "down_proj": Moments()}
        current = {}
        hooks = [_consumer(dense, p).register_forward_pre_hook(
            lambda _m, args, p=p: sums[p].add(args[0][current["mask"]])) for p in sums]
        try:
            for sl, m, additive in self._batches():
                current["mask"] = m
                h[sl] = self._run(dense, h, sl, additive)
        finally:
            for hk in hooks:
                hk.remove()
        return {p: s.mean() for p, s in sums.items()}

    def paired_moments(self, dense, compact, proj: str, dense_h, slice_h, kept: list[int], pos: list[int],
                       residual: bool = False):
        """(E[x̃_dense x̃_Kᵀ] [in+1, k+1], E[x̃_K x̃_Kᵀ] [k+1, k+1], with `residual` E[(r_dense − r_slice) x̃_Kᵀ]
        [H, k+1] else None) of `proj`'s inputs, the slice's (x_K) at its real positions `pos`; r: the residual
        stream `proj` adds to (the layer's input for o_proj, the post-attention one for down_proj); neither h
        advances."""
        cross, gram, gap = Moments(), Moments(), Moments()
        seen: dict[str, torch.Tensor] = {}
        cols = torch.tensor(pos, dtype=torch.long, device=dense_h.device)
        hooks = [_consumer(dense, proj).register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("dense", args[0][seen["mask"]]))]
        if residual:  # the residual stream where proj's output joins it: what its norm reads
            for name, block in (("r_dense", dense), ("r_slice", compact)):
                norm = block.input_layernorm if proj == "o_proj" else block.post_attention_layernorm
                hooks.append(norm.register_forward_pre_hook(
                    lambda _m, args, name=name: seen.__setitem__(name, args[0][seen["mask"]])))
        target = _consumer(compact, proj)
        if hasattr(target, "weight"):  # a layer left without heads / channels has no input to see: x_K is empty
            hooks.append(target.register_forward_pre_hook(
                lambda _m, args: seen.__setitem__("slice", args[0][seen["mask"]].index_select(-1, cols))))
        try:
            for sl, m, additive in self._batches():
                seen.clear()
                seen["mask"] = m
                self._run(dense, dense_h, sl, additive)
                self._run(compact, slice_h, sl, additive)
                x_d = seen["dense"]  # [n, in]
                x_k = seen.get("slice", x_d[:, :0])  # [n, k]
                cross.add(x_d, x_k)
                gram.add(x_k)
                if residual:
                    gap.add(seen["r_dense"] - seen["r_slice"], x_k)
        finally:
            for hk in hooks:
                hk.remove()
        return cross.mean(), gram.mean(), gap.mean()[:-1] if residual else None
