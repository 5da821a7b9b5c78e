"""FASP's closed forms on small matrices: the column score, the anchored least-squares restore
(via the shared lstsq_restore) and the reconstruction error computed from a Gram matrix."""

from __future__ import annotations

import pytest
import torch

from slicekit.linalg import anchored_gram, column_scores, lstsq_restore, reconstruction_error


def _data(seed: int = 0, n: int = 200, d_in: int = 8, d_out: int = 5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix  # correlated columns
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return x, w


def _sq_err(x, w, keep, v):
    return float(((x @ w.T - x[:, keep] @ v.T) ** 2).sum())


def test_column_score_is_l1_of_weight_column_times_l2_of_input_column():
    x, w = _data()
    s = column_scores(w, x.T @ x)
    want = w.abs().sum(0) * x.norm(dim=0)
    assert torch.allclose(s, want, rtol=1e-12)


def test_reconstruction_error_from_gram_matches_explicit():
    x, w = _data(1)
    keep = torch.tensor([0, 2, 3, 7])
    v = torch.randn(5, 4, dtype=torch.float64)
    assert reconstruction_error(w, x.T @ x, keep, v) == pytest.approx(_sq_err(x, w, keep, v), rel=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0])
def test_restore_is_exact_when_nothing_is_removed(damping):
    x, w = _data(2)
    keep = torch.arange(8)
    gram = x.T @ x
    v = lstsq_restore(w, anchored_gram(gram, keep, damping), keep)
    assert torch.allclose(v, w, atol=1e-10)


def test_undamped_restore_is_the_least_squares_solution():
    x, w = _data(3)
    keep = torch.tensor([1, 2, 4, 6, 7])
    v = lstsq_restore(w, anchored_gram(x.T @ x, keep, 0.0), keep)
    want = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    assert torch.allclose(v, want, atol=1e-9)


def test_anchored_damping_matches_the_closed_form():
    x, w = _data(4)
    keep = torch.tensor([0, 3, 5])
    gram = x.T @ x
    gss = gram[keep][:, keep]
    delta = 0.1 * torch.diagonal(gss).mean()
    want = (w @ gram[:, keep] + delta * w[:, keep]) @ torch.linalg.inv(gss + delta * torch.eye(3, dtype=torch.float64))
    assert torch.allclose(lstsq_restore(w, anchored_gram(gram, keep, 0.1), keep), want, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.5, 10.0])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_restore_is_never_worse_than_plain_removal(damping, seed):
    x, w = _data(seed)
    keep = torch.sort(torch.randperm(8, generator=torch.Generator().manual_seed(seed))[:4]).values
    v = lstsq_restore(w, anchored_gram(x.T @ x, keep, damping), keep)
    restored, plain = _sq_err(x, w, keep, v), _sq_err(x, w, keep, w[:, keep])
    assert restored <= plain * (1 + 1e-12)
    if damping <= 0.01:
        assert restored < 0.9 * plain  # and, lightly damped, clearly better on correlated inputs
