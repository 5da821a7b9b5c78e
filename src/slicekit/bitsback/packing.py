"""``pack`` / ``unpack`` / ``load_packed``: the encoder and decoder around one ANS stack.

Stack order.  The encoder first pushes the checkpoint's non-weight files and the tensors
that belong to no interface, then visits the interfaces (the narrowest first, then in network
order).  At interface ``k`` it

1. pops the symbols of a rotation ``R_k`` from the stack (bits-back: they *are* bits of what is
   already coded) — only if the stack holds comfortably more bits than that (popping from a
   short stack gains nothing); the checkpoint's other files (config, tokenizer, compressed) are
   pushed first so that the first interface has bits to pop;
2. rotates the interface's tensors by ``Ω_k = Fᵀ·R_k`` (``F`` the canonical frame, so the stored
   weights are the canonical form times ``R_k``) and quantises them;
3. runs the decoder's recovery on the quantised weights and pushes the corrections;
4. pushes the interface's own tensors and every shortcut whose two interfaces are now rotated.

If the pop turned out not to pay for its corrections, its side information and what the
rotated weights cost more than the unrotated ones (both are coded on a scratch coder to know
exactly), it is undone (corrections popped, ``R_k``'s symbols pushed back) and the interface is
stored as is.  The
decoder runs the same steps backwards: pop the weights, pop the corrections, recover ``R_k``'s
symbols exactly, push them back — which leaves on the stack exactly the bits the encoder popped,
i.e. the tensors coded before.  See :mod:`slicekit.bitsback.rotation` for the frame, the code of
``R`` and the correction, :mod:`slicekit.bitsback.coding` for precision and coding model.

The unpacked model is the packed one with each interface rotated by ``Ω_k`` (a member of its
symmetry orbit: same function) and every weight rounded to its quantisation step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slicekit.bitsback import coding as cd
from slicekit.bitsback import rotation as rt
from slicekit.bitsback.container import SectionWriter, read_container, write_container
from slicekit.bitsback.interfaces import Interface, rotation_interfaces
from slicekit.errors import SlicekitError

FORMAT = "slicekit-packed"
FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors.index.json",)
CORRECTION_RANGE = 1 << 15  # larger corrections mean recovery failed: the interface is stored as is


@dataclass
class InterfaceStats:
    key: str
    width: int
    status: str  # "bits-back", or why not
    popped_bits: int = 0
    correction_bits: int = 0
    #: what the rotated weights cost more than the unrotated ones (the coder charges outliers at
    #: most 24 bits, so a heavy-tailed basis is a little cheaper than a random one)
    rotation_cost_bits: int = 0
    side_bytes: int = 0
    estimate_bits: float = 0.0
    correction_std: float = 0.0
    fragile: int = 0


@dataclass
class PackReport:
    """What :func:`pack` did; sizes in bytes, bit counts exact (from the coder)."""

    path: str
    file_bytes: int
    ans_bytes: int
    header_bytes: int
    files_bytes: int  # config, tokenizer and other non-weight files (zlib, inside the ANS stream)
    side_bytes: int  # exponents, pivots, grids, fragile lists, raw tensors
    safetensors_bytes: int  # the weights as safetensors at the same precision (b-bit packed for bits=b)
    precision: dict[str, Any]
    bits_back: bool
    symmetry_found: bool
    interfaces: list[InterfaceStats] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""

    @property
    def saved_bits(self) -> int:
        """Net bits saved by bits-back: popped − corrections − extra cost of the rotated weights."""
        return sum(i.popped_bits - i.correction_bits - i.rotation_cost_bits for i in self.interfaces)

    @property
    def estimate_bits(self) -> float:
        return sum(i.estimate_bits for i in self.interfaces)

    def summary(self) -> str:
        """A few lines for the CLI: sizes, what bits-back did, the estimate when computed."""
        used = [i for i in self.interfaces if i.status == "bits-back"]
        lines = [f"wrote {self.path}: {self.file_bytes / 2**20:.2f} MiB "
                 f"({100 * self.file_bytes / max(self.safetensors_bytes, 1):.1f} % of the weights as safetensors at "
                 f"the same precision, {self.safetensors_bytes / 2**20:.2f} MiB)", self.message]
        if used:
            lines.append(f"bits back: {self.saved_bits / 8 / 2**20:.2f} MiB net "
                         f"({sum(i.popped_bits for i in used) / 8 / 2**20:.2f} MiB popped, "
                         f"{sum(i.correction_bits for i in used) / 8 / 2**20:.2f} MiB corrections, "
                         f"{sum(i.rotation_cost_bits for i in used) / 8 / 2**20:.2f} MiB dearer rotated weights)")
        if self.estimate_bits:
            lines.append(f"information-theoretic estimate: {self.estimate_bits / 8 / 2**20:.2f} MiB")
        lines.append(f"time {self.seconds:.1f} s")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["saved_bits"] = self.saved_bits
        d["estimate_bits"] = self.estimate_bits
        return d


# -------------------------------------------------------------------------------- helpers

def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _to_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _rows(w: np.ndarray, axis: int, d: int) -> np.ndarray:
    return np.moveaxis(w, axis, -1).reshape(-1, d)


class _RowSpace:
    """An interface's own rows stacked *virtually* (member after member, as :func:`_rows` lays
    them out), so that chosen rows can be gathered without stacking a whole interface."""

    def __init__(self, members: list, counts: list[int], width: int) -> None:
        self.members, self.width = members, width
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, idx: np.ndarray, rows_of) -> np.ndarray:
        """Rows ``idx``; ``rows_of(j, local)`` returns member ``j``'s rows ``local`` (float64)."""
        out = np.empty((len(idx), self.width))
        for j in range(len(self.members)):
            sel = np.nonzero((idx >= self.offsets[j]) & (idx < self.offsets[j + 1]))[0]
            if sel.size:
                out[sel] = rows_of(j, idx[sel] - self.offsets[j])
        return out


def _qrows(qz: cd.Quantised, axis: int, d: int, local: np.ndarray) -> np.ndarray:
    """Rows ``local`` of ``_rows(qz.values(), axis, d)`` without dequantising the whole tensor."""
    steps = qz.steps().ravel()
    if qz.scale_axis is None:
        return np.moveaxis(qz.q, axis, -1).reshape(-1, d)[local].astype(np.float64) * steps[0]
    if qz.q.ndim == 2 and qz.scale_axis == 1 - axis:  # own members: one slice per row
        return np.moveaxis(qz.q, axis, -1)[local].astype(np.float64) * steps[local][:, None]
    return _rows(qz.values(), axis, d)[local]


def _rows_from_arrays(arrays: dict[str, np.ndarray], own: list, d: int):
    return lambda j, local: _rows(arrays[own[j].name], own[j].axis, d)[local]


def _rows_from_quantised(quantised: dict[str, cd.Quantised], own: list, d: int):
    return lambda j, local: _qrows(quantised[own[j].name], own[j].axis, d, local)


def _contract(w: np.ndarray, axis: int, omega: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.moveaxis(w, axis, -1) @ omega, -1, axis)


def _scale_axis(shape: tuple[int, ...], own_axis: int | None) -> int | None:
    """Slices run across the stream axis (so the coding cost is rotation invariant); plain 2-D
    tensors are coded per row, anything else per tensor."""
    if len(shape) != 2:
        return None
    if own_axis is not None:
        return 1 - own_axis
    return 0


def _step_estimates(w: np.ndarray, axis: int, d: int, prec: cd.Precision, dtype: str) -> np.ndarray:
    """Quantisation step of each row of ``_rows(w)`` as :func:`coding.quantise` will choose it."""
    rows = _rows(w, axis, d)
    if prec.kind == "float":
        rms = np.sqrt(np.einsum("ij,ij->i", rows, rows) / d)
        step = rms * 2.0 ** (1 - prec.significand(dtype))
    else:
        step = np.full(rows.shape[0], np.abs(w).max() / (2 ** (prec.value - 1) - 1))
    return np.where(step > 0, step, np.inf)


def _collect_files(directory: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel.endswith(".safetensors") or rel in WEIGHT_FILES or not os.path.isfile(full):
                continue
            with open(full, "rb") as fh:
                out[rel] = fh.read()
    return out


def _safe_relpath(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SlicekitError(f"packed file lists an unsafe file name {name!r}: the file is corrupt or malicious")
    return os.path.join(*parts)


@contextlib.contextmanager
def _source_dir(source: Any, tokenizer: Any) -> Iterator[str]:
    if isinstance(source, nn.Module):
        from slicekit.checkpoint import save

        tmp = tempfile.mkdtemp(prefix="slicekit-pack-")
        try:
            save(source, tokenizer, os.path.join(tmp, "model"))
            yield os.path.join(tmp, "model")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = os.fspath(source)
    if not os.path.isdir(path):
        raise SlicekitError(f"pack needs a saved checkpoint directory or a model (got {path!r})")
    yield path


# ------------------------------------------------------------------------------------ encode

class _Encoder:
    def __init__(self, tensors: dict[str, torch.Tensor], params: set[str], interfaces: list[Interface],
                 prec: cd.Precision, bits_back: bool) -> None:
        import constriction

        self.tensors, self.prec, self.bits_back = tensors, prec, bits_back
        self.interfaces = interfaces
        self.coder = constriction.stream.stack.AnsCoder()
        self.sections = SectionWriter()
        self.entries: dict[str, dict[str, Any]] = {}
        self.quantised = {n for n, t in tensors.items() if n in params and t.is_floating_point() and t.numel() > 0}
        self.membership: dict[str, list[tuple[int, int, bool]]] = {}
        for k, iface in enumerate(interfaces):
            for m in iface.members:
                if m.name in self.quantised:
                    self.membership.setdefault(m.name, []).append((k, m.axis, m.own))
        self.omega: dict[int, np.ndarray] = {}
        self.stats: list[InterfaceStats] = [InterfaceStats(i.key, i.width, "pending") for i in interfaces]

    # --- tensors
    def own_axis(self, name: str) -> int | None:
        for _, axis, own in self.membership.get(name, []):
            if own:
                return axis
        return None

    def rotated(self, name: str) -> np.ndarray:
        w = _to_f64(self.tensors[name])
        for k, axis, _ in self.membership.get(name, []):
            if k in self.omega:
                w = _contract(w, axis, self.omega[k])
        return w

    def quantise(self, name: str) -> cd.Quantised:
        t = self.tensors[name]
        w = self.rotated(name)
        return cd.quantise(w, _scale_axis(tuple(w.shape), self.own_axis(name)), self.prec, _dtype_name(t))

    def entry(self, name: str, qz: cd.Quantised) -> tuple[dict[str, Any], list]:
        lay = cd.layout_of(qz)

        def exps(e: np.ndarray) -> int | dict:
            if e.size == 1:
                return int(e[0])
            return {"section": self.sections.add(rt.exps_to_bytes(e))}

        entry = {"name": name, "dtype": _dtype_name(self.tensors[name]), "shape": list(lay.shape),
                 "code": "ans", "scale_axis": lay.scale_axis, "m": lay.m, "hi": [lay.hi_min, lay.hi_max],
                 "step_exp": exps(lay.step_exp), "std_exp": exps(lay.std_exp)}
        return entry, cd.tensor_items(lay, qz.q)

    def cost(self, names: list[str], quantised: dict[str, cd.Quantised]) -> int:
        """Exact bits the tensors cost on the stack (pushed on a scratch coder)."""
        import constriction

        scratch = constriction.stream.stack.AnsCoder()
        items = [it for name in names for it in cd.tensor_items(cd.layout_of(quantised[name]), quantised[name].q)]
        cd.push_blocks(scratch, items)
        return scratch.num_valid_bits()

    def push_tensors(self, names: list[str], prepared: dict[str, cd.Quantised]) -> int:
        items: list = []
        for name in names:
            entry, its = self.entry(name, prepared.pop(name) if name in prepared else self.quantise(name))
            self.entries[name] = entry
            items += its
        before = self.coder.num_valid_bits()
        cd.push_blocks(self.coder, items)
        return self.coder.num_valid_bits() - before

    # --- interfaces
    def row_space(self, iface: Interface, own: list) -> _RowSpace:
        return _RowSpace(own, [self.tensors[m.name].numel() // iface.width for m in own], iface.width)

    def estimate(self, iface: Interface) -> float:
        d = iface.width
        gram = np.zeros((d, d))
        for m in iface.members:
            if m.name not in self.quantised:
                continue
            t = self.tensors[m.name]
            w = _to_f64(t)
            rows = _rows(w, m.axis, d)
            if m.own:
                steps = _step_estimates(w, m.axis, d, self.prec, _dtype_name(t))
            else:
                steps = np.full(rows.shape[0], _step_estimates(w.reshape(1, -1), 1, w.size, self.prec,
                                                               _dtype_name(t))[0])
            scaled = rows / steps[:, None]
            gram += scaled.T @ scaled
        return rt.orbit_bits(gram)

    def try_bits_back(self, k: int, names: list[str]) -> tuple[dict[str, cd.Quantised], dict[str, Any]]:
        """Steps 1–3 of the module docstring for interface ``k``; returns the quantised tensors of
        this step (rotated or not) and the interface's header entry."""
        iface, st = self.interfaces[k], self.stats[k]
        info: dict[str, Any] = {"bits_back": False}
        own = [m for m in iface.own if m.name in self.quantised]
        if not self.bits_back:
            st.status = "bits-back off"
            return {}, info
        if iface.width < 2 or not own:
            st.status = "nothing to rotate"
            return {}, info
        d = iface.width
        space = self.row_space(iface, own)
        values = {m.name: _to_f64(self.tensors[m.name]) for m in own}
        steps = np.concatenate([_step_estimates(values[m.name], m.axis, d, self.prec,
                                                _dtype_name(self.tensors[m.name])) for m in own])
        norms = np.concatenate([np.sqrt(np.einsum("ij,ij->i", r, r)) for r in
                                (_rows(values[m.name], m.axis, d) for m in own)]) / steps
        fetch = _rows_from_arrays(values, own, d)
        frame = rt.frame_from(norms, lambda idx: space.gather(idx, fetch) / steps[idx, None], d)
        values.clear()
        if frame is None:
            st.status = "no canonical frame (rank-deficient)"
            return {}, info
        grid = rt.grid_exponents(frame.diag)
        b0 = self.coder.num_valid_bits()
        if b0 < 1.1 * rt.expected_bits(grid) + 4096:  # popping from a short stack gains nothing
            st.status = "too few bits on the stack to pop yet: stored as is"
            return {}, info
        plain_cost = self.cost(names, {name: self.quantise(name) for name in names})
        blocks = rt.rotation_blocks(grid)
        symbols = cd.pop_blocks(self.coder, blocks)
        b1 = self.coder.num_valid_bits()
        rot = rt.build_rotation(symbols, grid)
        self.omega[k] = frame.frame.T @ rot
        prepared = {name: self.quantise(name) for name in names}
        rotation_cost = self.cost(names, prepared) - plain_cost
        pivot_rows = space.gather(frame.pivots, _rows_from_quantised(prepared, own, d))
        sim = rt.simulate_recovery(symbols, grid, pivot_rows)
        corr = np.concatenate([s - e for s, e in zip(symbols, sim.estimate, strict=True)])
        peak = int(np.abs(corr).max(initial=0))
        undo = None
        if peak >= CORRECTION_RANGE:
            undo = f"recovery failed (correction {peak})"
        std = max(float(np.sqrt(np.mean(corr.astype(np.float64) ** 2))), 0.3)
        corr_exp = int(cd.exp_of(std))
        corr_block = cd.Block(float(cd.pow2_8(corr_exp)), 0, -max(peak, 1), max(peak, 1))
        if undo is None:
            cd.push_blocks(self.coder, [(corr_block, corr)])
        b2 = self.coder.num_valid_bits()
        side = 4 * iface.width + 2 * iface.width + 4 * len(sim.fragile) + 64
        if undo is None and b0 - b2 - rotation_cost <= 8 * side:
            undo = f"no gain (popped {b0 - b1}, corrections {b2 - b1}, rotated weights {rotation_cost:+d} bits)"
            cd.pop_blocks(self.coder, [(corr_block, corr.size)])
        if undo is not None:
            cd.push_blocks(self.coder, list(zip([b for b, _ in blocks], symbols, strict=True)))
            if self.coder.num_valid_bits() != b0:  # pragma: no cover - ANS pop/push are exact inverses
                raise RuntimeError("internal error: undoing a bits-back pop did not restore the stack")
            del self.omega[k]
            st.status = undo
            return {}, info
        st.status = "bits-back"
        st.popped_bits, st.correction_bits, st.rotation_cost_bits = b0 - b1, b2 - b1, rotation_cost
        st.correction_std, st.fragile, st.side_bytes = std, len(sim.fragile), side
        info = {"bits_back": True,
                "pivots": self.sections.add(np.ascontiguousarray(frame.pivots, dtype="<i4").tobytes()),
                "grid": self.sections.add(rt.exps_to_bytes(grid)),
                "fragile": self.sections.add(np.ascontiguousarray(sim.fragile, dtype="<i4").tobytes()),
                "corr": [corr_exp, max(peak, 1)], "crc32": rt.symbols_crc(symbols)}
        return prepared, info

    def run(self, order: list[int], files_blob: bytes) -> tuple[list[dict], list[dict]]:
        where = {k: i for i, k in enumerate(order)}
        step_of: dict[str, int] = {}
        for name in self.quantised:
            ks = [k for k, _, _ in self.membership.get(name, [])]
            step_of[name] = 1 + max(where[k] for k in ks) if ks else 0
        names_by_step: list[list[str]] = [[] for _ in range(len(order) + 1)]
        for name in self.tensors:  # checkpoint order within a step
            if name in step_of:
                names_by_step[step_of[name]].append(name)
        steps = [{"kind": "plain", "tensors": names_by_step[0]}]
        # The checkpoint's other files (config, tokenizer — compressed, so near-random bytes) go to
        # the bottom of the stack: they give the first interface bits to pop.
        cd.push_bytes(self.coder, files_blob)
        self.push_tensors(names_by_step[0], {})
        iface_entries: list[dict] = [{} for _ in self.interfaces]
        for i, k in enumerate(order):
            names = names_by_step[i + 1]
            prepared, info = self.try_bits_back(k, names)
            self.push_tensors(names, prepared)
            iface_entries[k] = {**self.interfaces[k].as_json(), **info}
            steps.append({"kind": "interface", "interface": k, "tensors": names})
        return steps, iface_entries


def pack(source: str | os.PathLike | nn.Module, out_path: str | os.PathLike, bits: int | None = None, *,
         precision: str | None = None, bits_back: bool = True, tokenizer: Any = None,
         estimate: bool = False) -> PackReport:
    """Write a packed model file: quantised weights, entropy coded, bits back from rotations.

    ``source``: a checkpoint directory written by :func:`slicekit.save` (or any directory
    :func:`slicekit.load` reads), or an in-memory model (saved to a temporary directory first,
    with ``tokenizer``).  ``bits``: uniform ``bits``-bit quantisation per tensor; default: the
    precision of each tensor's dtype (see :mod:`slicekit.bitsback.coding`), or of ``precision``
    ("float32", "float16", "bfloat16") when given.  ``bits_back=False`` codes the same weights
    with the same coder but without bits-back (for comparison).  ``estimate``: also compute the
    information-theoretic estimate of each interface's rotation (about 1 s per interface of
    SmolLM2-135M; off by default).
    """
    from slicekit.checkpoint import load
    from slicekit.modeling_slicekit import checkpoint_tensors

    prec = cd.Precision.make(bits, precision)
    started = time.perf_counter()
    with _source_dir(source, tokenizer) as directory:
        model, _ = load(directory)
        files = _collect_files(directory)
    tensors = checkpoint_tensors(model)
    params = {n for n, _ in model.named_parameters()}
    interfaces = rotation_interfaces(model)
    del model
    enc = _Encoder(tensors, params, interfaces, prec, bits_back)
    order = list(range(len(interfaces)))
    if order:  # if the stack is too short for the first pop, lose the narrowest interface
        first = min(order, key=lambda k: (interfaces[k].width, k))
        order.remove(first)
        order.insert(0, first)
    names = sorted(files)
    raw_files = b"".join(files[n] for n in names)
    files_blob = zlib.compress(raw_files, 9) if raw_files else b""
    steps, iface_entries = enc.run(order, files_blob)
    if estimate:
        for k, iface in enumerate(interfaces):
            enc.stats[k].estimate_bits = enc.estimate(iface)
    raw_entries = []
    for name, t in tensors.items():
        if name not in enc.quantised:
            data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            raw_entries.append({"name": name, "dtype": _dtype_name(t), "shape": list(t.shape), "code": "raw",
                                "section": enc.sections.add(data)})
    side_bytes = enc.sections.size
    file_entries = [{"name": n, "length": len(files[n])} for n in names]
    files_bytes = len(files_blob)
    words = np.ascontiguousarray(enc.coder.get_compressed(), dtype="<u4")
    del enc.coder
    ans_section = enc.sections.add(words, compress=False)
    tensor_entries = [enc.entries[n] if n in enc.entries else next(r for r in raw_entries if r["name"] == n)
                      for n in tensors]
    symmetry = bool(interfaces)
    used = sum(s.status == "bits-back" for s in enc.stats)
    if not symmetry:
        message = "no rotation symmetry found (not a rotated model): weights coded without bits-back"
    else:
        message = (f"{len(interfaces)} rotation-symmetric interface(s), bits-back on {used}" if bits_back else
                   f"{len(interfaces)} rotation-symmetric interface(s); bits-back off (the same coder without it)")
    header = {"format": FORMAT, "version": FORMAT_VERSION, "precision": prec.as_json(), "tensors": tensor_entries,
              "steps": steps, "interfaces": iface_entries, "files": file_entries,
              "files_blob": [len(files_blob), len(raw_files)], "ans": ans_section,
              "message": message, "stats": [asdict(s) for s in enc.stats]}
    size = write_container(os.fspath(out_path), header, enc.sections)
    head_bytes = size - enc.sections.size
    st_bytes = _safetensors_bytes(tensors, enc.quantised, prec)
    return PackReport(os.fspath(out_path), size, words.nbytes, head_bytes, files_bytes, side_bytes, st_bytes,
                      prec.as_json(), bits_back, symmetry, enc.stats, time.perf_counter() - started, message)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], quantised: set[str], prec: cd.Precision) -> int:
    """Weights as safetensors in the dtype whose precision was used (b-bit packed for ``bits``),
    other tensors as they are; the safetensors header is not counted."""
    total = 0
    for name, t in tensors.items():
        if name not in quantised:
            total += t.numel() * t.element_size()
        elif prec.kind == "bits":
            total += (t.numel() * prec.value + 7) // 8
        else:
            p = prec.significand(_dtype_name(t))
            nbytes = {53: 8, 24: 4, 11: 2, 8: 2}.get(p, t.element_size())
            total += t.numel() * nbytes
    return total


# ------------------------------------------------------------------------------------ decode

def _layout(entry: dict[str, Any], box) -> cd.TensorLayout:
    def exps(v: Any) -> np.ndarray:
        if isinstance(v, dict):
            return np.frombuffer(box.section(v["section"]), dtype="<i2").astype(np.int64)
        return np.array([int(v)], dtype=np.int64)

    return cd.TensorLayout(tuple(int(s) for s in entry["shape"]), entry["scale_axis"], exps(entry["step_exp"]),
                           exps(entry["std_exp"]), int(entry["m"]), int(entry["hi"][0]), int(entry["hi"][1]))


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise SlicekitError(f"packed file names an unknown dtype {name!r}")
    return dt


def decode(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, bytes], dict[str, Any]]:
    """Decode a packed file: ``(tensors, files, header)``; tensors in their original dtypes."""
    import constriction

    box = read_container(path)
    h = box.header
    if h.get("format") != FORMAT:
        raise SlicekitError(f"{os.fspath(path)} is not a packed slicekit model (format {h.get('format')!r})")
    if int(h.get("version", -1)) > FORMAT_VERSION:
        raise SlicekitError(f"{os.fspath(path)} has packed format version {h.get('version')}; this slicekit reads "
                            f"up to {FORMAT_VERSION} — upgrade slicekit")
    try:
        return _decode(box, constriction)
    except SlicekitError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise SlicekitError(f"{os.fspath(path)} has an inconsistent header ({type(err).__name__}: {err})") from err


def _decode(box, constriction) -> tuple[dict[str, torch.Tensor], dict[str, bytes], dict[str, Any]]:
    h = box.header
    entries = {e["name"]: e for e in h["tensors"]}
    interfaces = [Interface.from_json(e) for e in h["interfaces"]]
    view = box.raw_view(h["ans"])
    if len(view) % 4:
        raise SlicekitError("packed ANS stream is not a whole number of words: the file is corrupt")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(view, dtype="<u4"))
    del view
    out: dict[str, torch.Tensor] = {}
    for step in reversed(h["steps"]):
        names = step["tensors"]
        layouts = [_layout(entries[n], box) for n in names]
        counts = [c for lay in layouts for c in cd.tensor_counts(lay)]
        parts = cd.pop_blocks(coder, counts)
        kept: dict[str, cd.Quantised] = {}
        iface = interfaces[int(step["interface"])] if step["kind"] == "interface" else None
        info = h["interfaces"][int(step["interface"])] if iface is not None else {}
        needed = {m.name for m in iface.own} if iface is not None and info.get("bits_back") else set()
        at = 0
        for name, lay in zip(names, layouts, strict=True):
            n_blocks = len(lay.blocks())
            q = cd.tensor_from_parts(lay, parts[at:at + n_blocks])
            parts[at:at + n_blocks] = [None] * n_blocks
            at += n_blocks
            qz = cd.Quantised(q, lay.scale_axis, lay.step_exp, lay.std_exp)
            out[name] = torch.from_numpy(qz.values()).to(_torch_dtype(entries[name]["dtype"]))
            if name in needed:
                kept[name] = qz
        if not needed:
            continue
        d = iface.width
        own = [m for m in iface.own if m.name in kept]
        space = _RowSpace(own, [int(np.prod(kept[m.name].q.shape)) // d for m in own], d)
        pivots = np.frombuffer(box.section(info["pivots"]), dtype="<i4").astype(np.int64)
        grid = np.frombuffer(box.section(info["grid"]), dtype="<i2").astype(np.int64)
        fragile = np.frombuffer(box.section(info["fragile"]), dtype="<i4").astype(np.int64)
        if len(pivots) != d or len(grid) != d - 1 or pivots.min() < 0 or pivots.max() >= len(space):
            raise SlicekitError("packed file has inconsistent rotation side information: the file is corrupt")
        corr_exp, peak = int(info["corr"][0]), int(info["corr"][1])
        blocks = rt.rotation_blocks(grid)
        total = sum(n for _, n in blocks)
        corr = cd.pop_blocks(coder, [(cd.Block(float(cd.pow2_8(corr_exp)), 0, -peak, peak), total)])[0]
        split = np.cumsum([n for _, n in blocks])[:-1]
        pivot_rows = space.gather(pivots, _rows_from_quantised(kept, own, d))
        kept.clear()
        symbols = rt.recover(grid, pivot_rows, np.split(corr, split), fragile)
        if rt.symbols_crc(symbols) != int(info["crc32"]):
            raise SlicekitError(f"bits-back rotation of interface {iface.key} was not recovered exactly (float "
                                "round-off differs too much from the machine that packed it); re-pack with "
                                "bits_back=False to get a file that does not depend on it")
        for (block, _), s in zip(blocks, symbols, strict=True):
            block.check(s)
        cd.push_blocks(coder, list(zip([b for b, _ in blocks], symbols, strict=True)))
    blob_len, raw_len = (int(v) for v in h["files_blob"])
    blob = cd.pop_bytes(coder, blob_len)
    if not coder.is_empty():
        raise SlicekitError("packed stream did not decode to its end: the file is corrupt or from an incompatible "
                            "slicekit")
    try:
        raw_files = zlib.decompress(blob) if blob_len else b""
    except zlib.error as err:
        raise SlicekitError("the packed non-weight files do not decompress: the file is corrupt") from err
    lengths = [int(f["length"]) for f in h["files"]]
    if len(raw_files) != raw_len or sum(lengths) != raw_len:
        raise SlicekitError("the packed non-weight files have the wrong length: the file is corrupt")
    for e in h["tensors"]:
        if e["code"] == "raw":
            data = box.section(e["section"])
            dt = _torch_dtype(e["dtype"])
            shape = [int(s) for s in e["shape"]]
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
            out[e["name"]] = t.view(dt).reshape(shape).clone()
    tensors = {e["name"]: out[e["name"]] for e in h["tensors"]}
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    files = {f["name"]: raw_files[offsets[i]:offsets[i + 1]] for i, f in enumerate(h["files"])}
    return tensors, files, h


def unpack(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Decode a packed file into a checkpoint directory (written atomically); returns its path.

    The directory holds the original non-weight files and one ``model.safetensors``.
    """
    from safetensors.torch import save_file

    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target) and not os.path.isdir(target):
        raise SlicekitError(f"output path {target} exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not os.path.isfile(os.path.join(target, "config.json")):
        # an existing output is replaced as a whole: never swap away a directory that is not a model
        raise SlicekitError(f"output directory {target} exists and is not a model directory (no config.json); "
                            "give a new or empty directory")
    tensors, files, _ = decode(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        for name, data in files.items():
            dest = os.path.join(tmp, _safe_relpath(name))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as fh:
                fh.write(data)
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_packed(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a packed model directly: ``(model, tokenizer)`` (unpacked to a temporary directory)."""
    from slicekit.checkpoint import load

    tmp = tempfile.mkdtemp(prefix="slicekit-unpack-")
    try:
        directory = unpack(path, os.path.join(tmp, "model"))
        return load(directory, dtype=dtype, device=device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """The header summary of a packed file (verified, nothing decoded)."""
    h = read_container(path).header
    return {"format": h.get("format"), "version": h.get("version"), "precision": h.get("precision"),
            "message": h.get("message"), "tensors": len(h.get("tensors", [])),
            "interfaces": h.get("stats", []), "files": [f["name"] for f in h.get("files", [])]}
