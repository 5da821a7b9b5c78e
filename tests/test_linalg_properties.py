"""Properties of the closed forms in :mod:`slicekit.linalg`, on matrices hypothesis draws.

The example-based tests (``test_linalg*.py``) check each formula once; these check the laws the
methods rely on for *any* small input: orthonormal PCA bases, exactness when nothing is
removed, error that never grows as more is kept, and finite, bounded results when the Gram
matrix is ill-conditioned or singular.  Matrices are generated from a drawn seed and drawn
sizes (and condition numbers), so examples stay small and shrink well.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from slicekit.linalg import (
    anchored_gram,
    cr_scores,
    damped,
    gram_matrix,
    lstsq_restore,
    nystrom_select,
    pca_from_gram,
    reconstruction_error,
    ridge_leverage_scores,
    select_qk_dims,
    sqrt_and_inv_sqrt,
    whitened_svd,
)

F64 = torch.float64
FAST = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
dims = st.integers(2, 12)


# Hypothesis caches what it learns about source files under ``./.hypothesis`` (the repository),
# already while collecting: point it at a temporary directory, removed after this module's tests
# (the examples database is off, see ``FAST``).
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="slicekit-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)


@pytest.fixture(scope="module", autouse=True)
def _remove_hypothesis_files():
    yield
    set_hypothesis_home_dir(None)
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


def activations(seed: int, d: int, cond_exp: float = 0.0, n: int | None = None) -> torch.Tensor:
    """``n × d`` activations whose singular values spread over ``10^cond_exp`` in a random basis
    (so the ill-conditioning is not aligned with the coordinate axes)."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * d + 8
    z = torch.randn(n, d, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(0, -cond_exp, d, dtype=F64)
    return (z * scales) @ q.T


def weights(seed: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(rows, cols, generator=g, dtype=F64)


def direct_error(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, v: torch.Tensor) -> float:
    return float(((x @ w.T - x[:, keep] @ v.T) ** 2).sum())


# ------------------------------------------------------------------------------- PCA (SliceGPT's rotation)


@FAST
@given(seeds, dims, st.floats(0, 8), st.sampled_from([0.0, 0.01]))
def test_pca_basis_is_orthonormal_and_sorted(seed, d, cond, damping):
    gram = gram_matrix(activations(seed, d, cond))
    vals, q = pca_from_gram(gram, damping)
    assert torch.isfinite(vals).all() and torch.isfinite(q).all()
    assert torch.all(vals[:-1] >= vals[1:])
    assert torch.allclose(q.T @ q, torch.eye(d, dtype=F64), atol=1e-10)
    g = damped(gram, damping)
    assert torch.allclose(g @ q, q * vals, atol=1e-9 * float(g.abs().max()))


@FAST
@given(seeds, dims, st.floats(0, 4))
def test_pca_error_falls_as_width_grows_and_vanishes_at_full_width(seed, d, cond):
    """Keeping the first ``k`` rotated coordinates loses exactly the ``d − k`` smallest
    eigenvalues (Eckart–Young), so the loss is non-increasing in ``k`` and zero at ``k = d``."""
    x = activations(seed, d, cond)
    vals, q = pca_from_gram(gram_matrix(x), damping=0.0)
    total = float((x**2).sum())
    losses = []
    for k in range(1, d + 1):
        qk = q[:, :k]
        loss = float(((x - x @ qk @ qk.T) ** 2).sum())
        assert abs(loss - float(vals[k:].sum())) <= 1e-9 * total
        losses.append(loss)
    assert all(b <= a + 1e-9 * total for a, b in itertools.pairwise(losses))
    assert losses[-1] <= 1e-10 * total


# -------------------------------------------------------------------------------------------- square roots


@FAST
@given(seeds, dims, st.floats(0, 6), st.sampled_from([0.0, 1e-3]))
def test_square_root_and_its_inverse(seed, d, cond, damping):
    gram = gram_matrix(activations(seed, d, cond))
    root, inv = sqrt_and_inv_sqrt(gram, damping)
    g = damped(gram, damping)
    assert torch.allclose(root, root.T, atol=1e-12 * float(root.abs().max()))
    assert torch.allclose(root @ root, g, atol=1e-9 * float(g.abs().max()))
    assert torch.allclose(root @ inv, torch.eye(d, dtype=F64), atol=1e-6)


@FAST
@given(seeds, dims)
def test_cr_scores_are_column_norms_of_the_root(seed, d):
    gq, gk = gram_matrix(activations(seed, d)), gram_matrix(activations(seed + 7, d))
    rq, rk = sqrt_and_inv_sqrt(gq)[0], sqrt_and_inv_sqrt(gk)[0]
    assert torch.allclose(cr_scores(gq, gk), rq.norm(dim=0) * rk.norm(dim=0), rtol=1e-8)


# ------------------------------------------------------------------------------- least-squares restoration


@FAST
@given(seeds, dims, st.integers(1, 6), st.floats(0, 4))
def test_restore_with_every_column_is_exact(seed, d, out, cond):
    x = activations(seed, d, cond)
    w = weights(seed, out, d)
    keep = torch.arange(d)
    v = lstsq_restore(w, gram_matrix(x), keep)
    assert torch.allclose(v, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    assert direct_error(x, w, keep, v) <= 1e-10 * float(((x @ w.T) ** 2).sum())


@FAST
@given(seeds, st.integers(3, 12), st.integers(1, 5), st.data())
def test_restore_error_never_grows_as_more_columns_are_kept(seed, d, out, data):
    """Nested kept sets: the least-squares optimum over a superset is at least as good; and the
    restored weights beat plain removal and any perturbation of themselves."""
    x = activations(seed, d, cond_exp=1.0)
    w = weights(seed, out, d)
    gram = gram_matrix(x)
    order = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    k1 = data.draw(st.integers(1, d - 1))
    k2 = data.draw(st.integers(k1, d))
    total = float(((x @ w.T) ** 2).sum())
    errors = []
    for k in (k1, k2):
        keep = order[:k].sort().values
        v = lstsq_restore(w, gram, keep)
        err = reconstruction_error(w, gram, keep, v)
        assert abs(err - direct_error(x, w, keep, v)) <= 1e-8 * total
        assert err <= reconstruction_error(w, gram, keep, w[:, keep]) + 1e-9 * total
        nudged = v + 1e-3 * weights(seed + 3, *v.shape)
        assert err <= reconstruction_error(w, gram, keep, nudged) + 1e-9 * total
        errors.append(err)
    assert errors[1] <= errors[0] + 1e-9 * total


@FAST
@given(seeds, st.integers(3, 12), st.integers(1, 5), st.floats(1e-4, 1.0), st.data())
def test_anchored_restore_never_loses_to_plain_removal(seed, d, out, damping, data):
    x = activations(seed, d, cond_exp=3.0)
    w = weights(seed, out, d)
    gram = gram_matrix(x)
    k = data.draw(st.integers(1, d))
    keep = torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    v = lstsq_restore(w, anchored_gram(gram, keep, damping), keep)
    total = float(((x @ w.T) ** 2).sum())
    assert (
        reconstruction_error(w, gram, keep, v)
        <= reconstruction_error(w, gram, keep, w[:, keep]) + 1e-9 * total
    )
    if k == d:
        assert torch.allclose(v, w, atol=1e-8 * float(w.abs().max()))
    # the anchor is plain removal, not zero: heavy damping returns the kept columns unchanged
    heavy = lstsq_restore(w, anchored_gram(gram, keep, 1e9), keep)
    assert torch.allclose(heavy, w[:, keep], rtol=1e-5, atol=1e-5 * float(w.abs().max()))


# -------------------------------------------------------------------------------- Nyström column selection


@FAST
@given(seeds, st.integers(2, 12), st.floats(0, 4), st.data())
def test_nystrom_selection_is_nested_and_its_error_falls(seed, d, cond, data):
    x = activations(seed, d, cond)
    w = weights(seed, 3, d)
    gram = gram_matrix(x)
    assert torch.equal(nystrom_select(gram, d), torch.arange(d))
    k1 = data.draw(st.integers(1, d))
    k2 = data.draw(st.integers(k1, d))
    s1, s2 = nystrom_select(gram, k1), nystrom_select(gram, k2)
    assert len(s1) == k1 and torch.all(s1[1:] > s1[:-1])
    assert set(s1.tolist()) <= set(s2.tolist())
    total = float(((x @ w.T) ** 2).sum())
    e1 = reconstruction_error(w, gram, s1, lstsq_restore(w, gram, s1))
    e2 = reconstruction_error(w, gram, s2, lstsq_restore(w, gram, s2))
    assert e2 <= e1 + 1e-9 * total
    if k2 == d:
        assert e2 <= 1e-9 * total


@FAST
@given(seeds, dims, st.floats(0, 10), st.floats(1e-4, 1.0))
def test_ridge_leverage_scores_lie_in_the_unit_interval(seed, d, cond, ridge):
    gram = gram_matrix(activations(seed, d, cond))
    scores = ridge_leverage_scores(gram, ridge)
    assert torch.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1
    vals, vecs = torch.linalg.eigh(gram)
    lam = ridge * torch.diagonal(gram).mean()
    want = (vecs**2 * (vals.clamp_min(0) / (vals.clamp_min(0) + lam))).sum(dim=1)
    assert torch.allclose(scores, want, atol=1e-8)


# ---------------------------------------------------------------------------- whitened SVD (MoDeGPT's V-O)


@FAST
@given(seeds, st.integers(2, 10), st.integers(1, 6), st.integers(2, 10), st.floats(0, 3))
def test_whitened_svd_is_exact_at_full_rank_and_eckart_young_below(seed, d, d_head, d_out, cond):
    gram = gram_matrix(activations(seed, d, cond))
    w_v, w_o = weights(seed, d_head, d), weights(seed + 5, d_out, d_head)
    m = w_o @ w_v
    root, _ = sqrt_and_inv_sqrt(gram)
    sigma = torch.linalg.svdvals(m @ root)
    full = sigma.shape[0]
    scale = float((m @ root).norm())
    errors = []
    for k in range(1, full + 1):
        v, o = whitened_svd(gram, w_v, w_o, k)
        assert v.shape == (k, d) and o.shape == (d_out, k)
        err = float(((m - o @ v) @ root).norm())
        assert abs(err - float(sigma[k:].pow(2).sum().sqrt())) <= 1e-7 * scale
        errors.append(err)
    assert all(b <= a + 1e-9 * scale for a, b in itertools.pairwise(errors))
    v, o = whitened_svd(gram, w_v, w_o, min(full, d_head))  # rank(W_o·W_v) ≤ d_head: exact there
    assert torch.allclose(o @ v, m, atol=1e-6 * float(m.abs().max()))


# -------------------------------------------------------------- ill-conditioned and singular Gram matrices


@FAST
@given(seeds, st.integers(3, 12), st.floats(6, 16), st.booleans(), st.data())
def test_ill_conditioned_gram_gives_finite_bounded_results(seed, d, cond, duplicate, data):
    """Condition numbers up to 1e32 (float64 cannot tell such a Gram matrix from a singular one)
    or exactly repeated columns: with damping, every closed form stays finite and its error stays
    below what predicting zero would cost (the ridge objective is at most its value at zero)."""
    x = activations(seed, d, cond)
    if duplicate:
        x[:, -1] = x[:, 0]
    gram = gram_matrix(x)
    w = weights(seed, 4, d)
    total = float(((x @ w.T) ** 2).sum())
    vals, q = pca_from_gram(gram, 0.01)
    assert torch.isfinite(vals).all() and torch.isfinite(q).all() and vals.min() > 0
    root, inv = sqrt_and_inv_sqrt(gram, 0.01)
    assert torch.isfinite(root).all() and torch.isfinite(inv).all()
    assert torch.isfinite(ridge_leverage_scores(gram)).all()
    k = data.draw(st.integers(1, d))
    keep = nystrom_select(gram, k)
    for v in (
        lstsq_restore(w, gram, keep, damping=0.01),
        lstsq_restore(w, gram, keep),
        lstsq_restore(w, anchored_gram(gram, keep, 0.01), keep),
    ):
        assert torch.isfinite(v).all()
        assert reconstruction_error(w, gram, keep, v) <= total * (1 + 1e-6)
    v = lstsq_restore(w, anchored_gram(gram, keep, 0.01), keep)
    assert (
        reconstruction_error(w, gram, keep, v)
        <= reconstruction_error(w, gram, keep, w[:, keep]) + 1e-9 * total
    )
    w_v, w_o = weights(seed, 3, d), weights(seed + 5, 5, 3)
    v, o = whitened_svd(gram, w_v, w_o, 2, damping=0.01)
    assert torch.isfinite(v).all() and torch.isfinite(o).all()
    m = w_o @ w_v
    assert float(((m - o @ v) @ root).norm()) <= float((m @ root).norm()) * (1 + 1e-9)


# ------------------------------------------------------------------- Gram accumulation and head dimensions


@settings(max_examples=15, deadline=None, database=None)
@given(seeds, st.integers(1, 3), st.integers(1, 40), st.integers(1, 260))
def test_gram_matrix_equals_the_full_product(seed, batch, tokens, d):
    x = torch.randn(batch, tokens, d, generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(-1, d).double()
    got = gram_matrix(x)
    assert torch.allclose(got, flat.T @ flat, rtol=1e-12, atol=1e-9)
    twice = gram_matrix(x, gram_matrix(x))
    assert torch.allclose(twice, 2 * got, rtol=1e-12, atol=1e-9)


@FAST
@given(seeds, st.integers(1, 4).map(lambda h: 2 * h), st.integers(0, 4), st.data())
def test_kept_head_dims_keep_rotary_pairs_together(seed, rotary_dim, passthrough, data):
    d = rotary_dim + passthrough
    half = rotary_dim // 2
    scores = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    rotated = data.draw(st.integers(0, half).map(lambda p: 2 * p))
    keep = data.draw(st.integers(max(rotated, 1), rotated + passthrough)) if rotated + passthrough else 0
    if keep == 0:
        return
    idx = select_qk_dims(scores, keep, rotary_dim, rotated)
    kept = idx.tolist()
    assert len(kept) == keep == len(set(kept)) and all(0 <= j < d for j in kept)
    firsts = [j for j in kept if j < half]
    assert kept[: 2 * len(firsts)] == firsts + [j + half for j in firsts]  # pairs, partners in order
    assert 2 * len(firsts) == rotated
    assert all(j >= rotary_dim for j in kept[2 * len(firsts) :])
    # the best pairs by mean score were kept
    pair_score = [(float(scores[j] + scores[j + half]), j) for j in range(half)]
    best = sorted(pair_score, key=lambda t: (-t[0], t[1]))[: rotated // 2]
    assert sorted(firsts) == sorted(j for _, j in best)
