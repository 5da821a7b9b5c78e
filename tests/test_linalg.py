"""The shared closed forms on small matrices."""

from __future__ import annotations

import torch

from slicekit.linalg import (
    center_rows,
    center_writer,
    damped,
    fold_scale_into_readers,
    gram_matrix,
    pca_from_gram,
    rotate_reader,
    rotate_writer,
)


def test_pca_orders_by_energy_and_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 1, 3, 0.1, 2, 0.5], dtype=torch.float64)
    vals, q = pca_from_gram(x.T @ x, damping=0.0)
    assert torch.all(vals[:-1] >= vals[1:])
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    energy = ((x @ q) ** 2).sum(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-9)
    # the first direction is (up to sign) the largest-scale axis
    assert abs(abs(q[0, 0].item()) - 1.0) < 1e-2


def test_damping_is_relative():
    gm = torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(damped(gm, 0.5), torch.diag(torch.tensor([3.5, 5.5], dtype=torch.float64)))
    assert torch.equal(damped(gm, 0.0), gm)


def test_fold_norm_scale_and_bias():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    gamma, beta, n = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g), torch.randn(7, 4, generator=g)
    ref = (n * gamma + beta) @ w.T + b
    w2, b2 = fold_scale_into_readers(w, b, gamma, beta)
    assert torch.allclose(n.double() @ w2.T + b2, ref.double(), atol=1e-5)
    w3, b3 = fold_scale_into_readers(w, None, gamma, beta)  # bias created from beta
    assert b3 is not None and torch.allclose(n.double() @ w3.T + b3, ((n * gamma + beta) @ w.T).double(), atol=1e-5)


def test_centering_makes_outputs_zero_mean():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    wc, bc = center_writer(w, b)
    y = torch.randn(4, 3, generator=g).double() @ wc.T + bc
    assert torch.allclose(y.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(center_rows(torch.randn(6, 5, generator=g)).mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_rotate_and_slice_round_trip_at_full_width():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    w_read = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w_write = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose((x @ q) @ rotate_reader(w_read, q, 5).T, x @ w_read.T)
    ww, _ = rotate_writer(w_write, None, q, 5)
    h = torch.randn(3, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(h @ ww.T, h @ w_write.T @ q)
    # The next rotation is found in the basis of q (eigenvectors v): the shortcut between the two
    # sliced bases, q[:, :3]ᵀ·(q·v)[:, :4], is the 3 × 4 corner of v — what SliceGPT stores.
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert torch.allclose(q[:, :3].T @ (q @ v)[:, :4], v[:3, :4])


def test_gram_matrix_equals_the_full_product():
    g = torch.Generator().manual_seed(4)
    for d in (7, 192, 193, 500):  # below, at and across the block size, uneven last block
        x = torch.randn(3, 50, d, generator=g)
        want = x.reshape(-1, d).double().T @ x.reshape(-1, d).double()
        got = gram_matrix(x)
        assert got.dtype == torch.float64 and torch.allclose(got, got.T, rtol=1e-13, atol=1e-10)
        assert torch.allclose(got, want, rtol=1e-13, atol=1e-10)
        acc = gram_matrix(x[:1])
        assert gram_matrix(x[1:], acc) is acc and torch.allclose(acc, want, rtol=1e-13, atol=1e-10)
