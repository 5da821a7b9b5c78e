"""Rotations from bits and back: the canonical frame, the code for ``R`` and its recovery.

Canonical form (a pivoted QR frame).  Stack an interface's *own* tensors (readers, writers,
embeddings, head — every tensor whose only symmetry is this interface's) as rows ``M`` (``N × d``),
each row scaled by its quantisation step so that distances count quantisation steps.  A
column-pivoted QR picks ``d`` rows (the *pivots*, stored in the file) and an orthonormal frame
``F`` with ``M[pivots] = L·F``, ``L`` lower triangular with a positive diagonal.  ``M·Fᵀ`` is the
canonical form: its pivot rows are lower triangular.  This frame is cheap (one LAPACK ``geqp3``
on at most ``2d`` candidate rows) and — unlike an eigen/SVD basis — well conditioned under the
quantisation noise: frame vector ``k`` is the pivot row ``k`` with the earlier frame vectors
projected out, so its error is the row's own noise divided by ``L_kk`` (the norm of what
remains of that row, which pivoting keeps large); it never depends on a gap between eigenvalues.

The code for ``R``.  Row by row: ``r_k = B_k·u_k`` where the columns of ``B_k`` (``d × n``,
``n = d − k``) are an orthonormal basis of the complement of ``r_0 … r_{k-1}`` (``B_0 = I``,
``B_{k+1} = B_k·H(u_k)[:, 1:]`` with ``H(u)`` the Householder reflection that maps ``e_1`` to
``u``), and ``u_k = (t, g_1 … g_{n-1}) / ‖·‖`` with ``t = max(¼·√(n−1), 1)`` and the ``g_i`` on a grid
``h_k``: the ``n − 1`` integers ``g_i / h_k`` are the symbols, with a Gaussian prior of standard
deviation ``1/h_k``.  This is a gnomonic chart of the sphere: ``g_i = t·u_i/u_0``.  The last row
is ``B_{d-1}`` (one column).  ``R`` is orthogonal to float round-off for any symbols.

Recovery.  The stored tensors are ``Q(M·Fᵀ·R)`` (``Q`` = quantisation), so pivot row ``k`` is
``Σ_{j≤k} L_kj·r_j + noise``.  With ``r_0 … r_{k-1}`` already recovered *exactly* (they are
rebuilt from the recovered symbols, not estimated), ``y = B_kᵀ·(pivot row k)`` is
``L_kk·u_k + noise`` and ``x_i = t·y_i / (y_0·h_k)`` estimates the symbols; rounding gives
``ŝ``.  Errors do not propagate from row to row.  The grid is chosen per row as the noise level
of that estimate (``h_k = ρ_k / (√12·L_kk)`` in step units, ``ρ_k ≈ √(t² + n − 1)``), where
bits-back gains the most: a finer grid pops more bits but needs larger corrections, a coarser
one pops fewer.

Correction.  Quantisation noise makes ``ŝ`` differ from the popped ``s`` by a few units, so the
encoder, which runs the decoder's recovery on the quantised tensors itself, pushes
``c = s − ŝ`` (a quantised Gaussian with the interface's measured spread, ``≈ 2`` bits per
symbol) before the weights; the decoder pops the weights, recovers ``ŝ``, pops ``c`` and pushes
``s = ŝ + c`` back — bit-exact.  Float round-off can differ between the machine that packs and the
one that unpacks; a rounding is fragile only where ``x`` is within ``1e-4`` of a half-integer, so
the encoder lists those positions (a handful per interface) and both sides round them down.  A
CRC of each interface's symbols detects any remaining disagreement.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from slicekit.bitsback.coding import EXP_DEN, Block, exp_of, lo_bits_for, pow2_8

T_SCALE = 0.25  # t = max(T_SCALE·√(n−1), 1): u_0 ≈ 0.24, so the chart is well conditioned
G_MAX = 6.0  # the Gaussian prior of g is clipped to ±G_MAX (hi alphabet bound)
FRAGILE = 1e-4  # |x − round(x)| this close to ½: listed, rounded down on both sides
CANDIDATES_PER_DIM = 2  # at most this many candidate rows per dimension for the pivoted QR


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run small dense algebra (``d × d`` matrix-vector steps, QR of ``d × 2d``) on one BLAS
    thread: multi-threaded OpenBLAS spins on such sizes and was 25–130x slower on a loaded
    machine (7.9 s instead of 0.06 s for one rotation of width 432)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def chart_t(n: int) -> float:
    return max(T_SCALE * math.sqrt(n - 1), 1.0)


def row_block(grid_exp: int) -> Block:
    """The prior of one row's symbols: Gaussian of standard deviation ``1/h`` (``g ~ N(0, 1)``)."""
    std = 1.0 / float(pow2_8(grid_exp))
    m = lo_bits_for(std)
    bound = math.ceil(G_MAX * std / 2.0 ** m) + 1
    return Block(std, m, -bound, bound)


def rotation_blocks(grid_exps: np.ndarray) -> list[tuple[Block, int]]:
    """(block, symbol count) for rows ``0 … d−2`` of a ``d × d`` rotation."""
    d = len(grid_exps) + 1
    return [(row_block(int(e)), d - k - 1) for k, e in enumerate(grid_exps)]


def expected_bits(grid_exps: np.ndarray) -> float:
    from slicekit.bitsback.coding import gaussian_bits

    return sum(gaussian_bits(b) * n for b, n in rotation_blocks(grid_exps))


def walk_rotation(d: int, grid_exps: np.ndarray, symbols_for_row: Callable[[int, np.ndarray | None], np.ndarray],
                  pivot_rows: np.ndarray | None = None) -> np.ndarray:
    """Build ``R`` row by row; the one loop shared by construction, encoder check and decoder.

    ``symbols_for_row(k, x)`` returns row ``k``'s exact symbols; ``x`` is the estimate from the
    pivot rows (None when ``pivot_rows`` is None, i.e. plain construction).  Sharing the loop
    makes the encoder's simulation of the decoder use the very same float operations.

    ``B`` lives in the trailing columns of one Fortran-ordered ``d × d`` array: step ``k``
    reflects columns ``k…d−1`` in place (``B·H(u)``, a BLAS matrix-vector product and rank-one
    update), after which column ``k`` is ``B·u = r_k`` and the rest is the next basis.
    """
    with one_blas_thread():
        return _walk(d, grid_exps, symbols_for_row, pivot_rows)


def _walk(d: int, grid_exps: np.ndarray, symbols_for_row: Callable[[int, np.ndarray | None], np.ndarray],
          pivot_rows: np.ndarray | None) -> np.ndarray:
    from scipy.linalg.blas import dger

    b = np.asfortranarray(np.eye(d))
    rows = np.empty((d, d))
    for k in range(d - 1):
        n = d - k
        t = chart_t(n)
        h = float(pow2_8(int(grid_exps[k])))
        sub = b[:, k:]
        x = None
        if pivot_rows is not None:
            y = sub.T @ pivot_rows[k]
            with np.errstate(all="ignore"):
                x = (t / h) * (y[1:] / y[0])
            x = np.where(np.isfinite(x), np.clip(x, -2.0 ** 50, 2.0 ** 50), 0.0)
        s = symbols_for_row(k, x)
        v = np.empty(n)
        v[0] = t
        v[1:] = s.astype(np.float64) * h
        u = v / math.sqrt(float(v @ v))
        tt = float(u[1:] @ u[1:])
        if tt > 0.0:  # H(u) = I − c·w·wᵀ with w = u − e_1 (w_0 without cancellation) maps e_1 to u
            w = u.copy()
            w[0] = -tt / (1.0 + u[0])
            coef = 2.0 / float(w @ w)
            out = dger(-coef, sub @ w, w, a=sub, overwrite_a=1)
            if not np.shares_memory(out, b):  # pragma: no cover - BLAS wrappers copy only on odd layouts
                b[:, k:] = out
        rows[k] = b[:, k]
    rows[d - 1] = b[:, d - 1]
    return rows


def round_estimate(x: np.ndarray, fragile: np.ndarray) -> np.ndarray:
    """Nearest integer, except round down at the listed fragile positions (both sides agree)."""
    r = np.floor(x + 0.5)
    if fragile.size:
        r[fragile] = np.floor(x[fragile])
    return r.astype(np.int64)


def build_rotation(symbols: list[np.ndarray], grid_exps: np.ndarray) -> np.ndarray:
    d = len(grid_exps) + 1
    return walk_rotation(d, grid_exps, lambda k, x: symbols[k])


@dataclass
class Simulation:
    """What the encoder learns by running the decoder's recovery itself."""

    estimate: list[np.ndarray]  # ŝ per row
    fragile: np.ndarray  # flat positions (over all rows) rounded down
    rotation: np.ndarray


def simulate_recovery(symbols: list[np.ndarray], grid_exps: np.ndarray, pivot_rows: np.ndarray) -> Simulation:
    d = len(grid_exps) + 1
    estimate: list[np.ndarray] = []
    fragile: list[np.ndarray] = []
    offset = [0]

    def decide(k: int, x: np.ndarray | None) -> np.ndarray:
        assert x is not None
        frac = x - np.floor(x)
        weak = np.nonzero(np.abs(frac - 0.5) < FRAGILE)[0]
        estimate.append(round_estimate(x, weak))
        fragile.append(weak + offset[0])
        offset[0] += len(x)
        return symbols[k]

    rot = walk_rotation(d, grid_exps, decide, pivot_rows)
    return Simulation(estimate, np.concatenate(fragile) if fragile else np.zeros(0, np.int64), rot)


def recover(grid_exps: np.ndarray, pivot_rows: np.ndarray, corrections: list[np.ndarray],
            fragile: np.ndarray) -> list[np.ndarray]:
    """The decoder: the exact symbols from the decoded pivot rows and the corrections."""
    d = len(grid_exps) + 1
    out: list[np.ndarray] = []
    offset = [0]
    fragile = np.sort(fragile)

    def decide(k: int, x: np.ndarray | None) -> np.ndarray:
        assert x is not None
        lo, hi = np.searchsorted(fragile, [offset[0], offset[0] + len(x)])
        s = round_estimate(x, fragile[lo:hi] - offset[0]) + corrections[k]
        offset[0] += len(x)
        out.append(s)
        return s

    walk_rotation(d, grid_exps, decide, pivot_rows)
    return out


def symbols_crc(symbols: list[np.ndarray]) -> int:
    crc = 0
    for s in symbols:
        crc = zlib.crc32(np.ascontiguousarray(s, dtype="<i8").tobytes(), crc)
    return crc


@dataclass
class Frame:
    """The canonical frame of an interface: pivot rows, their ``L_kk`` in steps, ``F``."""

    pivots: np.ndarray  # (d,) indices into the interface's own rows
    diag: np.ndarray  # (d,) L_kk in quantisation steps
    frame: np.ndarray  # (d, d) orthonormal rows


def canonical_frame(rows: np.ndarray, steps: np.ndarray) -> Frame | None:
    """Pivoted QR of the step-scaled rows (see the module docstring); None if rank-deficient."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows)) / steps
    return frame_from(norms, lambda idx: rows[idx] / steps[idx, None], rows.shape[1])


def frame_from(scaled_norms: np.ndarray, fetch_scaled: Callable[[np.ndarray], np.ndarray], d: int) -> Frame | None:
    """:func:`canonical_frame` given the rows' norms in steps and a function that returns chosen
    rows in steps (so that a large interface never has to be stacked in memory).

    Candidates are the ``2d`` rows with the most steps (pivoting among ``4d`` gained < 0.2 % of
    the bits on SmolLM2 and took twice as long; no pivoting at all lost 0.5–1.5 %).  LAPACK's
    ``geqp3`` only chooses the pivots; the frame is the unpivoted QR of the chosen rows in that
    order (the same factorisation, computed with blocked BLAS-3 code).
    """
    import scipy.linalg

    n_rows = len(scaled_norms)
    cap = CANDIDATES_PER_DIM * d
    # the rows with the most steps, ties by position
    cand = np.sort(np.argsort(-scaled_norms, kind="stable")[:cap]) if n_rows > cap else np.arange(n_rows)
    if len(cand) < d:
        return None
    a = np.ascontiguousarray(fetch_scaled(cand).T)
    with one_blas_thread():
        _, perm = scipy.linalg.qr(a, mode="r", pivoting=True)
        q, r = np.linalg.qr(a[:, perm[:d]])
    pivots = cand[perm[:d]]
    diag = np.diag(r)
    if not np.all(np.abs(diag) > 1.0):  # a direction carried by less than one step: no frame
        return None
    sign = np.where(diag < 0, -1.0, 1.0)
    return Frame(pivots, np.abs(diag), (q * sign).T)


def grid_exponents(diag: np.ndarray) -> np.ndarray:
    """Per-row grid ``h_k`` (1/8-octave exponents): the noise level of the row's estimate."""
    d = len(diag)
    n = d - np.arange(d - 1)
    rho = np.sqrt(np.array([chart_t(int(v)) for v in n]) ** 2 + (n - 1))
    h = rho / (math.sqrt(12.0) * diag[: d - 1])
    return exp_of(h).astype(np.int64)


def log2_volume_orthogonal(d: int) -> float:
    """``log2 Vol(O(d))`` in the metric ``Σ_{i<j} A_ij²`` on skew-symmetric tangents
    (``Vol(SO(d)) = Π_{k=2..d} 2π^{k/2}/Γ(k/2)``, twice that for ``O(d)``)."""
    total = math.log(2.0)
    for k in range(2, d + 1):
        total += math.log(2.0) + 0.5 * k * math.log(math.pi) - math.lgamma(0.5 * k)
    return total / math.log(2.0)


def orbit_bits(gram_scaled: np.ndarray) -> float:
    """Information-theoretic estimate of the bits in one interface's rotation.

    ``gram_scaled`` is ``M̃ᵀM̃`` of all the interface's step-scaled rows (shortcuts included).
    The orbit ``{M̃R}`` is a ``d(d−1)/2``-dimensional manifold of volume
    ``Vol(O(d))·Π_{i<j} √(σ_i² + σ_j²)`` (``σ`` the singular values of ``M̃``); with one
    quantisation cell per unit volume, ``log2`` of it is the number of bits that distinguish the
    orbit's quantised members — what ideal bits-back coding gets back.
    """
    d = gram_scaled.shape[0]
    with one_blas_thread():
        ev = np.clip(np.linalg.eigvalsh(gram_scaled), 0.0, None)
    s = ev[:, None] + ev[None, :]
    iu = np.triu_indices(d, 1)
    with np.errstate(divide="ignore"):
        pair = 0.5 * np.log2(s[iu])
    return log2_volume_orthogonal(d) + float(np.sum(pair[np.isfinite(pair)]))


def exps_to_bytes(e: np.ndarray) -> bytes:
    return np.ascontiguousarray(e, dtype="<i2").tobytes()


__all__ = ["EXP_DEN", "Frame", "Simulation", "build_rotation", "canonical_frame", "expected_bits",
           "grid_exponents", "orbit_bits", "recover", "rotation_blocks", "simulate_recovery", "symbols_crc"]
