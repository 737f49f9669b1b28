"""The refit's math against an independent least-squares solve on explicit samples."""

from __future__ import annotations

import pytest
import torch

from gisp_deploy.refit import Moments, error_correcting, least_squares, solve


def _samples(n=400, n_in=12, n_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=g,
                                                                            dtype=torch.float64)
    x = x + torch.randn(n_in, generator=g, dtype=torch.float64)  # a non-zero mean: the bias has work to do
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    return x, w, b


def _lstsq(inputs, targets):
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1)  # [N, k+1]
    sol = torch.linalg.lstsq(design, targets).solution.T  # [out, k+1]
    return sol[:, :-1], sol[:, -1]


@pytest.mark.parametrize("with_layer_bias", [False, True])
def test_least_squares_matches_lstsq(with_layer_bias):
    x, w, b = _samples()
    bias = b if with_layer_bias else None
    kept = [0, 3, 4, 7, 11]
    mom = Moments()
    for chunk in x.split(64):  # accumulated in pieces, as hooks do
        mom.add(chunk.to(torch.float32).to(torch.float64))
    y = x @ w.T + (b if with_layer_bias else 0)  # [N, out]
    want_w, want_b = _lstsq(x[:, kept], y)
    got_w, got_b = least_squares(w, kept, mom.mean(), bias=bias, ridge=0.0)
    torch.testing.assert_close(got_w, want_w, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(got_b, want_b, rtol=1e-7, atol=1e-8)


def test_error_correcting_matches_lstsq_on_other_inputs():
    x, w, b = _samples()
    g = torch.Generator().manual_seed(1)
    pruned = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # the pruned model's inputs
    kept = [1, 2, 5, 6, 9]
    cross, gram = Moments(), Moments()
    cross.add(x, pruned[:, kept])
    gram.add(pruned[:, kept])
    want_w, want_b = _lstsq(pruned[:, kept], x @ w.T + b)
    got_w, got_b = error_correcting(w, kept, cross.mean(), gram.mean(), bias=b, ridge=0.0)
    torch.testing.assert_close(got_w, want_w, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(got_b, want_b, rtol=1e-7, atol=1e-8)


def test_error_correcting_on_dense_inputs_is_least_squares():
    x, w, _ = _samples()
    kept = [0, 2, 4, 6, 8, 10]
    full, cross, gram = Moments(), Moments(), Moments()
    full.add(x)
    cross.add(x, x[:, kept])
    gram.add(x[:, kept])
    a = least_squares(w, kept, full.mean(), ridge=1e-3)
    e = error_correcting(w, kept, cross.mean(), gram.mean(), ridge=1e-3)
    torch.testing.assert_close(a, e)


def test_ridge_pulls_toward_the_plain_slice():
    x, w, b = _samples()
    kept = [0, 1, 2]
    mom = Moments()
    mom.add(x)
    w0, b0 = least_squares(w, kept, mom.mean(), bias=b, ridge=0.0)
    w_big, b_big = least_squares(w, kept, mom.mean(), bias=b, ridge=1e9)
    torch.testing.assert_close(w_big, w[:, kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_big, b, rtol=1e-5, atol=1e-6)
    assert (w0 - w[:, kept]).abs().max() > 1e-2  # the exact refit does move the weights


def test_keeping_everything_gives_the_layer_back():
    x, w, b = _samples()
    mom = Moments()
    mom.add(x)
    got_w, got_b = least_squares(w, list(range(w.shape[1])), mom.mean(), bias=b, ridge=0.0)
    torch.testing.assert_close(got_w, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_b, b, rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_refused():
    x, w, _ = _samples(n=4)  # fewer tokens than inputs: rank-deficient moments
    mom = Moments()
    mom.add(x)
    with pytest.raises(ValueError, match="positive definite"):
        least_squares(w, list(range(12)), mom.mean(), ridge=0.0)
    least_squares(w, list(range(12)), mom.mean())  # the default ridge makes it solvable
    with pytest.raises(ValueError, match="expected"):
        least_squares(w, [0], mom.mean()[:5, :5])
    with pytest.raises(ValueError, match="outside"):
        least_squares(w, [12], mom.mean())
    with pytest.raises(ValueError, match="ridge"):
        solve(torch.zeros(1, 2), torch.eye(2), torch.zeros(1, 2), ridge=-1)
