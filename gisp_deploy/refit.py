"""The load-time correction ("refit") of a consumer layer that lost some of its inputs: pure least-squares math.

A slice removes input columns of the layers that consume the removed structures: o_proj (its input is
heads × head_dim, head-major) and down_proj (its input is the intermediate channels). The refit replaces the
kept columns and adds a bias so that the slice's output is the best linear prediction of the dense output:

    [W'_K, b] = argmin_{W', b} E‖y − W' x_K − b‖² + λ‖[W', b] − [W_K, 0]‖²

with x̃_K = [x_K; 1]. Two variants share one solve (`solve`), and differ only in their moments:

- **ls** (`least_squares`): y = W x with x the *dense* model's input; everything comes from the dense input
  moments M = E[x̃ x̃ᵀ] (x̃ = [x; 1]): gram = M[K̃, K̃], cross = W · M[:in, K̃], K̃ = K ∪ {bias}.
- **ec**, error-correcting (`error_correcting`): y = W x_dense, but the regressors x_K come from the *pruned*
  model run on the same tokens (its earlier layers already sliced and corrected), so the refit also absorbs
  the error that reaches this layer: gram = E[x̃_K x̃_Kᵀ] (pruned), cross = W · E[x_dense x̃_Kᵀ].

The ridge λ is relative: `ridge` × the mean diagonal of the gram (the inputs' mean square), so one number
fits every layer and model. It pulls the solution toward the plain slice [W_K, 0] (not toward zero), so a
large ridge gives the uncorrected slice back and a badly conditioned gram (few calibration tokens, dead
channels) cannot blow the weights up. DEFAULT_RIDGE = 1e-3 keeps the gram positive definite in fp64
whatever the data, and costs nothing measurable on the reference model (bench/results/refit/).

Everything here is fp64 on the moments' device, Cholesky-solved; callers cast the result to the model's dtype.
"""

from __future__ import annotations

import math

import torch

DEFAULT_RIDGE = 1e-3  # relative to the gram's mean diagonal; see the module docstring


class Moments:
    """Running sums of x̃ x̃ᵀ (x̃ = [x; 1]) over tokens in fp64, or of x̃_a x̃_bᵀ for two inputs of one layer.

    `add(x)` takes [..., in] activations (any dtype; every leading dimension is tokens); `add(x, other)`
    accumulates the cross moment E[x̃ õᵀ] of two aligned streams (the dense and the pruned model's inputs)."""

    def __init__(self):
        self.sum: torch.Tensor | None = None  # [in_a + 1, in_b + 1], fp64
        self.count = 0

    @staticmethod
    def augment(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(torch.float64)  # [N, in]; in = 0: a layer with no input left
        return torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)  # [N, in + 1]

    def add(self, x: torch.Tensor, other: torch.Tensor | None = None) -> None:
        a = self.augment(x)  # [N, in_a + 1]
        b = a if other is None else self.augment(other)  # [N, in_b + 1]
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"the two streams have {a.shape[0]} and {b.shape[0]} tokens")
        step = a.T @ b  # [in_a + 1, in_b + 1]
        self.sum = step if self.sum is None else self.sum + step
        self.count += a.shape[0]

    def mean(self) -> torch.Tensor:
        """E[x̃ x̃ᵀ] (or the cross moment), [in_a + 1, in_b + 1] fp64."""
        if self.sum is None or not self.count:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count


def with_bias(kept: torch.Tensor | list[int], n_in: int) -> torch.Tensor:
    """Indices K̃ of x̃ = [x; 1] for kept inputs K: K, then the constant's index `n_in`."""
    k = torch.as_tensor(kept, dtype=torch.long).flatten()  # [k]
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= n_in):
        raise ValueError(f"kept input indices outside 0..{n_in - 1}")
    return torch.cat([k, torch.tensor([n_in], dtype=torch.long)])  # [k + 1]


def solve(cross: torch.Tensor, gram: torch.Tensor, prior: torch.Tensor,
          ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_X E‖y − X z‖² + λ‖X − prior‖² given cross = E[y zᵀ] [out, k+1], gram = E[z zᵀ] [k+1, k+1] and
    prior [out, k+1], λ = ridge × mean(diag(gram)); z's last entry is the constant 1.

    Returns (weight [out, k], bias [out]) in fp64. Raises ValueError if the regularised gram is not positive
    definite (ridge=0 on rank-deficient moments)."""
    if ridge < 0:
        raise ValueError(f"ridge={ridge}: must be >= 0")
    gram = gram.to(torch.float64)
    k1 = gram.shape[0]
    if gram.shape != (k1, k1) or cross.shape[1] != k1 or prior.shape != cross.shape:
        raise ValueError(f"shapes do not match: cross {tuple(cross.shape)}, gram {tuple(gram.shape)}, "
                         f"prior {tuple(prior.shape)}")
    lam = ridge * float(gram.diagonal().mean())
    a = gram + lam * torch.eye(k1, dtype=torch.float64, device=gram.device)  # [k+1, k+1]
    rhs = (cross.to(torch.float64) + lam * prior.to(torch.float64)).T  # [k+1, out]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info):
        raise ValueError("the input moments are not positive definite; use a ridge > 0")
    x = torch.cholesky_solve(rhs, chol).T  # [out, k+1]: X = rhs_T · A⁻¹ (A symmetric)
    return x[:, :-1], x[:, -1]


def plain(weight: torch.Tensor, kept, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The uncorrected slice as one [out, k+1] matrix: [W_K, b] (b = the layer's bias, or 0)."""
    w = weight.to(torch.float64)  # [out, in]
    k = torch.as_tensor(kept, dtype=torch.long, device=w.device)
    b = w.new_zeros(w.shape[0]) if bias is None else bias.to(torch.float64)  # [out]
    return torch.cat([w.index_select(1, k), b[:, None]], dim=1)  # [out, k + 1]


def least_squares(weight: torch.Tensor, kept, moments: torch.Tensor, bias: torch.Tensor | None = None,
                  ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The "ls" refit of one consumer layer from the dense model's input moments.

    weight [out, in] and bias [out] (or None) of the dense layer; kept: the kept input indices K (o_proj: rows
    of the kept heads, layout.head_rows; down_proj: the kept channels); moments: E[x̃ x̃ᵀ] [in+1, in+1] of its
    dense inputs (`Moments.mean()`). Returns (W'_K [out, k], b [out]) in fp64: the kept columns and a bias
    that replace the plain slice's W_K and b."""
    n_in = weight.shape[1]
    if moments.shape != (n_in + 1, n_in + 1):
        raise ValueError(f"moments of shape {tuple(moments.shape)} for a layer with {n_in} inputs "
                         f"(expected {(n_in + 1, n_in + 1)})")
    idx = with_bias(kept, n_in).to(moments.device)  # [k+1]
    m = moments.to(torch.float64)
    w = weight.to(device=m.device, dtype=torch.float64)  # [out, in]
    full = torch.cat([w, _bias_column(bias, w)], dim=1)  # [out, in+1]: y = full · x̃
    cross = full @ m.index_select(1, idx)  # [out, k+1]: E[y x̃_Kᵀ]
    gram = m.index_select(0, idx).index_select(1, idx)  # [k+1, k+1]
    return solve(cross, gram, plain(w, idx[:-1], None if bias is None else bias.to(m.device)), ridge)


def error_correcting(weight: torch.Tensor, kept, cross_moments: torch.Tensor, gram: torch.Tensor,
                     bias: torch.Tensor | None = None,
                     ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The "ec" refit: the dense output W x_dense regressed on the pruned model's kept inputs.

    weight [out, in], bias [out] | None: the dense layer; kept: K; cross_moments: E[x̃_dense x̃_Kᵀ]
    [in+1, k+1] (`Moments.add(x_dense, x_pruned[..., K])`); gram: E[x̃_K x̃_Kᵀ] [k+1, k+1] of the pruned
    model's kept inputs. Returns (W'_K [out, k], b [out]) in fp64."""
    n_in = weight.shape[1]
    k1 = len(torch.as_tensor(kept).flatten()) + 1
    if cross_moments.shape != (n_in + 1, k1) or gram.shape != (k1, k1):
        raise ValueError(f"cross moments {tuple(cross_moments.shape)} / gram {tuple(gram.shape)} do not fit "
                         f"{n_in} inputs with {k1 - 1} kept (expected {(n_in + 1, k1)} / {(k1, k1)})")
    dev = gram.device
    w = weight.to(device=dev, dtype=torch.float64)  # [out, in]
    full = torch.cat([w, _bias_column(bias, w)], dim=1)  # [out, in+1]
    cross = full @ cross_moments.to(torch.float64)  # [out, k+1]: E[y_dense x̃_Kᵀ]
    prior = plain(w, with_bias(kept, n_in)[:-1].to(dev), None if bias is None else bias.to(dev))
    return solve(cross, gram, prior, ridge)


def _bias_column(bias: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return w.new_zeros(w.shape[0], 1)  # [out, 1]
    return bias.to(device=w.device, dtype=torch.float64)[:, None]  # [out, 1]
