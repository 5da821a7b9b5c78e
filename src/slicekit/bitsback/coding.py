"""Quantisation and entropy coding of tensors with ``constriction``'s ANS stack.

Quantiser.  A tensor is cut into *slices* along a ``scale_axis`` (or is one slice) and every slice
gets a uniform step ``δ = 2^(e/8)`` (``e`` an int16 stored in the file).  Two precisions:

- ``float`` (the default, "the same precision as the unpacked dtype"): a float with a ``p``-bit
  significand (24 for float32, 11 for float16, 8 for bfloat16) rounds each value to a relative
  precision of ``2^-p``; an entropy coder needs one absolute step per slice instead, and we take
  the step that one unit in the last place has for a value of the slice's RMS size,
  ``δ ≈ 2^(1-p)·rms(slice)``.  The RMS quantisation error is then ``δ/√12 ≈ 0.58·2^-p·rms`` per
  entry — the same order as the float format's own rounding error (``≈ 0.4–0.8·2^-p·|w|``) — while
  the exponent bits, which an absolute grid does not need, are gone.  Values much smaller than
  the RMS get a coarser *relative* precision than the float had, values larger a finer one; the
  error of a matrix product depends on the absolute errors, which is what the step bounds.
- ``bits`` (an explicit ``bits=b``): one step per tensor, the smallest ``2^(e/8)`` for which the
  symmetric grid ``{-(2^(b-1)-1)·δ, …, (2^(b-1)-1)·δ}`` covers ``max|w|`` — a uniform b-bit
  quantiser over the tensor's range.

Coding model.  Symbols ``q = round(w/δ)`` are coded with a quantised Gaussian of mean 0 and a
standard deviation ``2^(s/8)`` per slice (``s`` stored; in ``float`` mode one value per tensor,
``2^(p-1)``, since every slice's ``rms/δ`` is that by construction).  A Gaussian prior costs
``½·Σq²/σ² + const`` bits: the cost depends on the symbols only through their sum of squares,
which rotations of the stream axis preserve when the slices run across it (the readers' rows,
the writers' columns).  So the coder charges every member of a rotation orbit nearly the same,
and the bits-back saving is hardly confounded with how Gaussian one particular basis happens to
look.  Nearly: constriction gives every symbol in range at least ``2^-24`` probability, so an
outlier costs at most ~24 bits instead of ``q²/2σ²``; SliceGPT's PCA basis concentrates large
values in a few columns of the embedding, head and shortcuts, and a random rotation spreads them
(measured on SmolLM2: 0.2–0.3 bits per weight dearer for those tensors, ≈ 0 for the others).
The encoder measures that difference exactly and counts it against the bits it gets back.

Large symbols are split ``q = hi·2^m + lo``: ``hi`` gets the Gaussian (standard deviation about
``2^9``, well inside constriction's 24-bit probability precision), ``lo`` the uniform model in
chunks of at most 16 bits (the low bits of a finely quantised smooth density are uniform).
Slices that are entirely zero are marked (``e = ZERO_EXP``) and not coded at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slicekit.errors import SlicekitError

EXP_DEN = 8  # exponents are in 1/8 octave
ZERO_EXP = -32768  # step exponent of an all-zero slice (nothing coded)
HI_STD_LOG2 = 9  # the Gaussian part of a symbol has a standard deviation of about 2^9
LO_CHUNK = 16  # uniform chunks of at most this many bits
MAX_HI_RANGE_LOG2 = 16  # m grows until the hi alphabet has at most ~2^17 symbols
# 2^(j/8) for j = 0..7, written out so that every platform builds bit-identical steps.
_FRAC = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "0x1.172b83c7d517bp+0", "0x1.306fe0a31b715p+0", "0x1.4bfdad5362a27p+0",
    "0x1.6a09e667f3bcdp+0", "0x1.8ace5422aa0dbp+0", "0x1.ae89f995ad3adp+0", "0x1.d5818dcfba487p+0"))

SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


def pow2_8(e: int | np.ndarray) -> float | np.ndarray:
    """``2^(e/8)``, exactly reproducible (a table and an exact power of two)."""
    if isinstance(e, np.ndarray):
        e64 = e.astype(np.int64)
        return np.ldexp(np.asarray(_FRAC)[e64 % EXP_DEN], (e64 // EXP_DEN).astype(np.int32))
    e = int(e)
    return math.ldexp(_FRAC[e % EXP_DEN], e // EXP_DEN)


def exp_of(x: np.ndarray | float, ceil: bool = False) -> np.ndarray:
    """The 1/8-octave exponent nearest to ``log2(x)`` (or the smallest one ≥ it)."""
    v = EXP_DEN * np.log2(np.asarray(x, dtype=np.float64))
    e = np.ceil(v - 1e-9) if ceil else np.rint(v)
    return np.clip(e, -32000, 32000).astype(np.int64)


@dataclass(frozen=True)
class Precision:
    """``kind="float"``: relative precision of a ``value``-bit significand (``None``: take it
    from each tensor's dtype); ``kind="bits"``: a ``value``-bit uniform grid per tensor."""

    kind: str
    value: int | None

    @classmethod
    def make(cls, bits: int | None, precision: str | None) -> Precision:
        if bits is not None and precision is not None:
            raise SlicekitError("give either bits or precision, not both")
        if bits is not None:
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 24:
                raise SlicekitError(f"bits must be an integer from 2 to 24 (got {bits!r})")
            return cls("bits", bits)
        if precision is not None:
            if precision not in SIGNIFICAND_BITS:
                raise SlicekitError(f"precision must be one of {', '.join(SIGNIFICAND_BITS)} (got {precision!r})")
            return cls("float", SIGNIFICAND_BITS[precision])
        return cls("float", None)

    def significand(self, dtype_name: str) -> int:
        if self.value is not None:
            return self.value
        if dtype_name not in SIGNIFICAND_BITS:
            raise SlicekitError(f"cannot derive a precision from dtype {dtype_name}; pass bits= or precision=")
        return SIGNIFICAND_BITS[dtype_name]

    def as_json(self) -> dict:
        return {"kind": self.kind, "value": self.value}


def slices_first(a: np.ndarray, scale_axis: int | None) -> np.ndarray:
    """``a`` as (slices, rest): the scale axis first, or one slice."""
    if scale_axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, scale_axis, 0).reshape(a.shape[scale_axis], -1)


def from_slices_first(flat: np.ndarray, shape: tuple[int, ...], scale_axis: int | None) -> np.ndarray:
    if scale_axis is None:
        return flat.reshape(shape)
    moved = (shape[scale_axis], *tuple(s for i, s in enumerate(shape) if i != scale_axis))
    return np.moveaxis(flat.reshape(moved), 0, scale_axis)


@dataclass
class Quantised:
    """A quantised tensor: integer symbols and the exponents that define steps and coding model."""

    q: np.ndarray  # int64, the tensor's shape
    scale_axis: int | None
    step_exp: np.ndarray  # int64, (n_slices,) or (1,)
    std_exp: np.ndarray  # int64, (n_slices,) or (1,)

    def n_slices(self) -> int:
        return 1 if self.scale_axis is None else int(self.q.shape[self.scale_axis])

    def steps(self) -> np.ndarray:
        """Per-slice step (0 where a slice is all zero), broadcast to (n_slices, 1)."""
        e = np.broadcast_to(self.step_exp, (self.n_slices(),))
        st = np.where(e == ZERO_EXP, 0.0, pow2_8(np.where(e == ZERO_EXP, 0, e)))
        return st.reshape(-1, 1)

    def values(self) -> np.ndarray:
        """The dequantised tensor in float64: ``q·δ`` (exact products, the same on every machine)."""
        flat = slices_first(self.q, self.scale_axis).astype(np.float64) * self.steps()
        return from_slices_first(flat, self.q.shape, self.scale_axis)


def quantise(w: np.ndarray, scale_axis: int | None, prec: Precision, dtype_name: str) -> Quantised:
    """Quantise a float64 array (see the module docstring for the two precisions)."""
    if not np.isfinite(w).all():
        raise SlicekitError("the checkpoint holds non-finite weights (inf/nan): they cannot be quantised")
    sl = slices_first(w, scale_axis)
    rms = np.sqrt(np.mean(sl * sl, axis=1)) if sl.shape[1] else np.zeros(sl.shape[0])
    if prec.kind == "float":
        p = prec.significand(dtype_name)
        step_exp = np.where(rms > 0, exp_of(np.where(rms > 0, rms, 1.0) * 2.0 ** (1 - p)), ZERO_EXP)
        std_exp = np.array([EXP_DEN * (p - 1)], dtype=np.int64)
    else:
        levels = 2 ** (prec.value - 1) - 1
        peak = float(np.abs(w).max()) if w.size else 0.0
        step_exp = np.array([exp_of(peak / levels, ceil=True) if peak > 0 else ZERO_EXP], dtype=np.int64)
        step = pow2_8(int(step_exp[0])) if peak > 0 else 1.0
        std_exp = exp_of(np.maximum(rms / step, 2.0 ** -3))
    step_exp = step_exp.astype(np.int64)
    qz = Quantised(np.zeros(w.shape, dtype=np.int64), scale_axis, step_exp, std_exp.astype(np.int64))
    steps = qz.steps()
    safe = np.where(steps > 0, steps, 1.0)
    q = sl / safe
    np.rint(q, out=q)
    q[(steps == 0).ravel()] = 0
    if np.abs(q).max(initial=0) >= 2.0 ** 62:
        raise SlicekitError("a weight is too large for the chosen precision (more than 2^62 steps)")
    qz.q = from_slices_first(q.astype(np.int64), w.shape, scale_axis)
    return qz


# ------------------------------------------------------------------------------- ANS helpers

def _gauss(lo: int, hi: int, mean: float, std: float):
    import constriction

    return constriction.stream.model.QuantizedGaussian(int(lo), int(hi), float(mean), float(std))


def _uniform(bits: int):
    import constriction

    return constriction.stream.model.Uniform(1 << bits)


def lo_bits_for(std: float, peak: float = 0.0) -> int:
    """How many low bits to code uniformly so that the Gaussian part stays small."""
    m = max(0, math.floor(math.log2(std)) - HI_STD_LOG2) if std > 0 else 0
    while peak / 2.0 ** m > 2.0 ** MAX_HI_RANGE_LOG2:
        m += 1
    return m


@dataclass(frozen=True)
class Block:
    """A run of integer symbols with one model: Gaussian ``hi`` part, uniform ``lo`` chunks.

    ``hi = v >> m`` (floor) is coded with a quantised Gaussian of standard deviation
    ``std / 2^m`` on ``[hi_min, hi_max]`` (mean −½ when ``m > 0``: the floor shifts it), then the
    low ``m`` bits in chunks of at most 16.  Chunks are a block's unit of stack order.
    """

    std: float
    m: int
    hi_min: int
    hi_max: int

    def chunks(self) -> list[tuple[object, int, int]]:
        """(model, shift, bits) per chunk; ``bits == -1`` marks the Gaussian part."""
        out: list[tuple[object, int, int]] = [(_gauss(self.hi_min, self.hi_max, -0.5 if self.m else 0.0,
                                                      self.std / 2.0 ** self.m), self.m, -1)]
        shift = 0
        while shift < self.m:
            bits = min(LO_CHUNK, self.m - shift)
            out.append((_uniform(bits), shift, bits))
            shift += bits
        return out

    def split(self, v: np.ndarray) -> list[np.ndarray]:
        parts = []
        for _, shift, bits in self.chunks():
            if bits < 0:
                parts.append((v >> shift).astype(np.int32))
            else:
                parts.append(((v >> shift) & ((1 << bits) - 1)).astype(np.int32))
        return parts

    def join(self, parts: list[np.ndarray]) -> np.ndarray:
        v = parts[0].astype(np.int64) << self.m
        for (_, shift, _), part in zip(self.chunks()[1:], parts[1:], strict=True):
            v |= part.astype(np.int64) << shift
        return v

    def check(self, v: np.ndarray) -> None:
        hi = v >> self.m
        if v.size and (hi.min() < self.hi_min or hi.max() > self.hi_max):
            raise ValueError("symbol outside its block's range")


def push_blocks(coder, items: list[tuple[Block, np.ndarray]]) -> None:
    """Push blocks so that :func:`pop_blocks` with the same blocks returns them in this order."""
    for block, values in reversed(items):
        if values.size == 0:
            continue
        for (model, _, _), part in zip(reversed(block.chunks()), reversed(block.split(values)), strict=True):
            coder.encode_reverse(np.ascontiguousarray(part), model)


def pop_blocks(coder, items: list[tuple[Block, int]]) -> list[np.ndarray]:
    """Pop blocks of the given sizes in order (the inverse of :func:`push_blocks`)."""
    out = []
    for block, count in items:
        if count == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        parts = [np.asarray(coder.decode(model, int(count))) for model, _, _ in block.chunks()]
        out.append(block.join(parts))
    return out


def push_bytes(coder, data: bytes) -> None:
    """Push raw bytes as uniform 16-bit symbols (two bytes each, little-endian, zero padded)."""
    if not data:
        return
    padded = data + b"\0" * (len(data) % 2)
    coder.encode_reverse(np.frombuffer(padded, dtype="<u2").astype(np.int32), _uniform(16))


def pop_bytes(coder, length: int) -> bytes:
    """Pop ``length`` bytes pushed by :func:`push_bytes`."""
    if length == 0:
        return b""
    symbols = np.asarray(coder.decode(_uniform(16), (length + 1) // 2))
    return symbols.astype("<u2").tobytes()[:length]


def gaussian_bits(block: Block) -> float:
    """Entropy in bits of one symbol of ``block`` (approximate: continuous Gaussian + uniform)."""
    hi_std = block.std / 2.0 ** block.m
    return max(0.0, math.log2(hi_std * math.sqrt(2 * math.pi * math.e))) + block.m


# ----------------------------------------------------------------------- tensors on the stack

@dataclass
class TensorLayout:
    """How a quantised tensor is laid out on the stack (what the header stores about it)."""

    shape: tuple[int, ...]
    scale_axis: int | None
    step_exp: np.ndarray
    std_exp: np.ndarray
    m: int
    hi_min: int
    hi_max: int

    def groups(self) -> list[tuple[int, np.ndarray]]:
        """(std exponent, slice indices) for the coded slices, by increasing exponent."""
        n = 1 if self.scale_axis is None else self.shape[self.scale_axis]
        step = np.broadcast_to(self.step_exp, (n,))
        std = np.broadcast_to(self.std_exp, (n,))
        coded = np.nonzero(step != ZERO_EXP)[0]
        return [(int(e), coded[std[coded] == e]) for e in np.unique(std[coded])]

    def blocks(self) -> list[tuple[Block, np.ndarray]]:
        return [(Block(pow2_8(e), self.m, self.hi_min, self.hi_max), rows) for e, rows in self.groups()]

    def slice_len(self) -> int:
        n = 1 if self.scale_axis is None else self.shape[self.scale_axis]
        return int(np.prod(self.shape)) // max(n, 1) if n else 0


def layout_of(qz: Quantised) -> TensorLayout:
    std_max = float(pow2_8(int(qz.std_exp.max())))
    peak = float(np.abs(qz.q).max(initial=0))
    m = lo_bits_for(std_max, peak)
    hi = qz.q >> m
    return TensorLayout(tuple(qz.q.shape), qz.scale_axis, qz.step_exp, qz.std_exp, m,
                        int(hi.min(initial=0)), int(hi.max(initial=0)))


def tensor_items(layout: TensorLayout, q: np.ndarray) -> list[tuple[Block, np.ndarray]]:
    sl = slices_first(q, layout.scale_axis)
    return [(block, sl[rows].ravel()) for block, rows in layout.blocks()]


def tensor_counts(layout: TensorLayout) -> list[tuple[Block, int]]:
    per = layout.slice_len()
    return [(block, len(rows) * per) for block, rows in layout.blocks()]


def tensor_from_parts(layout: TensorLayout, parts: list[np.ndarray]) -> np.ndarray:
    n = 1 if layout.scale_axis is None else layout.shape[layout.scale_axis]
    sl = np.zeros((n, layout.slice_len()), dtype=np.int64)
    for (_, rows), values in zip(layout.blocks(), parts, strict=True):
        sl[rows] = values.reshape(len(rows), -1)
    return from_slices_first(sl, layout.shape, layout.scale_axis)
