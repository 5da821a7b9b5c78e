"""DOTResize's transport core on small synthetic tensors: target choice, Gram-only cost, Sinkhorn
marginals and scale-freeness, the MLP merge (exact at full width, exact on duplicated neurons,
never better than least squares on its own data), the QR factor and where R goes at the residual
width (a toy pre-norm residual network with a weightless RMSNorm), and determinism."""

from __future__ import annotations

import math

import ot
import pytest
import torch
import torch.nn.functional as F

from slicekit.errors import SlicekitError
from slicekit.linalg import column_scores, pca_from_gram
from slicekit.methods.dotresize.transport import (
    READER_CHOICES,
    apply_readers,
    cost_matrix,
    cost_scale,
    hidden_transform,
    merge_mlp,
    neuron_transport,
    qr_factor,
    reader_map,
    retained_energy,
    select_targets,
    transport_map,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acts(seed: int = 0, tokens: int = 300, n: int = 12) -> torch.Tensor:
    g = _gen(seed)
    scale = torch.linspace(0.2, 3.0, n, dtype=F64)
    mix = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    return (torch.randn(tokens, n, generator=g, dtype=F64) @ mix) * scale


def _mlp(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def _mlp_weights(seed: int, d: int = 10, n: int = 24, out: int = 7):
    g = _gen(seed)
    return (torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64),
            torch.randn(out, n, generator=g, dtype=F64))


def _hidden(x, wg, wu):
    return F.silu(x @ wg.T) * (x @ wu.T)


# ---------------------------------------------------------------- targets

def test_energy_targets_are_the_largest_diagonal_entries_and_accept_the_diagonal_alone():
    x = _acts()
    gram = x.T @ x
    s = select_targets(gram, 5)
    want = torch.sort(torch.topk(torch.diagonal(gram), 5).indices).values
    assert torch.equal(s, want)
    assert torch.equal(select_targets(torch.diagonal(gram), 5), want)


def test_energy_ties_go_to_the_lower_index():
    assert torch.equal(select_targets(torch.ones(6, dtype=F64), 3), torch.tensor([0, 1, 2]))


def test_leverage_prefers_an_independent_neuron_over_a_strong_duplicate():
    g = _gen(1)
    base = torch.randn(400, 2, generator=g, dtype=F64)
    # neurons 0 and 1: the same strong signal; 2: an independent weak one
    x = torch.stack([3 * base[:, 0], 3 * base[:, 0], base[:, 1]], dim=1)
    gram = x.T @ x
    assert torch.equal(select_targets(gram, 2, "energy"), torch.tensor([0, 1]))
    lev = select_targets(gram, 2, "leverage")
    assert 2 in lev.tolist() and lev.numel() == 2


def test_pivoted_targets_take_one_neuron_per_group_of_duplicates_first():
    g = _gen(16)
    base = torch.randn(500, 4, generator=g, dtype=F64) * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)
    # 8 neurons: groups {0,1,2} ≈ base 0, {3,4} ≈ base 1, {5} = base 2, {6,7} ≈ base 3
    cols = [0, 0, 0, 1, 1, 2, 3, 3]
    x = base[:, cols] + 0.01 * torch.randn(500, 8, generator=g, dtype=F64)
    gram = x.T @ x
    piv = select_targets(gram, 4, "pivoted")
    assert sorted({cols[i] for i in piv.tolist()}) == [0, 1, 2, 3]  # one per group
    energy = select_targets(gram, 4, "energy")
    assert len({cols[i] for i in energy.tolist()}) < 4  # energy takes copies of the strongest group
    six = select_targets(gram, 6, "pivoted")  # greedy: the first four picks stay
    assert set(piv.tolist()) <= set(six.tolist()) and torch.equal(six, select_targets(gram, 6, "pivoted"))
    exact = base[:, cols]  # exactly rank 4: after four picks nothing is left to explain
    gram_exact = exact.T @ exact
    six = select_targets(gram_exact, 6, "pivoted")
    assert six.numel() == 6 and sorted({cols[i] for i in six.tolist()}) == [0, 1, 2, 3]
    # the two extra picks are the most energetic of the neurons not yet taken
    four = select_targets(gram_exact, 4, "pivoted")
    rest = [i for i in range(8) if i not in four.tolist()]
    by_energy = sorted(rest, key=lambda i: -float(gram_exact[i, i]))[:2]
    assert set(six.tolist()) == set(four.tolist()) | set(by_energy)


def test_column_score_targets_follow_fasps_score():
    x = _acts(2)
    gram = x.T @ x
    w = torch.randn(5, 12, generator=_gen(3), dtype=F64)
    want = torch.sort(torch.topk(column_scores(w, gram), 7).indices).values
    assert torch.equal(select_targets(gram, 7, "column_score", weight=w), want)


@pytest.mark.parametrize(("k", "how"), [(0, "energy"), (13, "energy"), (3, "nope")])
def test_bad_target_requests_raise(k, how):
    x = _acts()
    with pytest.raises(SlicekitError):
        select_targets(x.T @ x, k, how)


def test_column_score_without_weight_raises():
    x = _acts()
    with pytest.raises(SlicekitError, match="reader weight"):
        select_targets(x.T @ x, 3, "column_score")


# ---------------------------------------------------------------- cost

def test_sqeuclidean_cost_from_gram_matches_activation_distances():
    x = _acts(4)
    gram = x.T @ x
    s = torch.tensor([1, 5, 9])
    c = cost_matrix(gram[:, s], torch.diagonal(gram), s)
    want = ((x[:, :, None] - x[:, None, s]) ** 2).sum(0)
    assert torch.allclose(c, want, rtol=1e-10, atol=1e-8)
    src = torch.tensor([0, 2])
    sub = cost_matrix(gram[src[:, None], s[None, :]], torch.diagonal(gram), s, sources=src)
    assert torch.allclose(sub, want[src])


def test_residual_cost_is_the_best_scalar_fit_error():
    x = _acts(5)
    gram = x.T @ x
    s = torch.tensor([3, 7])
    c = cost_matrix(gram[:, s], torch.diagonal(gram), s, kind="residual")
    for i in range(12):
        for j, t in enumerate(s.tolist()):
            beta = (x[:, i] @ x[:, t]) / (x[:, t] @ x[:, t])
            assert c[i, j] == pytest.approx(float(((x[:, i] - beta * x[:, t]) ** 2).sum()), rel=1e-8, abs=1e-8)


def test_cost_shape_mismatch_raises():
    x = _acts()
    gram = x.T @ x
    with pytest.raises(SlicekitError, match="G\\[:, S\\]"):
        cost_matrix(gram[:, :3], torch.diagonal(gram), torch.tensor([0, 1]))


# ---------------------------------------------------------------- Sinkhorn

def _cost(seed: int, m: int = 9, k: int = 4) -> torch.Tensor:
    return torch.rand(m, k, generator=_gen(seed), dtype=F64) * 5


def test_plan_meets_both_marginals():
    c = _cost(0)
    a = torch.rand(9, generator=_gen(1), dtype=F64) + 0.1
    a = a / a.sum()
    b = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    plan, info = transport_map(c, a, b, reg=0.1, tol=1e-9)
    assert plan.dtype == F64 and plan.shape == (9, 4)
    assert torch.allclose(plan.sum(1), a, atol=1e-9)
    assert torch.allclose(plan.sum(0), b, rtol=1e-7)
    centred = c - c.min(1, keepdim=True).values
    assert info["converged"] and info["reg"] == pytest.approx(0.1 * float(centred.median()))


def test_row_constants_change_neither_the_scale_nor_the_plan():
    """Sinkhorn's plan ignores a constant added to a row, so the relative regularisation must too
    (the squared-distance cost carries each source's own energy in its whole row)."""
    c = _cost(5)
    shifted = c + 100.0 * torch.arange(9, dtype=F64)[:, None]
    assert cost_scale(shifted) == pytest.approx(cost_scale(c), rel=1e-12)
    p1, _ = transport_map(c, tol=1e-10)
    p2, _ = transport_map(shifted, tol=1e-10)
    assert torch.allclose(p1, p2, rtol=1e-6, atol=1e-12)


def test_regularisation_is_relative_to_the_cost_scale():
    c = _cost(2)
    p1, _ = transport_map(c)
    p2, _ = transport_map(1000.0 * c)
    assert torch.allclose(p1, p2, rtol=1e-7, atol=1e-12)


def test_small_regularisation_approaches_exact_ot():
    c = _cost(3, m=8, k=4)
    a, b = torch.full((8,), 1 / 8, dtype=F64), torch.full((4,), 1 / 4, dtype=F64)
    exact = float((ot.emd(a, b, c) * c).sum())
    plan, _ = transport_map(c, reg=0.005, max_iter=20000)
    loose, _ = transport_map(c, reg=1.0)
    assert float((plan * c).sum()) == pytest.approx(exact, rel=1e-2)
    assert float((loose * c).sum()) > float((plan * c).sum())


def test_auto_falls_back_to_the_log_domain_solver_when_the_kernel_underflows():
    c = _cost(6, m=10, k=3)
    c[:, 2] += 1e5  # every source is e^{-10⁶} away from target 2 at the default ε: the kernel column is 0
    plan, info = transport_map(c, tol=1e-9, max_iter=5000)
    assert info["method"] == "sinkhorn_log" and bool(torch.isfinite(plan).all())
    assert torch.allclose(plan.sum(0), torch.full((3,), 1 / 3, dtype=F64), rtol=1e-6)
    with pytest.raises(SlicekitError, match="float64 range"):
        transport_map(c, method="sinkhorn")
    fast, info_fast = transport_map(_cost(7), tol=1e-10)
    slow, _ = transport_map(_cost(7), tol=1e-10, method="sinkhorn_log")
    assert info_fast["method"] == "sinkhorn" and torch.allclose(fast, slow, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("bad", ["nan", "reg", "shape", "method"])
def test_transport_rejects_bad_input(bad):
    c = _cost(4)
    with pytest.raises(SlicekitError):
        if bad == "nan":
            c[0, 0] = float("nan")
            transport_map(c)
        elif bad == "reg":
            transport_map(c, reg=0.0)
        elif bad == "method":
            transport_map(c, method="greenkhorn")
        else:
            transport_map(c, a=torch.ones(3, dtype=F64))


def test_targets_keep_their_own_mass_and_every_target_stands_for_n_over_k_neurons():
    x = _acts(6, n=12)
    tr = neuron_transport(x.T @ x, 4, tol=1e-10)
    plan, t = tr.plan, tr.targets
    assert torch.allclose(plan.sum(1), torch.full((12,), 1 / 12, dtype=F64))
    assert torch.allclose(plan.sum(0), torch.full((4,), 1 / 4, dtype=F64), rtol=1e-8)
    for j, s in enumerate(t.tolist()):
        row = plan[s]
        assert row[j] == pytest.approx(1 / 12) and int((row != 0).sum()) == 1


def test_full_width_plan_is_diagonal():
    x = _acts(7, n=6)
    tr = neuron_transport(x.T @ x, 6)
    assert torch.equal(tr.plan, torch.eye(6, dtype=F64) / 6)
    for kind in READER_CHOICES:
        assert torch.allclose(reader_map(tr, x.T @ x, kind), torch.eye(6, dtype=F64), atol=1e-14)


def test_reader_maps_match_their_definitions_on_the_full_plan():
    x = _acts(8, n=12)
    gram = x.T @ x
    tr = neuron_transport(gram, 5)
    full = tr.plan
    t = tr.targets
    rows = full / full.sum(1, keepdim=True)
    beta = gram[:, t] / torch.diagonal(gram)[t][None, :]
    want = {"transport": rows, "scaled": rows * beta, "pinv": torch.linalg.pinv(tr.normalised).T}
    w = torch.randn(4, 12, generator=_gen(9), dtype=F64)
    for kind, m in want.items():
        assert torch.allclose(reader_map(tr, gram, kind), m, atol=1e-9), kind
        assert torch.allclose(apply_readers(w, tr, gram, kind), w @ m, atol=1e-9), kind


# ---------------------------------------------------------------- MLP merge

@pytest.mark.parametrize("readers", READER_CHOICES)
@pytest.mark.parametrize("rows", ["keep", "average"])
def test_full_width_merge_is_exact(readers, rows):
    wg, wu, wd = _mlp_weights(0)
    x = torch.randn(200, 10, generator=_gen(1), dtype=F64)
    h = _hidden(x, wg, wu)
    keep, new_wd, info = merge_mlp([wg, wu], wd, h.T @ h, 24, readers=readers, rows=rows)
    if rows == "keep":
        wg2, wu2 = wg[keep], wu[keep]
    else:
        wg2, wu2 = info["w_up"]
    xt = torch.randn(50, 10, generator=_gen(2), dtype=F64)  # fresh inputs, not the calibration ones
    assert torch.allclose(_mlp(xt, wg2, wu2, new_wd), _mlp(xt, wg, wu, wd), rtol=1e-12, atol=1e-12)


def test_merge_recovers_duplicated_neurons_that_deletion_loses():
    wg, wu, wd = _mlp_weights(3, n=8)
    # 16 neurons: 8 pairs of identical writers; the reader splits each pair's output unevenly
    wg2, wu2 = torch.cat([wg, wg]), torch.cat([wu, wu])
    wd2 = torch.cat([0.3 * wd, 0.7 * wd], dim=1)
    x = torch.randn(400, 10, generator=_gen(4), dtype=F64)
    h = _hidden(x, wg2, wu2)
    targets = torch.arange(8)  # one of each pair: each non-target has a zero-cost twin among them
    for readers in READER_CHOICES:
        keep, new_wd, info = merge_mlp([wg2, wu2], wd2, h.T @ h, 8, targets=targets, readers=readers,
                                       reg=0.01)
        xt = torch.randn(60, 10, generator=_gen(5), dtype=F64)
        merged = _mlp(xt, wg2[keep], wu2[keep], new_wd)
        full = _mlp(xt, wg2, wu2, wd2)
        assert float((merged - full).norm() / full.norm()) < 1e-8, readers
        assert info["error_merge"] < 1e-10
        assert info["error_delete"] == pytest.approx(0.7**2, rel=1e-6)  # 0.7·y is lost


def test_merge_errors_match_explicit_ones_and_least_squares_bounds_them():
    wg, wu, wd = _mlp_weights(6, n=24)
    x = torch.randn(300, 10, generator=_gen(7), dtype=F64)
    h = _hidden(x, wg, wu)
    y = h @ wd.T
    keep, new_wd, info = merge_mlp([wg, wu], wd, h.T @ h, 16, readers="transport")
    explicit = float(((y - h[:, keep] @ new_wd.T) ** 2).sum() / (y**2).sum())
    assert info["error_merge"] == pytest.approx(explicit, rel=1e-8)
    delete = float(((y - h[:, keep] @ wd[:, keep].T) ** 2).sum() / (y**2).sum())
    assert info["error_delete"] == pytest.approx(delete, rel=1e-8)
    assert info["error_lstsq"] <= min(info["error_merge"], info["error_delete"]) + 1e-12


def test_average_rows_are_transport_weighted_means_of_the_source_rows():
    wg, wu, wd = _mlp_weights(8)
    x = torch.randn(200, 10, generator=_gen(9), dtype=F64)
    h = _hidden(x, wg, wu)
    bias = torch.randn(24, generator=_gen(10), dtype=F64)
    keep, _, info = merge_mlp([wg, wu], wd, h.T @ h, 10, rows="average", up_biases=[bias, None])
    tn = info["transport"].normalised
    assert torch.equal(keep, torch.arange(10))
    assert torch.allclose(tn.sum(0), torch.ones(10, dtype=F64))
    assert torch.allclose(info["w_up"][0], tn.T @ wg) and torch.allclose(info["b_up"][0], tn.T @ bias)
    assert info["b_up"][1] is None


def test_merge_rejects_mismatched_shapes():
    wg, wu, wd = _mlp_weights(0)
    gram = torch.eye(24, dtype=F64)
    with pytest.raises(SlicekitError, match="disagree"):
        merge_mlp([wg, wu], wd[:, :20], gram, 12)
    with pytest.raises(SlicekitError, match="rows"):
        merge_mlp([wg[:20], wu], wd, gram, 12)
    with pytest.raises(SlicekitError, match="merged width"):
        merge_mlp([wg, wu], wd, gram, 25)


def test_merge_is_deterministic():
    wg, wu, wd = _mlp_weights(11)
    x = torch.randn(200, 10, generator=_gen(12), dtype=F64)
    h = _hidden(x, wg, wu)
    runs = [merge_mlp([wg, wu], wd, h.T @ h, 15) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2]["transport"].sub, runs[1][2]["transport"].sub)
    g = _acts(13, n=10)
    q1, r1 = hidden_transform(g.T @ g, 6)
    q2, r2 = hidden_transform(g.T @ g, 6)
    assert torch.equal(q1, q2) and torch.equal(r1, r2)


# ---------------------------------------------------------------- residual width: T = Q·R

def test_qr_factor_is_sign_fixed_and_reproduces_t():
    t = torch.randn(9, 5, generator=_gen(14), dtype=F64)
    q, r = qr_factor(t)
    assert torch.allclose(q @ r, t, atol=1e-12)
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=F64), atol=1e-12)
    assert torch.equal(r, torch.triu(r)) and bool((torch.diagonal(r) > 0).all())


class _Toy:
    """A 2-layer pre-norm residual network with a weightless RMSNorm that divides by the original
    width ``D`` (as ``UnitRMSNorm`` does): ``x ← x + W2·silu(W1·n(x))`` twice, logits ``H·n(x)``."""

    def __init__(self, seed: int, vocab: int = 11, d: int = 8, hidden: int = 16) -> None:
        g = _gen(seed)
        self.d = d
        self.emb = torch.randn(vocab, d, generator=g, dtype=F64)
        self.blocks = [(torch.randn(hidden, d, generator=g, dtype=F64),
                        torch.randn(d, hidden, generator=g, dtype=F64) / 4) for _ in range(2)]
        self.head = torch.randn(vocab, d, generator=g, dtype=F64)

    def norm(self, x):
        return x * math.sqrt(self.d) / x.pow(2).sum(-1, keepdim=True).sqrt()

    def __call__(self, ids):
        x = self.emb[ids]
        for w1, w2 in self.blocks:
            x = x + F.silu(self.norm(x) @ w1.T) @ w2.T
        return self.norm(x) @ self.head.T

    def stream_gram(self, ids):
        x = self.emb[ids]
        return x.T @ x

    def transformed(self, writer, reader):
        """Every writer ``W`` (out × in, out = stream) becomes ``writer(W)``, every reader ``reader(W)``;
        the embedding rows are written into the stream, so ``E ← writer(Eᵀ)ᵀ``."""
        new = _Toy.__new__(_Toy)
        new.d = self.d
        new.emb = writer(self.emb.T).T
        new.blocks = [(reader(w1), writer(w2)) for w1, w2 in self.blocks]
        new.head = reader(self.head)
        return new


def _ids(seed: int = 0):
    return torch.randint(0, 11, (40,), generator=_gen(seed))


def test_full_width_hidden_transform_keeps_the_toy_network_exact():
    toy = _Toy(0)
    ids = _ids()
    q, r = hidden_transform(toy.stream_gram(ids), toy.d)
    # every coordinate is a target and keeps its own mass: T̃ = I, so Q = R = I (the dense case is
    # the next test)
    assert torch.allclose(q, torch.eye(toy.d, dtype=F64)) and torch.allclose(r, torch.eye(toy.d, dtype=F64))
    new = toy.transformed(writer=lambda w: q.T @ w, reader=lambda w: w @ q)
    assert torch.allclose(new(_ids(1)), toy(_ids(1)), rtol=1e-10, atol=1e-10)


def test_r_cancels_where_it_is_folded_and_breaks_the_norm_where_it_is_not():
    """A dense invertible ``T = Q·R`` (not a transport plan, so ``R`` is far from diagonal): folding
    ``R⁻¹`` into the writers and ``R`` into the readers (writers ``R⁻ᵀ·Tᵀ·W``, readers
    ``W·T⁺ᵀ·Rᵀ``) is exact; carrying the transported stream ``x·T`` through the norm is not."""
    toy = _Toy(1)
    d = toy.d
    t = torch.randn(d, d, generator=_gen(2), dtype=F64) + 2 * torch.eye(d, dtype=F64)
    q, r = qr_factor(t)
    t_pinv = torch.linalg.pinv(t)
    r_inv = torch.linalg.inv(r)
    writer = lambda w: r_inv.T @ t.T @ w  # noqa: E731
    reader = lambda w: w @ t_pinv.T @ r.T  # noqa: E731
    w = torch.randn(5, d, generator=_gen(3), dtype=F64)
    assert torch.allclose(reader(w), w @ q, atol=1e-10)
    assert torch.allclose(writer(w.T), q.T @ w.T, atol=1e-10)
    ids = _ids(2)
    folded = toy.transformed(writer=writer, reader=reader)
    assert torch.allclose(folded(ids), toy(ids), rtol=1e-9, atol=1e-9)
    naive = toy.transformed(writer=lambda w: t.T @ w, reader=lambda w: w @ t_pinv.T)
    assert not torch.allclose(naive(ids), toy(ids), rtol=1e-3, atol=1e-3)


def test_reduced_hidden_transform_is_orthonormal_and_never_beats_pca():
    x = _acts(15, tokens=400, n=16)
    gram = x.T @ x
    q, r = hidden_transform(gram, 10)
    assert q.shape == (16, 10) and r.shape == (10, 10)
    assert torch.allclose(q.T @ q, torch.eye(10, dtype=F64), atol=1e-12)
    _, vecs = pca_from_gram(gram, 0.0)
    assert retained_energy(gram, q) <= retained_energy(gram, vecs[:, :10]) + 1e-12
    ident = torch.eye(16, dtype=F64)[:, select_targets(gram, 10)]
    assert retained_energy(gram, q) > 0.5 * retained_energy(gram, ident)
    q_uniform, _ = hidden_transform(gram, 10, source_mass="uniform")
    assert torch.allclose(q_uniform.T @ q_uniform, torch.eye(10, dtype=F64), atol=1e-12)
