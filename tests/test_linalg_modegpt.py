"""MoDeGPT's closed forms on small matrices: ridge leverage scores, Nyström selection with
least-squares restoration, CR scores with rotary pairing, whitened SVD."""

from __future__ import annotations

import itertools

import pytest
import torch

from slicekit.linalg import (
    cr_scores,
    lstsq_restore,
    nystrom_select,
    ridge_leverage_scores,
    select_qk_dims,
    sqrt_and_inv_sqrt,
    whitened_svd,
)


def _acts(seed: int = 0, n: int = 400, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d, dtype=torch.float64)  # decaying energy, correlated columns
    mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ mix


def _lstsq_error(x, w, keep, v):
    return float(((x @ w.T - x[:, keep] @ v.T) ** 2).sum())


def test_ridge_leverage_scores_match_the_definition():
    x = _acts(1)
    c = x.T @ x
    lam = 0.05 * torch.diagonal(c).mean()
    want = torch.diagonal(c @ torch.linalg.inv(c + lam * torch.eye(c.shape[0], dtype=c.dtype)))
    got = ridge_leverage_scores(c, 0.05)
    assert torch.allclose(got, want, atol=1e-10)
    assert (got >= 0).all() and (got <= 1).all()


def test_nystrom_select_keeps_the_top_scores_in_ascending_order():
    x = _acts(2)
    c = x.T @ x
    keep = nystrom_select(c, 5, 0.1)
    scores = ridge_leverage_scores(c, 0.1)
    assert keep.tolist() == sorted(keep.tolist())
    assert set(keep.tolist()) == set(torch.topk(scores, 5).indices.tolist())
    with pytest.raises(ValueError):
        nystrom_select(c, 0)


def test_restore_is_exact_with_nothing_removed_and_is_least_squares():
    x, w = _acts(3), torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = x.T @ x
    full = torch.arange(12)
    assert torch.allclose(lstsq_restore(w, g, full, 0.0), w, atol=1e-8)
    keep = torch.tensor([0, 2, 3, 7, 9])
    want = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    assert torch.allclose(lstsq_restore(w, g, keep, 0.0), want, atol=1e-8)


def test_nystrom_error_decreases_as_more_neurons_are_kept():
    x = _acts(4)
    w = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = x.T @ x
    errors = []
    for k in (2, 4, 6, 8, 10, 12):
        keep = nystrom_select(g, k, 0.01)
        errors.append(_lstsq_error(x, w, keep, lstsq_restore(w, g, keep, 0.0)))
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[0] > 10 * errors[-2] and errors[-1] < 1e-12


def test_cr_scores_are_column_norms_of_the_matrix_square_roots():
    xq, xk = _acts(5, d=8), _acts(6, d=8)
    cq, ck = xq.T @ xq, xk.T @ xk
    rq, _ = sqrt_and_inv_sqrt(cq)
    rk, _ = sqrt_and_inv_sqrt(ck)
    want = rq.norm(dim=0) * rk.norm(dim=0)
    assert torch.allclose(cr_scores(cq, ck), want, rtol=1e-8)


def test_select_qk_dims_keeps_rotary_pairs_in_rotate_half_order():
    scores = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.1, 0.1], dtype=torch.float64)  # d=8, pairs (j, j+4)
    idx = select_qk_dims(scores, 4, rotary_dim=8)
    # pair scores: (0,4)=4.5, (1,5)=0.2, (2,6)=1.55, (3,7)=0.15
    assert idx.tolist() == [0, 2, 4, 6]
    half = len(idx) // 2
    assert all(int(b) == int(a) + 4 for a, b in zip(idx[:half], idx[half:], strict=True))
    with pytest.raises(ValueError):
        select_qk_dims(scores, 3, rotary_dim=8)  # an odd count cannot be made of pairs
    # partial rotary (first 4 dims rotated in pairs (0,2), (1,3)); dims 4..7 pass through singly
    idx = select_qk_dims(scores, 3, rotary_dim=4)
    assert idx.tolist() == [0, 2, 4]
    # no rotary: plain top-k, ascending
    assert select_qk_dims(scores, 3).tolist() == [0, 2, 4]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half, the reference the loader's rotation must equal."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_reduced_rope_equals_the_full_rope_restricted_to_kept_pairs():
    """The order select_qk_dims returns makes the loader's rotation of the reduced vector exact:
    ``roll(x, r/2)·signed_sin`` is transformers' ``rotate_half(x)·sin`` bit for bit."""
    from slicekit.modeling_slicekit import _signed_sin

    d = 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, d, generator=g, dtype=torch.float64), torch.randn(3, d, generator=g, dtype=torch.float64)
    theta = torch.rand(3, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    idx = select_qk_dims(torch.tensor([1.0, 9, 2, 8, 1, 9, 2, 8], dtype=torch.float64), 4, rotary_dim=d)
    full_q, full_k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    pairs_kept = (full_q[:, idx] * full_k[:, idx]).sum(-1)

    def rope(x: torch.Tensor) -> torch.Tensor:
        return x * cos[:, idx] + torch.roll(x, len(idx) // 2, dims=-1) * _signed_sin(sin[:, idx])

    rq, rk = rope(q[:, idx]), rope(k[:, idx])
    assert torch.allclose((rq * rk).sum(-1), pairs_kept, atol=1e-12)
    assert torch.equal(rq, q[:, idx] * cos[:, idx] + _rotate_half(q[:, idx]) * sin[:, idx])


def test_whitened_svd_is_exact_at_full_rank_and_improves_with_rank():
    x = _acts(7, d=10)
    g = torch.Generator().manual_seed(3)
    w_v = torch.randn(4, 10, generator=g, dtype=torch.float64)  # d_h = 4
    w_o = torch.randn(2 * 10, 4, generator=g, dtype=torch.float64)  # two query heads stacked (GQA)
    c = x.T @ x
    target = x @ (w_o @ w_v).T
    errors = []
    for k in (1, 2, 3, 4):
        a, b = whitened_svd(c, w_v, w_o, k, damping=0.01)
        assert a.shape == (k, 10) and b.shape == (20, k)
        errors.append(float(((x @ (b @ a).T - target) ** 2).sum()))
    assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors))
    assert errors[-1] < 1e-16 * float((target ** 2).sum()) + 1e-18


def test_whitened_svd_beats_plain_svd_on_the_data():
    x = _acts(8, d=10)
    g = torch.Generator().manual_seed(4)
    w_v, w_o = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(10, 6, generator=g, dtype=torch.float64)
    m = w_o @ w_v
    a, b = whitened_svd(x.T @ x, w_v, w_o, 2)
    u, s, vh = torch.linalg.svd(m)
    plain = (u[:, :2] * s[:2]) @ vh[:2]
    err_w = float(((x @ (b @ a - m).T) ** 2).sum())
    err_p = float(((x @ (plain - m).T) ** 2).sum())
    assert err_w <= err_p
