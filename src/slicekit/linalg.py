"""Closed-form linear algebra shared by the methods: pure functions of tensors, tested alone.

Conventions: weights are ``out × in`` as ``nn.Linear`` stores them (``y = x·Wᵀ + b``); Gram
matrices are ``XᵀX`` of activations with tokens as rows, accumulated in float64.
"""

from __future__ import annotations

import torch


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``G + damping·mean(diag G)·I`` — relative damping, scale-free."""
    g = gram.double()
    if damping <= 0:
        return g
    return g + damping * torch.diagonal(g).mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def pca_from_gram(gram: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and orthogonal eigenvectors (columns) of the damped Gram matrix.

    This is SliceGPT's rotation: ``x·Q`` puts the principal directions first, so keeping the
    first ``d`` coordinates keeps the most energy.  Computed in float64.
    """
    vals, vecs = torch.linalg.eigh(damped(gram, damping))
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def fold_scale_into_readers(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                            beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a norm's affine output ``n·γ + β`` into a linear that reads it.

    ``W·(n∘γ + β) + b = (W·diag γ)·n + (b + W·β)``; returns the new weight and bias (the bias is
    created when ``β`` is given and the linear had none).
    """
    w = weight.double()
    new_b = None if bias is None else bias.double()
    if beta is not None:
        extra = w @ beta.double()
        new_b = extra if new_b is None else new_b + extra
    if gamma is not None:
        w = w * gamma.double()[None, :]
    return w, new_b


def center_writer(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make a residual writer's output zero-mean over the residual dimension.

    Subtracting the mean over output rows turns ``LayerNorm`` into ``RMSNorm`` on a stream whose
    every contribution is centred (embeddings included, see :func:`center_rows`).
    """
    w = weight.double()
    w = w - w.mean(dim=0, keepdim=True)
    b = None if bias is None else bias.double() - bias.double().mean()
    return w, b


def center_rows(table: torch.Tensor) -> torch.Tensor:
    """Subtract each embedding row's mean over the hidden dimension."""
    t = table.double()
    return t - t.mean(dim=1, keepdim=True)


def rotate_reader(weight: torch.Tensor, q: torch.Tensor, width: int) -> torch.Tensor:
    """A linear that reads the stream ``x`` now reads ``x·Q[:, :d]``: ``W ← W·Q[:, :d]``."""
    return weight.double() @ q[:, :width].double()


def rotate_writer(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor,
                  width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear that writes the stream now writes its first ``d`` rotated coordinates:
    ``W ← Q[:, :d]ᵀ·W``, ``b ← Q[:, :d]ᵀ·b``."""
    qd = q[:, :width].double()
    return qd.T @ weight.double(), (None if bias is None else qd.T @ bias.double())


def shortcut(q_in: torch.Tensor, width_in: int, q_out: torch.Tensor, width_out: int) -> torch.Tensor:
    """Residual matrix between two rotated bases: ``Q_inᵀ·Q_out`` sliced to ``d_in × d_out``."""
    return q_in[:, :width_in].double().T @ q_out[:, :width_out].double()
