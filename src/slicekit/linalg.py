"""Closed-form linear algebra shared by the methods: pure functions of tensors, tested alone.

Conventions: weights are ``out × in`` as ``nn.Linear`` stores them (``y = x·Wᵀ + b``); Gram
matrices are ``XᵀX`` of activations with tokens as rows, accumulated in float64.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 4096  # float64 work on big tables (embeddings, LM head) in slices of this many rows
GRAM_BLOCK = 96  # column block of :func:`gram_matrix` (CPU, 1 thread: 0.5-0.67x a full product at D 576-4096)


def gram_matrix(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``XᵀX`` in float64 of the rows of ``x`` (``… × D``), added into ``out`` when given.

    ``XᵀX`` is symmetric, so only the block upper triangle is multiplied (column blocks of
    :data:`GRAM_BLOCK` against everything to their right) and mirrored: about 40 % fewer float64
    FLOPs than ``XᵀX`` in one product, equal to it up to float64 round-off.  Calibration spends a
    large share of its time here (two Gram matrices per decoder layer and batch).
    """
    x = x.reshape(-1, x.shape[-1]).double()
    d = x.shape[1]
    if out is None:
        out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    if d <= 2 * GRAM_BLOCK:
        return out.add_(x.T @ x)
    for i in range(0, d, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, d)
        block = x[:, i:j].T @ x[:, i:]
        out[i:j, i:] += block
        out[j:, i:j] += block[:, j - i:].T
    return out


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
                            beta: torch.Tensor | None, out_dtype: torch.dtype | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a norm's affine output ``n·γ + β`` into a linear that reads it.

    ``W·(n∘γ + β) + b = (W·diag γ)·n + (b + W·β)``; returns the new weight and bias (the bias is
    created when ``β`` is given and the linear had none).  Float64 arithmetic, a slice of rows at
    a time; the weight is returned in ``out_dtype`` (default float64), the bias in float64.
    """
    out = torch.empty(weight.shape, dtype=out_dtype or torch.float64, device=weight.device)
    new_b = None if bias is None else bias.double()
    extra = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if beta is not None else None
    g = None if gamma is None else gamma.double()[None, :]
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start : start + CHUNK_ROWS].double()
        if extra is not None:
            extra[start : start + CHUNK_ROWS] = w @ beta.double()
        out[start : start + CHUNK_ROWS] = w * g if g is not None else w
    if extra is not None:
        new_b = extra if new_b is None else new_b + extra
    return out, new_b


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


def rotate_reader(weight: torch.Tensor, q: torch.Tensor, width: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A linear that reads the stream ``x`` now reads ``x·Q[:, :d]``: ``W ← W·Q[:, :d]``.

    Computed in float64 a slice of rows at a time (a 49k-row LM head would otherwise need two
    float64 copies at once); returned in ``out_dtype`` (default float64).
    """
    qd = q[:, :width].double().to(weight.device)
    out = torch.empty(weight.shape[0], width, dtype=out_dtype or torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        out[start : start + CHUNK_ROWS] = weight[start : start + CHUNK_ROWS].double() @ qd
    return out


def rotate_writer(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor,
                  width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear that writes the stream now writes its first ``d`` rotated coordinates:
    ``W ← Q[:, :d]ᵀ·W``, ``b ← Q[:, :d]ᵀ·b``."""
    qd = q[:, :width].double().to(weight.device)
    return qd.T @ weight.double(), (None if bias is None else qd.T @ bias.double())


# ---------------------------------------------------------------- MoDeGPT / least-squares closed forms

def _eigh_damped(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(damped(gram, damping))
    return vals.clamp_min(torch.finfo(vals.dtype).tiny), vecs


def sqrt_and_inv_sqrt(gram: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``G^{1/2}`` and ``G^{-1/2}`` of the (relatively) damped Gram matrix, float64.

    Both come from one eigendecomposition, so ``G^{-1/2}·G^{1/2} = I`` to round-off even when ``G``
    is badly conditioned: a whitened factorisation at full rank stays exact.
    """
    vals, vecs = _eigh_damped(gram, damping)
    root = vals.sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def ridge_leverage_scores(gram: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """``diag(C·(C + λI)⁻¹)`` with ``λ = ridge·mean(diag C)`` (relative, scale-free).

    Computed as ``1 − λ·diag((C + λI)⁻¹)`` from a Cholesky factorisation (``C + λI`` is positive
    definite), several times faster than an eigendecomposition; the eigendecomposition
    ``Σ_i V_ji² · λ_i / (λ_i + λ)`` is the fallback.  Scores lie in [0, 1].
    """
    c = gram.double()
    n = c.shape[0]
    lam = ridge * torch.diagonal(c).mean().clamp_min(torch.finfo(c.dtype).tiny)
    chol, info = torch.linalg.cholesky_ex(c + lam * torch.eye(n, dtype=c.dtype, device=c.device))
    if int(info) == 0:
        return (1 - lam * torch.diagonal(torch.cholesky_inverse(chol))).clamp(0, 1)
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(0)
    return (vecs.pow(2) * (vals / (vals + lam))[None, :]).sum(dim=1)


def nystrom_select(gram: torch.Tensor, keep: int, ridge: float = 1e-2) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` columns with the largest ridge leverage scores."""
    n = gram.shape[0]
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in [1, {n}] (got {keep})")
    scores = ridge_leverage_scores(gram, ridge)
    return torch.sort(torch.topk(scores, keep).indices).values


def lstsq_restore(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                  damping: float = 0.0) -> torch.Tensor:
    """Least-squares restoration of a linear that loses input columns.

    ``W`` (out × in) reads activations ``X`` with ``G = XᵀX``; keeping only the columns ``S`` of the
    input, the best ``W_S`` in ``min ‖X·Wᵀ − X_S·W_Sᵀ‖`` is ``W·G[:, S]·G[S, S]⁻¹`` — MoDeGPT's
    Nyström down projection and FASP's restoration alike.  ``damping`` adds
    ``damping·mean(diag G[S, S])`` to the diagonal of ``G[S, S]``.  Cholesky solve, falling back to
    least squares when the block is singular.  Returns float64, ``out × |S|``.
    """
    g = gram.double()
    keep = keep.to(device=g.device, dtype=torch.long)
    gss = damped(g[keep][:, keep], damping)
    rhs = (weight.double().to(g.device) @ g[:, keep]).T  # |S| × out
    chol, info = torch.linalg.cholesky_ex(gss)
    sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(gss, rhs).solution
    return sol.T


def cr_scores(gram_q: torch.Tensor, gram_k: torch.Tensor) -> torch.Tensor:
    """MoDeGPT's key-query importance per head dimension: ``‖(C_q^{1/2})_{:,j}‖·‖(C_k^{1/2})_{:,j}‖``.

    For any square root ``R`` with ``RᵀR = C`` the column norm is ``‖R_{:,j}‖ = sqrt(C_jj)``, so the
    score is ``sqrt(C_q,jj · C_k,jj)`` — no matrix square root is formed (the test checks this
    against an explicit one).
    """
    dq = torch.diagonal(gram_q.double()).clamp_min(0)
    dk = torch.diagonal(gram_k.double()).clamp_min(0)
    return (dq * dk).sqrt()


def select_qk_dims(scores: torch.Tensor, keep: int, rotary_dim: int = 0, rotated: int | None = None) -> torch.Tensor:
    """Which dimensions of one (query, key) head to keep, in the order the reduced head uses.

    ``scores``: per dimension (length ``d``).  The first ``rotary_dim`` dimensions are rotated in
    ``rotate_half`` pairs ``(j, j + rotary_dim/2)``; a pair is kept or dropped together (score = sum
    of the two).  Dimensions ``≥ rotary_dim`` pass through unrotated and are chosen singly.
    ``rotated``: how many of the kept dims are rotated (even; the best pairs and the best singles
    are then chosen apart, so the count is fixed in advance, as a plan needs); ``None``: greedy by
    score per dimension over both kinds.  Returned order: ``[firsts of kept pairs, their partners,
    kept pass dims]`` (each ascending) — with that order ``rotate_half`` of the reduced vector
    rotates the same pairs as the full one, so RoPE needs only an ``index_select`` of cos/sin.
    """
    d = scores.shape[0]
    half = rotary_dim // 2
    if rotary_dim % 2 or rotary_dim > d:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and ≤ {d}")
    if not 0 < keep <= d:
        raise ValueError(f"keep must be in [1, {d}] (got {keep})")
    pair_units = [(float(scores[j] + scores[j + half]) / 2, 2, j) for j in range(half)]
    single_units = [(float(scores[j]), 1, j) for j in range(rotary_dim, d)]
    if rotated is not None:
        if rotated % 2 or not 0 <= rotated <= min(rotary_dim, keep) or keep - rotated > d - rotary_dim:
            raise ValueError(f"cannot keep {rotated} rotated of {keep} dims in a head with {rotary_dim} rotary "
                             f"of {d} dims")
        pairs = [j for _, _, j in sorted(pair_units, key=lambda u: (-u[0], u[2]))[: rotated // 2]]
        singles = [j for _, _, j in sorted(single_units, key=lambda u: (-u[0], u[2]))[: keep - rotated]]
    else:
        units = sorted(pair_units + single_units, key=lambda u: -u[0])
        budget, pairs, singles = keep, [], []
        for _, cost, j in units:
            if cost <= budget:
                (pairs if cost == 2 else singles).append(j)
                budget -= cost
            if budget == 0:
                break
        if budget:
            raise ValueError(f"cannot keep exactly {keep} dims with rotary pairs of a rotary_dim {rotary_dim} head")
    pairs.sort()
    singles.sort()
    return torch.tensor(pairs + [j + half for j in pairs] + singles, dtype=torch.long)


def whitened_svd(gram: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, rank: int,
                 damping: float = 0.0, roots: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoDeGPT's value-output compression of one head (or one KV group), out × in convention.

    The head maps ``x ↦ W_o·W_v·x`` with ``w_v`` (d_h × D) and ``w_o`` (D' × d_h; for a GQA group
    the output columns of all its query heads stacked vertically).  With ``C`` the Gram matrix of
    ``x``, the rank-``k`` ``M'`` minimising ``‖(W_o·W_v − M')·C^{1/2}‖_F`` comes from the SVD
    ``W_o·W_v·C^{1/2} = UΣVᵀ``: returns ``W_v' = V_kᵀ·C^{-1/2}`` (k × D) and ``W_o' = U_k·Σ_k``
    (D' × k).  This is methods.md's ``C^{1/2}·W_V·W_O`` in math convention, transposed.
    ``roots``: ``sqrt_and_inv_sqrt(gram, damping)`` when already computed (all heads of a layer
    share the input, hence the roots).
    """
    root, inv_root = roots if roots is not None else sqrt_and_inv_sqrt(gram, damping)
    m = w_o.double().to(root.device) @ w_v.double().to(root.device)
    u, s, vh = torch.linalg.svd(m @ root, full_matrices=False)
    k = int(rank)
    if not 0 < k <= s.shape[0]:
        raise ValueError(f"rank must be in [1, {s.shape[0]}] (got {k})")
    return vh[:k] @ inv_root, u[:, :k] * s[:k]


# ---- structured pruning of interlinked pairs (FASP; the restore itself is lstsq_restore above) ----

def column_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Wanda-style importance of each input column of a linear: ``S_j = ‖W[:, j]‖₁ · ‖X[:, j]‖₂``.

    ``weight`` is ``out × in``; ``gram`` is ``XᵀX`` of the linear's input, whose diagonal holds
    ``‖X[:, j]‖₂²``.  Returns a float64 vector of length ``in``.
    """
    norms = torch.diagonal(gram.double()).clamp_min(0).sqrt()
    return weight.double().abs().sum(dim=0) * norms.to(weight.device)


def anchored_gram(gram: torch.Tensor, keep: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """``G + δ·diag(1_S)`` with ``δ = damping · mean(diag G[S, S])``: the Gram matrix that turns
    :func:`lstsq_restore` (undamped) into a ridge towards the plain-removal weights.

    ``lstsq_restore(W, anchored_gram(G, S, d), S)`` is ``(W·G[:, S] + δ·W[:, S])·(G[S, S] + δI)⁻¹``,
    the minimiser of ``‖X·Wᵀ − X_S·Vᵀ‖² + δ‖V − W[:, S]‖²``.  Unlike the ridge towards zero it is
    never worse than plain removal on the data behind ``G`` (at ``V = W[:, S]`` the penalty
    vanishes), whatever ``δ``, and it returns ``W`` itself when nothing is removed.
    """
    g = gram.double().clone()
    keep = torch.as_tensor(keep, device=g.device, dtype=torch.long)
    if damping > 0:
        delta = damping * torch.diagonal(g)[keep].mean().clamp_min(torch.finfo(g.dtype).tiny)
        g[keep, keep] += delta
    return g


def reconstruction_error(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                         new_weight: torch.Tensor) -> float:
    """``‖X·Wᵀ − X_S·Vᵀ‖²_F`` computed from the Gram matrix alone (biases cancel when unchanged):
    ``tr(W G Wᵀ) − 2 tr(V G[S, :] Wᵀ) + tr(V G[S, S] Vᵀ)``."""
    w, v = weight.double(), new_weight.double().to(weight.device)
    g = gram.double().to(w.device)
    keep = torch.as_tensor(keep, device=w.device, dtype=torch.long)
    full = (w @ g * w).sum()
    cross = (v @ g[keep] * w).sum()
    kept = (v @ g[keep][:, keep] * v).sum()
    return float((full - 2 * cross + kept).clamp_min(0))
