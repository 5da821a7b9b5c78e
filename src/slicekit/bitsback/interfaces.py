"""Which tensors of a model share one orthogonal symmetry: the rotation-symmetric residual interfaces.

In a rotated (SliceGPT-style) model the residual stream between two consecutive shortcut
matrices is a width-``d`` vector space on which nothing non-linear acts in a basis-dependent way:
it is written by linears (and the embeddings), read by linears *after* a weightless
:class:`~slicekit.modeling_slicekit.UnitRMSNorm` (which only uses ``‖x‖`` and so commutes with
any orthogonal map), carried forward by the shortcut matrices and finally read by the head after
another weightless norm.  Replacing, at one such interface, every reader ``W`` by ``W·R``, every
writer ``W`` (and its bias) by ``Rᵀ·W``, every shortcut that *leaves* the interface ``S`` by
``Rᵀ·S`` and every shortcut that *enters* it by ``S·R`` leaves the network's function unchanged
for any ``R ∈ O(d)``.  Interfaces are independent of each other: the shortcut between two of
them takes one rotation on each side.

Every such transformation has the same form in the stored tensor: the tensor's *stream axis*
(the axis of length ``d`` that indexes the interface's coordinates) is contracted with ``R``,
``T'[..., j, ...] = Σ_i T[..., i, ...] R[i, j]``.  An :class:`Interface` therefore lists
``(tensor name, axis, side)`` triples; ``side`` says what the tensor does to the stream —
``reader``/``writer`` (the interface's *own* tensors, which involve no other interface) or
``shortcut_in`` (the interface feeds the shortcut, its rows) / ``shortcut_out`` (the shortcut
feeds the interface, its columns).

Where the symmetry is broken the interface is left out: a norm with weights (a model that was
never made invariant: dense, FASP, MoDeGPT), a missing shortcut between streams of different
widths (the truncated identity only commutes with block-diagonal rotations), or any tensor whose
stream axis does not have the interface's width.  A missing shortcut between equal widths is the
identity, which ties the two interfaces into one rotation; so does an embedding tied to the head.

Everything architecture-specific is in :func:`_stream_positions` (one small function, driven by
:func:`slicekit.arch.get_arch`'s table), so a change of the model code or table touches only it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

READER, WRITER, SHORTCUT_IN, SHORTCUT_OUT = "reader", "writer", "shortcut_in", "shortcut_out"
OWN_SIDES = (READER, WRITER)


@dataclass(frozen=True)
class Member:
    """One tensor axis that an interface's rotation acts on (see the module docstring)."""

    name: str
    axis: int
    side: str

    @property
    def own(self) -> bool:
        return self.side in OWN_SIDES


@dataclass
class Interface:
    """A set of tensor axes that share one ``width × width`` orthogonal symmetry."""

    key: str
    width: int
    members: list[Member]

    @property
    def own(self) -> list[Member]:
        """Readers and writers: the members that involve no other interface."""
        return [m for m in self.members if m.own]

    def as_json(self) -> dict:
        return {"key": self.key, "width": self.width, "members": [[m.name, m.axis, m.side] for m in self.members]}

    @classmethod
    def from_json(cls, data: dict) -> Interface:
        return cls(str(data["key"]), int(data["width"]), [Member(str(n), int(a), str(s)) for n, a, s in data["members"]])


@dataclass
class _Position:
    """A stretch of the residual stream between two shortcuts (before merging identities)."""

    key: str
    members: list[tuple[torch.Tensor, int, str]] = field(default_factory=list)
    ok: bool = True


def _block_class() -> type:
    from slicekit import modeling_slicekit as mk

    return getattr(mk, "SlicedLayer", None) or mk.ResidualBlock


def _stream_positions(model: nn.Module) -> tuple[list[_Position], list[tuple[int, int]]]:
    """The residual positions of ``model`` in network order and the identity links between them.

    Per layer: the layer's input position is read (after the attention norm) by the attention
    readers — and by the MLP readers in parallel blocks — and feeds ``attn_shortcut``; sequential
    blocks have a middle position written by the attention writer and ``attn_shortcut``, read by
    the MLP readers and feeding ``mlp_shortcut``; the layer's output position is written by the
    remaining writer(s) and shortcut.  The embeddings write the first position, the head reads
    the last.  Returns ``([], [])`` when the model has no rotatable residual stream.
    """
    from transformers.pytorch_utils import Conv1D

    from slicekit.arch import UnsupportedArchitectureError, get_arch, is_linear
    from slicekit.modeling_slicekit import UnitRMSNorm
    from slicekit.shape import mlp_stream_children

    try:
        spec = get_arch(model.config)
    except (UnsupportedArchitectureError, AttributeError):
        return [], []
    b = spec.block
    # output norms (Gemma 2/3, OLMo 2) act on what the writers write: no free rotation there
    if not getattr(spec, "rotation_invariant", True) or any(
            getattr(b, key, None) is not None for key in ("post_attn_norm", "post_mlp_norm")):
        return [], []
    layers = spec.layer_list(model)
    if len(layers) == 0 or not all(isinstance(layer, _block_class()) for layer in layers):
        return [], []
    positions: list[_Position] = []
    links: list[tuple[int, int]] = []

    def new(key: str) -> int:
        positions.append(_Position(key))
        return len(positions) - 1

    def linear(path: str, side: str, pos: int) -> None:
        mod = model.get_submodule(path)
        if not is_linear(mod):
            positions[pos].ok = False
            return
        conv = isinstance(mod, Conv1D)  # stores in × out
        axis = (0 if conv else 1) if side == READER else (1 if conv else 0)
        positions[pos].members.append((mod.weight, axis, side))
        if side == WRITER and mod.bias is not None:
            positions[pos].members.append((mod.bias, 0, WRITER))

    def member(path: str, side: str, pos: int) -> None:
        """A linear, or a mixture-of-experts module (its ``E × 2F × D`` gate/up reads the stream on
        axis 2, its ``E × D × F`` down writes it on axis 1), or a top-k router (``E × D``, reads)."""
        mod = model.get_submodule(path)
        if is_linear(mod):
            linear(path, side, pos)
            return
        gate_up, down = getattr(mod, "sk_experts", ("gate_up_proj", "down_proj"))
        params = mod._parameters
        if params.get(gate_up) is not None and params[gate_up].dim() == 3:
            positions[pos].members.append((params[gate_up], 2, READER) if side == READER else (params[down], 1, WRITER))
        elif side == READER and params.get("weight") is not None and params["weight"].dim() == 2:
            positions[pos].members.append((params["weight"], 1, READER))
        else:
            positions[pos].ok = False

    def weightless(prefix: str, name: str | None, pos: int) -> None:
        """A norm between the stream and its readers must be weightless (None: no norm, e.g.
        OLMo 2's readers, or Phi's MLP sharing the attention norm)."""
        if name is not None and not isinstance(model.get_submodule(prefix + name), UnitRMSNorm):
            positions[pos].ok = False

    def shortcut(layer: nn.Module, key: str, pos_in: int, pos_out: int) -> None:
        mat = getattr(layer, key, None)
        if mat is None:
            links.append((pos_in, pos_out))
        else:
            positions[pos_in].members.append((mat, 0, SHORTCUT_IN))
            positions[pos_out].members.append((mat, 1, SHORTCUT_OUT))

    mlp_readers, mlp_writers = mlp_stream_children(spec)
    cur = new("embed")
    for emb in spec.embeddings(model):
        positions[cur].members.append((emb.weight, 1, WRITER))
    for i, layer in enumerate(layers):
        at = f"{spec.layers}.{i}."
        weightless(at, b.attn_norm, cur)
        for name in b.attn_readers:
            linear(at + name, READER, cur)
        if b.parallel:
            weightless(at, b.mlp_norm, cur)
            for name in mlp_readers:
                member(at + name, READER, cur)
            out = new(f"layers.{i}.out")
            shortcut(layer, "attn_shortcut", cur, out)
            if getattr(layer, "mlp_shortcut", None) is not None:  # not a parallel block's wiring
                positions[cur].ok = positions[out].ok = False
            linear(at + b.attn_writer, WRITER, out)
            for name in mlp_writers:
                member(at + name, WRITER, out)
        else:
            mid = new(f"layers.{i}.mid")
            shortcut(layer, "attn_shortcut", cur, mid)
            linear(at + b.attn_writer, WRITER, mid)
            weightless(at, b.mlp_norm, mid)
            for name in mlp_readers:
                member(at + name, READER, mid)
            out = new(f"layers.{i}.out")
            shortcut(layer, "mlp_shortcut", mid, out)
            for name in mlp_writers:
                member(at + name, WRITER, out)
        cur = out
    weightless("", spec.final_norm, cur)
    linear(spec.head, READER, cur)
    head = model.get_submodule(spec.head)
    if getattr(head, "weight", None) is spec.embeddings(model)[0].weight:  # tied: one matrix, one rotation
        links.append((0, cur))
    return positions, links


def rotation_interfaces(model: nn.Module) -> list[Interface]:
    """Every rotation-symmetric residual interface of ``model``, in network order.

    Empty for a model without such symmetry (not a rotated/invariant model, unsupported family).
    Parameter names are those of ``model.named_parameters()`` (tied duplicates once), i.e. the
    names a slicekit checkpoint stores.
    """
    positions, links = _stream_positions(model)
    if not positions:
        return []
    parent = list(range(len(positions)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, c in links:
        ra, rc = find(a), find(c)
        if ra != rc:
            parent[max(ra, rc)] = min(ra, rc)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[int, list[int]] = {}
    for i in range(len(positions)):
        groups.setdefault(find(i), []).append(i)
    out: list[Interface] = []
    for root in sorted(groups):
        idx = groups[root]
        members: list[Member] = []
        seen: set[tuple[str, int]] = set()
        widths: set[int] = set()
        ok = all(positions[i].ok for i in idx)
        for i in idx:
            for tensor, axis, side in positions[i].members:
                name = names.get(id(tensor))
                if name is None or axis >= tensor.dim():
                    ok = False
                    continue
                widths.add(int(tensor.shape[axis]))
                if (name, axis) in seen:  # a tied matrix reached from both ends
                    continue
                seen.add((name, axis))
                members.append(Member(name, axis, side))
        if ok and len(widths) == 1 and any(m.own for m in members):
            out.append(Interface(positions[root].key, widths.pop(), members))
    return out


def contract_axis(tensor: torch.Tensor, axis: int, rot: torch.Tensor) -> torch.Tensor:
    """``T'[..., j, ...] = Σ_i T[..., i, ...]·rot[i, j]`` along ``axis`` (the symmetry's action)."""
    moved = tensor.movedim(axis, -1)
    return (moved @ rot.to(moved.dtype)).movedim(-1, axis)


@torch.no_grad()
def rotate_model(model: nn.Module, interfaces: list[Interface], rotations: list[torch.Tensor]) -> None:
    """Apply one orthogonal matrix per interface to ``model`` in place (float64 arithmetic).

    The model computes the same function afterwards, to float round-off: this is the symmetry
    that bits-back coding exploits, and the test of :func:`rotation_interfaces`.
    """
    params = dict(model.named_parameters())
    for iface, rot in zip(interfaces, rotations, strict=True):
        for m in iface.members:
            p = params[m.name]
            p.data = contract_axis(p.data.double(), m.axis, rot.double()).to(p.dtype)
