"""Loading code for slicekit checkpoints that needs nothing but torch, transformers and safetensors.

This one file is copied next to every compressed checkpoint and registered through ``auto_map``,
so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where slicekit is
not installed.  slicekit itself uses the very same functions for its in-memory models, so the
compressed-shape description is the single source of truth: the plan a method makes, the model
it produces, the file the saver writes, what the loader builds and what the parameter counter
counts are one ``shape`` dictionary interpreted by :func:`apply_shape` below.

Why an interpreter and not a model class per architecture: the compressed model *is* the
original Hugging Face model (its decoder-layer, attention, MLP, embedding and rotary modules),
with some linears and embeddings resized in place and a few modules given one extra operation.
No Hugging Face forward code is copied.  Where an operation transformers lacks is unavoidable,
the module keeps its identity and gets a *subclass* of its own class (made at run time) whose
``forward`` adds that operation around ``super().forward``:

- a decoder layer of a rotated model becomes ``Sliced<LayerClass>`` (still an instance of the
  original class, so transformers' hidden-state capture, ``_no_split_modules``/``device_map`` and
  gradient checkpointing treat it as its own) — it adds SliceGPT's shortcut matrices, or
  DISP-LLM's *gather/scatter* residual form: the layer reads a stored subset of the stream's
  dimensions after each input norm (a gather) and adds its outputs into another stored subset (a
  scatter-add), the indices being integer buffers;
- an attention module whose heads were narrowed (MoDeGPT) becomes ``Reduced<AttentionClass>``,
  and its q/k/v/o linears ``Head<Linear>``: the projections apply rotary embeddings to the kept
  dimensions and zero-pad every head to one size, so transformers' own attention forward, cache
  and attention kernels run unchanged.

The ``shape`` dictionary (``config.json`` → ``slicekit.shape``)::

    {"format": 2,
     "features": [...],              # what a loader must implement to read this checkpoint
     "modules": {path: spec, ...},   # applied in order; decoder-layer blocks last
     "attributes": {dotted.path: value, ...}}

``spec["type"]``: ``linear`` / ``conv1d`` / ``embedding`` (resized in place), ``experts`` / ``router``
(a mixture-of-experts MLP's 3-D expert parameters and its router, resized in place — feature
``experts``, see :func:`resize_experts`), ``unit_rmsnorm``
(replaces a norm), ``block`` (residual wiring around a decoder layer: shortcut matrices, or
read/write index buffers — feature ``residual_index``) and ``reduced_attention`` (narrowed
heads).  Format 1 checkpoints (``{"version": 1, ...}``) are upgraded on load by
:func:`upgrade_shape`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import types
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

SHAPE_FORMAT = 2
#: Features this loader implements.  A checkpoint lists the ones it uses; an unknown one is refused
#: with a message, instead of loading a model that silently computes something else.
FEATURES = frozenset({"resize", "unit_rmsnorm", "residual_block", "reduced_attention", "residual_index", "experts"})
SLICEKIT_MODEL_TYPE = "slicekit"
_FEATURE_OF = {"linear": "resize", "conv1d": "resize", "embedding": "resize", "unit_rmsnorm": "unit_rmsnorm",
               "block": "residual_block", "reduced_attention": "reduced_attention", "experts": "experts",
               "router": "experts"}


class SlicekitShapeError(ValueError):
    """A checkpoint does not match its compressed-shape description (truncated, edited, mixed)."""


# ---------------------------------------------------------------------------------------- norms

class UnitRMSNorm(nn.Module):
    """Weightless RMSNorm that divides by the *original* width.

    After SliceGPT folds a norm's scale into the readers, the norm is ``x / rms(x)``.  When the
    stream is sliced to ``dim < norm_dim`` components, the sum of squares of the kept components
    stands in for the full one, so we keep dividing by ``norm_dim`` (as the reference does);
    dividing by ``dim`` would rescale every block input by ``sqrt(norm_dim / dim)``.
    """

    def __init__(self, dim: int, norm_dim: int, eps: float) -> None:
        super().__init__()
        self.dim = int(dim)
        self.norm_dim = int(norm_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        mean_sq = x32.pow(2).sum(-1, keepdim=True) / self.norm_dim
        return (x32 * torch.rsqrt(mean_sq + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, norm_dim={self.norm_dim}, eps={self.eps}"


# ------------------------------------------------------------------------ subclass-on-the-fly

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type, prefix: str) -> type:
    """``<prefix><cls>``: ``mixin``'s methods in front of ``cls`` (cached, so instances share it)."""
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _SUBCLASSES[key]


def _become(module: nn.Module, mixin: type, prefix: str) -> None:
    module.__class__ = _subclass(mixin, type(module), prefix)


def _new_param(like: torch.Tensor, shape: Iterable[int]) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


# ------------------------------------------------------------------------- residual blocks

#: block-spec keys of the gather/scatter residual form: the number of stream dimensions the
#: attention / MLP reads (after its input norm) and writes; the indices are the buffers ``<key>_index``
INDEX_KEYS = ("attn_read", "attn_write", "mlp_read", "mlp_write")


class SlicedLayer:
    """Mixin for a decoder layer with its own residual wiring, in one of two forms.

    **Shortcut form** (SliceGPT, a rotated model): ``out = x·S + f(norm(x))``.  ``S`` is an optional
    shortcut matrix (``None`` means identity).  Sequential blocks (Llama, OPT, GPT-2, Phi-3) have an
    attention and an MLP shortcut; parallel ones (GPT-NeoX, Phi-2) one.

    **Index form** (DISP-LLM): the stream keeps its full width ``D``; the attention reads
    ``norm(x)[..., attn_read_index]`` and its output is added at ``attn_write_index``
    (``x.scatter_add`` at those coordinates), likewise the MLP.  The norm is the family's own module at full
    width, so its statistics are those of the whole stream, as in the unpruned model (the reference
    also normalises the full stream and selects afterwards); selecting before the norm would change
    every RMS.  A key that is ``None`` (or absent) means "all dimensions, in order": an index
    covering everything would compute the same thing.  The two forms do not mix in one layer.

    The layer's own attention, MLP and norm submodules are called; their names come from the
    spec (written by slicekit from its architecture table).  Positional and keyword arguments of
    the model's layer loop go to the attention module unchanged, as the original layers do.
    """

    def _sk_setup(self, spec: Mapping[str, Any]) -> None:
        self.sk_spec = {k: v for k, v in spec.items() if k not in ("attn_shortcut", "mlp_shortcut", "type")}
        ref = next(self.parameters())
        for key in ("attn_shortcut", "mlp_shortcut"):
            shp = spec.get(key)
            self.register_parameter(key, None if shp is None else _new_param(ref, shp))
        indexed = [k for k in INDEX_KEYS if spec.get(k) is not None]
        if indexed and (spec.get("attn_shortcut") is not None or spec.get("mlp_shortcut") is not None):
            raise SlicekitShapeError("a residual block has both shortcut matrices and read/write indices; "
                                     "the shape description is corrupt")
        for key in INDEX_KEYS:
            n = spec.get(key)
            self._buffers.pop(f"{key}_index", None)
            if n is not None:
                # filled by the method or from the file; the leading dimensions until then
                self.register_buffer(f"{key}_index", torch.arange(int(n), device=ref.device), persistent=True)

    # ``gather``/``scatter_add`` with an expanded (stride-0) index rather than ``index_select``/
    # ``index_add`` along the last dimension: the same values (the indices are distinct, so every
    # written coordinate gets one addition), but on CPU the latter loop over the index and ran
    # 3-5× slower at 8 × 512 tokens, a tenth of a DISP model's prefill.
    def _sk_read(self, h: torch.Tensor, key: str) -> torch.Tensor:
        idx = self._buffers.get(f"{key}_index")
        return h if idx is None else h.gather(-1, idx.expand(*h.shape[:-1], idx.numel()))

    def _sk_write(self, x: torch.Tensor, out: torch.Tensor, key: str) -> torch.Tensor:
        idx = self._buffers.get(f"{key}_index")
        if idx is None:
            return x + out
        return x.scatter_add(-1, idx.expand(*out.shape[:-1], idx.numel()), out.to(x.dtype))

    def _sk_indexed(self) -> bool:
        return any(self._buffers.get(f"{k}_index") is not None for k in INDEX_KEYS)

    @staticmethod
    def _residual(x: torch.Tensor, mat: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``x·S + out``.  ``S = None`` is the identity; if the block then writes a wider stream
        than it reads, ``x`` holds the leading coordinates of the wider one (the truncated
        identity — SliceGPT's calibration uses it to avoid a shortcut product)."""
        if mat is not None:
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), mat.to(x.dtype))
            return flat.view(*out.shape[:-1], mat.shape[1])
        if x.shape[-1] == out.shape[-1]:
            return x + out
        if torch.is_grad_enabled():
            return out + F.pad(x, (0, out.shape[-1] - x.shape[-1]))
        out[..., : x.shape[-1]] += x
        return out

    def _sk_mlp(self, h: torch.Tensor) -> torch.Tensor:
        h = self._sk_read(h, "mlp_read")
        for name in self.sk_spec["mlp"]:
            h = getattr(self, name)(h)
        return h

    def _sk_attn(self, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        out = getattr(self, self.sk_spec["attn"])(self._sk_read(h, "attn_read"), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def attn_half(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sequential blocks: the stream after the attention residual, ``x·S_attn + attn(norm(x))``."""
        h = getattr(self, self.sk_spec["attn_norm"])(hidden_states)
        if self._sk_indexed():
            return self._sk_write(hidden_states, self._sk_attn(h, args, kwargs), "attn_write")
        return self._residual(hidden_states, self.attn_shortcut, self._sk_attn(h, args, kwargs))

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Sequential blocks: ``h·S_mlp + mlp(norm(h))`` on the stream after attention."""
        h = getattr(self, self.sk_spec["mlp_norm"])(hidden_states)
        if self._sk_indexed():
            return self._sk_write(hidden_states, self._sk_mlp(h), "mlp_write")
        return self._residual(hidden_states, self.mlp_shortcut, self._sk_mlp(h))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        spec = self.sk_spec
        if not spec["parallel"]:
            out = self.mlp_half(self.attn_half(hidden_states, *args, **kwargs))
        else:
            h = getattr(self, spec["attn_norm"])(hidden_states)
            attn_out = self._sk_attn(h, args, kwargs)
            h_mlp = h if spec.get("mlp_norm") is None else getattr(self, spec["mlp_norm"])(hidden_states)
            if self._sk_indexed():
                out = self._sk_write(hidden_states, attn_out, "attn_write")
                out = self._sk_write(out, self._sk_mlp(h_mlp), "mlp_write")
            else:
                out = self._residual(hidden_states, self.attn_shortcut, attn_out + self._sk_mlp(h_mlp))
        return (out,) if _returns_tuple(type(self)) else out


_TUPLE_RETURNS: dict[type, bool] = {}


def _returns_tuple(cls: type) -> bool:
    """Whether the original decoder layer's ``forward`` returns a tuple (``(hidden_states, …)``, as
    several families did in transformers 5.0) or the tensor itself (current releases): the
    model's layer loop expects the same from the compressed layer.  Read from the source of the
    original ``forward`` (type annotations were found to be wrong), once per class."""
    if cls not in _TUPLE_RETURNS:
        import ast
        import inspect
        import textwrap

        original = next((c for c in cls.__mro__ if c is not cls and "forward" in vars(c)
                         and not issubclass(c, SlicedLayer)), None)
        found = False
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(original.forward)))
        except (OSError, TypeError, SyntaxError, AttributeError):
            tree = None
        if tree is not None:
            tuples = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
                      for t in node.targets if isinstance(t, ast.Name)}
            found = any(isinstance(node, ast.Return) and node.value is not None
                        and (isinstance(node.value, ast.Tuple)
                             or (isinstance(node.value, ast.Name) and node.value.id in tuples))
                        for node in ast.walk(tree))
        _TUPLE_RETURNS[cls] = found
    return _TUPLE_RETURNS[cls]


def make_block(layer: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Give ``layer`` its residual wiring in place (its class becomes ``Sliced<Class>``): SliceGPT's
    shortcut matrices or DISP-LLM's read/write indices, as ``spec`` says."""
    _become(layer, SlicedLayer, "Sliced")
    layer._sk_setup(spec)
    return layer


# ResidualBlock is what earlier releases called a wrapped layer; isinstance checks keep working.
ResidualBlock = SlicedLayer


# ------------------------------------------------------------------------- reduced attention

def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: ``rotate_half(x)·sin == roll(x, r/2)·signed_sin``
    exactly (the same products, the sign moved from one factor to the other), which lets the
    projections rotate with one ``roll`` instead of two slices, a negation and a concatenation."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


#: ``(weakref to cos, weakref to sin, tables)`` of the latest rotary embeddings, newest first;
#: two, because some families (Gemma 2/3) alternate local and global embeddings layer by layer
_ROPE_TABLES: list[Any] = []


def _rope_table(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stack((cos, signed_sin))`` over the full rotary width, built once per model call, with a
    0-dim one and zero of their dtype (the identity rotation the layers hand to transformers).

    Every decoder layer receives the same ``position_embeddings`` tensors, so the table is
    cached on their identity (weak references: a freed tensor's id could be reused, a dead
    reference cannot match) and dropped when ``cos`` is freed: nothing outlives the call.
    Gathering the signed sine at the kept dims equals signing the gathered sine (the kept
    "firsts" are exactly the kept dims of the first half), so each layer needs one gather instead
    of two gathers, a negation and a concatenation.
    """
    for entry in tuple(_ROPE_TABLES):
        if entry[0]() is cos and entry[1]() is sin:
            return entry[2]
    tables = (torch.stack((cos, _signed_sin(sin))), cos.new_ones(()), sin.new_zeros(()))
    entry = (weakref.ref(cos), weakref.ref(sin), tables)
    _ROPE_TABLES[:] = [entry, *_ROPE_TABLES[:1]]
    weakref.finalize(cos, _drop_rope_table, entry)
    return tables


def _drop_rope_table(entry: Any) -> None:
    # by identity: comparing the entries' weak references would compare live tensors elementwise
    _ROPE_TABLES[:] = [e for e in _ROPE_TABLES if e is not entry]


class HeadProjection:
    """Mixin for a q/k/v projection of narrowed heads: ``sk_dim`` kept dims per head, padded to
    ``sk_pad`` with zeros (the attention module's ``head_dim``); q and k first get rotary
    embeddings on their kept rotary dims (``_sk_rope``, set by the attention module per call).

    Zero padding changes neither ``q·kᵀ`` nor the first ``v_dim`` output columns, and keeps one
    head size for q, k and v, which fused attention kernels need (with different sizes SDPA falls
    back to its math path, measured 4-5x slower at 2048 tokens).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        rope = self.__dict__.get("_sk_rope")
        dim, pad = self.sk_dim, self.sk_pad
        if rope is None and dim == pad:
            return y
        if rope is None:
            y = y.view(*y.shape[:-1], -1, dim)
        else:
            # (..., T, kv_heads, heads per KV head, dim): a GQA group's query heads follow each
            # other and share their KV head's dims, so cos/sin broadcast over the group
            cos, sin = rope  # (..., T, kv_heads, 1, r); sin with its first half negated
            y = y.view(*y.shape[:-1], cos.shape[-3], -1, dim)
            r = cos.shape[-1]
            if r == dim:  # every kept dim rotates (Llama-type RoPE): three ops, no concatenation
                y = torch.addcmul(y * cos, torch.roll(y, r // 2, dims=-1), sin)
            else:
                rot = y[..., :r]
                y = torch.cat((torch.addcmul(rot * cos, torch.roll(rot, r // 2, dims=-1), sin), y[..., r:]), dim=-1)
            y = y.flatten(-3, -2)
        if dim < pad:
            y = F.pad(y, (0, pad - dim))
        return y.flatten(-2)


class HeadOutput:
    """Mixin for the output projection of narrowed heads: drops each head's zero padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sk_dim < self.sk_pad:
            x = x.view(*x.shape[:-1], -1, self.sk_pad)[..., : self.sk_dim].flatten(-2)
        return super().forward(x)


class ReducedAttention:
    """Mixin for an attention module whose heads keep ``qk_dim`` query/key and ``v_dim`` value dims.

    Used by MoDeGPT.  RoPE on a subset: a head keeps rotary pairs ``(j, j + r/2)`` together and
    stores them in the order ``[firsts, partners, unrotated dims]``; the buffer ``qk_index`` holds
    their original positions (one row per KV head; the query heads of a GQA group share their KV
    head's row).  ``rotate_half`` of the reduced vector then rotates the same pairs, and cos/sin
    gathered at ``qk_index`` give exactly the scores of the original head restricted to the kept
    dimensions.  The projections apply that rotation (see :class:`HeadProjection`); transformers'
    forward gets an identity rotation (cos 1, sin 0) and does everything else as usual.  The
    softmax scale stays the original module's ``scaling``.  Per layer and call this costs one
    gather (cos and the signed sine are stacked once per model call, :func:`_rope_table`) and
    three element-wise operations per projection, broadcast over a GQA group's query heads rather
    than repeated for each.

    Fast path: where every head keeps the same dims (all rows of ``qk_index`` equal — MoDeGPT's
    ``fast_heads``) and every kept query/key dim is rotated with no padding (Llama-type RoPE,
    ``v_dim ≤ qk_dim``), cos/sin gathered at that one row broadcast over the heads like the
    original ones, so transformers' own RoPE does the rotation and the projections only multiply
    (no identity rotation, no rotation in the projections, no padding).  Whether the rows are
    equal is checked once per change of the buffer (its identity and version), not per call.
    """

    def _sk_shared_row(self) -> torch.Tensor | None:
        """Row 0 of ``qk_index`` if the fast path applies (see the class docstring), else None."""
        buf = self.qk_index
        try:
            version = buf._version
        except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change)
            version = -1
        cached = self.__dict__.get("_sk_shared")
        # the cache holds a view of the buffer it was made from, which keeps that storage alive: a
        # buffer replaced by ``.to()``, loading or a copy cannot then share its address (id() could
        # be reused), and the cache stays picklable and deep-copyable
        if (cached is None or cached[0].data_ptr() != buf.data_ptr() or cached[0].device != buf.device
                or cached[1] != version):
            spec = self.sk_spec
            fast = (spec["rotary_dim"] == spec["qk_dim"] == spec["pad_dim"]
                    and bool((buf == buf[:1]).all()))
            cached = (buf[:1], version, buf[0] if fast else None)
            self.__dict__["_sk_shared"] = cached
        return cached[2]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        spec = self.sk_spec
        pe = kwargs.get("position_embeddings")
        q_lin, k_lin = getattr(self, spec["q"]), getattr(self, spec["k"])
        if spec["rotary_dim"] and pe is not None and (row := self._sk_shared_row()) is not None:
            cos, sin = pe
            kwargs["position_embeddings"] = (cos[..., row], sin[..., row])
            return super().forward(hidden_states, *args, **kwargs)
        if spec["rotary_dim"] and pe is not None:
            cos, sin = pe
            # one gather per layer: (2, ..., T, kv_heads, r), cos and signed sin at each KV
            # head's kept dims; the projections broadcast it over a group's query heads
            table, one, zero = _rope_table(cos, sin)
            rope = table[..., self.qk_index[:, : spec["rotary_dim"]]].unsqueeze(-2)
            q_lin._sk_rope = k_lin._sk_rope = (rope[0], rope[1])
            n = min(cos.shape[-1], spec["pad_dim"])
            # the identity rotation, as stride-0 views (nothing allocated per layer)
            kwargs["position_embeddings"] = (one.expand(*cos.shape[:-1], n), zero.expand(*sin.shape[:-1], n))
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            q_lin.__dict__.pop("_sk_rope", None)
            k_lin.__dict__.pop("_sk_rope", None)


def make_reduced_attention(attn: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Narrow ``attn``'s heads in place: its class and its q/k/v/o linears' classes get the
    mixins above; the ``qk_index`` buffer is (re)allocated (filled by a method or the file)."""
    spec = {k: v for k, v in spec.items() if k != "type"}
    qk, v_dim = int(spec["qk_dim"]), int(spec["v_dim"])
    pad = max(qk, v_dim)
    spec["pad_dim"] = pad
    _become(attn, ReducedAttention, "Reduced")
    attn.sk_spec = spec
    attn.head_dim = pad
    for role, dim, mixin, prefix in (("q", qk, HeadProjection, "Head"), ("k", qk, HeadProjection, "Head"),
                                     ("v", v_dim, HeadProjection, "Head"), ("o", v_dim, HeadOutput, "HeadOut")):
        lin = getattr(attn, spec[role])
        _become(lin, mixin, prefix)
        lin.sk_dim, lin.sk_pad = dim, pad
    old = attn._buffers.get("qk_index")
    shape = (int(spec["num_kv_heads"]), qk)
    if old is None or tuple(old.shape) != shape:
        device = next(attn.parameters()).device
        attn.register_buffer("qk_index", torch.zeros(shape, dtype=torch.long, device=device), persistent=True)
    return attn


# ------------------------------------------------------------------------------ the interpreter

def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _resize_linear(module: nn.Module, spec: Mapping[str, Any]) -> None:
    """Resize an ``nn.Linear`` (or HF ``Conv1D``) in place, keeping its class and hooks."""
    n_in, n_out, bias = int(spec["in_features"]), int(spec["out_features"]), bool(spec.get("bias", False))
    like = module.weight
    if spec["type"] == "conv1d":  # transformers.pytorch_utils.Conv1D stores in × out
        module.weight = _new_param(like, (n_in, n_out))
        module.nf, module.nx = n_out, n_in
    else:
        module.weight = _new_param(like, (n_out, n_in))
        module.in_features, module.out_features = n_in, n_out
    module.bias = _new_param(like, (n_out,)) if bias else None


def resize_experts(module: nn.Module, spec: Mapping[str, Any]) -> None:
    """Resize a mixture-of-experts module in place: ``num_experts`` experts reading and writing a
    stream ``in_features`` wide, each ``width`` neurons wide.

    transformers (5.x) keeps a layer's experts as one module with two 3-D parameters, named in the
    spec (``gate_up``: ``E × 2F × D``, gate rows then up rows; ``down``: ``E × D × F``).  The
    expert loop writes into ``zeros_like(input)`` (and the batched kernels reshape to the input
    width), so an expert block writes exactly the width it reads: one ``in_features`` for both.
    The module's size attributes follow the tensors (:func:`sync_moe_dims`).
    """
    n_exp, n_in, width = int(spec["num_experts"]), int(spec["in_features"]), int(spec["width"])
    gate_up, down = spec.get("gate_up", "gate_up_proj"), spec.get("down", "down_proj")
    like = getattr(module, gate_up)
    setattr(module, gate_up, _new_param(like, (n_exp, 2 * width, n_in)))
    setattr(module, down, _new_param(like, (n_exp, n_in, width)))
    module.sk_experts = (gate_up, down)
    sync_moe_dims(module)


def resize_router(module: nn.Module, spec: Mapping[str, Any]) -> None:
    """Resize a top-k router (``weight`` ``E × D``, not an ``nn.Linear``) to read ``in_features``."""
    module.weight = _new_param(module.weight, (int(spec["num_experts"]), int(spec["in_features"])))
    sync_moe_dims(module)


def sync_moe_dims(module: nn.Module) -> None:
    """Make a router's or an experts module's size attributes agree with its tensors.

    transformers' routers reshape their input with ``self.hidden_dim``; the experts modules keep
    ``hidden_dim``/``intermediate_dim``/``num_experts`` for their kernels.  Whoever resizes the
    tensors (a method's surgery, :func:`apply_shape`) calls this, so the attributes never lie.
    """
    gate_up, down = getattr(module, "sk_experts", ("gate_up_proj", "down_proj"))
    params = module._parameters
    if params.get(gate_up) is not None and params.get(down) is not None and params[gate_up].dim() == 3:
        e, _, d = params[gate_up].shape
        module.num_experts, module.hidden_dim, module.intermediate_dim = int(e), int(d), int(params[down].shape[-1])
    elif params.get("weight") is not None and params["weight"].dim() == 2:  # a router
        module.num_experts, module.hidden_dim = (int(n) for n in params["weight"].shape)


def shape_features(shape: Mapping[str, Any]) -> list[str]:
    """The loader features a shape description needs."""
    features = {_FEATURE_OF.get(spec["type"], spec["type"]) for spec in shape["modules"].values()}
    if any(spec["type"] == "block" and any(spec.get(k) is not None for k in INDEX_KEYS)
           for spec in shape["modules"].values()):
        features.add("residual_index")
    return sorted(features)


def upgrade_shape(shape: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A shape description in the current format, plus tensors an old format kept in the config.

    Format 1 (slicekit 0.1): ``{"version": 1, ...}``; reduced attention listed its ``qk_index``
    and ``scaling`` in the config — the index becomes a buffer, the scale is the module's own.
    """
    shape = json.loads(json.dumps(shape))
    if "format" in shape:
        return shape, {}
    if int(shape.get("version", -1)) != 1:
        raise SlicekitShapeError(f"unknown slicekit shape format {shape.get('version')!r}: upgrade slicekit")
    extra: dict[str, torch.Tensor] = {}
    for path, spec in shape["modules"].items():
        if spec["type"] == "reduced_attention":
            extra[f"{path}.qk_index"] = torch.tensor(spec.pop("qk_index"), dtype=torch.long)
            spec.pop("scaling", None)
    shape.pop("version")
    shape["format"] = SHAPE_FORMAT
    shape["features"] = shape_features(shape)
    return shape, extra


def check_features(shape: Mapping[str, Any]) -> None:
    unknown = sorted(set(shape.get("features", [])) - FEATURES)
    if unknown:
        raise SlicekitShapeError(f"this checkpoint needs loader feature(s) {', '.join(unknown)} that this version of "
                                 "modeling_slicekit.py does not implement: upgrade slicekit (pip install -U slicekit)")
    if int(shape.get("format", -1)) > SHAPE_FORMAT:
        raise SlicekitShapeError(f"shape format {shape.get('format')} is newer than this loader's ({SHAPE_FORMAT})")


def apply_shape(model: nn.Module, shape: Mapping[str, Any]) -> nn.Module:
    """Turn an original-architecture model into the compressed architecture, in place.

    Only the structure changes: resized modules get uninitialised storage of the right shape.
    Weights are filled afterwards (by a compressor, or by :func:`load_weights`).
    """
    if "format" not in shape:
        shape, _ = upgrade_shape(shape)
    check_features(shape)
    blocks = []
    for path, spec in shape["modules"].items():
        kind = spec["type"]
        if kind == "block":
            blocks.append((path, spec))
        elif kind in ("linear", "conv1d"):
            _resize_linear(model.get_submodule(path), spec)
        elif kind == "embedding":
            emb = model.get_submodule(path)
            emb.weight = _new_param(emb.weight, (int(spec["num_embeddings"]), int(spec["embedding_dim"])))
            emb.num_embeddings, emb.embedding_dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
        elif kind == "unit_rmsnorm":
            parent, name = _parent_and_name(model, path)
            setattr(parent, name, UnitRMSNorm(spec["dim"], spec["norm_dim"], spec["eps"]))
        elif kind == "reduced_attention":
            make_reduced_attention(model.get_submodule(path), spec)
        elif kind == "experts":
            resize_experts(model.get_submodule(path), spec)
        elif kind == "router":
            resize_router(model.get_submodule(path), spec)
        else:
            raise SlicekitShapeError(f"unknown module type {kind!r} for {path!r} in the shape description")
    for path, spec in blocks:
        make_block(model.get_submodule(path), spec)
    for dotted, value in shape.get("attributes", {}).items():
        parent, name = _parent_and_name(model, dotted)
        setattr(parent, name, value)
    _extend_no_split(model)
    # Resizing gave the embedding and the head new storage: re-tie them where the config ties
    # them (methods that keep the tie), so the checkpoint holds the matrix once.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and isinstance(model, PreTrainedModel):
        model.tie_weights()
    return model


def _extend_no_split(model: nn.Module) -> None:
    """Add the ``Sliced…``/``Reduced…`` class names to ``_no_split_modules`` so that device maps
    keep a compressed decoder layer on one device, as they do the original one."""
    names = {type(m).__name__ for m in model.modules() if isinstance(m, (SlicedLayer, ReducedAttention))}
    if not names:
        return
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m._no_split_modules:
            m._no_split_modules = sorted(set(m._no_split_modules) | names)


# ----------------------------------------------------------------------- building and loading

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device, buffers for real.

    The model is built at its original size and then shrunk, so its parameters must not be
    allocated; non-persistent buffers (rotary frequencies) are not in any checkpoint and must be
    computed by the modules' own ``__init__``.  (The same trick as accelerate's
    ``init_empty_weights(include_buffers=False)``, without depending on accelerate.)
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_compressed_model(base_config: PretrainedConfig, shape: Mapping[str, Any]) -> nn.Module:
    """The compressed architecture with parameters on the meta device (buffers real), built
    without allocating the original-size model."""
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(base_config)
    apply_shape(model, shape)
    return model


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a checkpoint of ``model`` must hold: parameters (tied
    duplicates once) and persistent buffers — what ``save_pretrained`` writes."""
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=True):
        out[name] = tuple(tensor.shape)
    for name, tensor in _persistent_buffers(model):
        out[name] = tuple(tensor.shape)
    return out


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: parameters without tied duplicates, plus persistent buffers."""
    tensors = {n: t.detach().contiguous() for n, t in model.named_parameters(remove_duplicate=True)}
    tensors.update({n: t.detach().contiguous() for n, t in _persistent_buffers(model)})
    return tensors


def _checkpoint_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SlicekitShapeError(f"{index} is corrupt ({err})") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise SlicekitShapeError(f"checkpoint {directory} is incomplete: missing shard(s) {', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise SlicekitShapeError(f"no model.safetensors (or index) in {directory}")
    return [single]


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    parent, name = _parent_and_name(model, key)
    if name in parent._parameters:
        old = parent._parameters[name]
        # the file's dtype is the truth (a bfloat16 checkpoint stays bfloat16 unless asked)
        parent._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        parent.register_buffer(name, tensor, persistent=name not in parent._non_persistent_buffers_set)


def load_weights(model: nn.Module, directory: str, device: str | torch.device = "cpu",
                 extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill ``model`` (whose parameters may live on the meta device) from the safetensors files.

    Every expected tensor must be present with exactly the expected shape, and nothing else may
    be in the files (non-persistent buffers that older checkpoints stored are accepted): a
    truncated, edited or mismatched checkpoint fails with a message naming the first problems
    instead of loading garbage.  ``extra``: tensors an upgraded old format kept in its config.
    """
    from safetensors import SafetensorError, safe_open

    expected = expected_tensors(model)
    optional = {n for n, _ in model.named_buffers()} - set(expected)
    seen: set[str] = set()
    problems: list[str] = []
    for key, tensor in (extra or {}).items():
        if key in expected and tuple(tensor.shape) == expected[key]:
            _set_tensor(model, key, tensor.to(device))
            seen.add(key)
    for path in _checkpoint_files(directory):
        try:
            handle = safe_open(path, framework="pt", device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise SlicekitShapeError(f"cannot read {os.path.basename(path)} ({err}): the file is corrupt or truncated") from err
        with handle as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key not in expected and key not in optional:
                    problems.append(f"unexpected tensor {key}")
                    continue
                shp = tuple(fh.get_slice(key).get_shape())
                want = expected.get(key)
                if want is not None and shp != want:
                    problems.append(f"{key}: file has shape {list(shp)}, the shape description says {list(want)}")
                    continue
                try:
                    tensor = fh.get_tensor(key)
                except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                    raise SlicekitShapeError(f"cannot read tensor {key} from {os.path.basename(path)}: {err}") from err
                if want is None:  # an old checkpoint's copy of a buffer the model computes itself
                    continue
                _set_tensor(model, key, tensor)
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        problems.insert(0, f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if problems:
        raise SlicekitShapeError(f"checkpoint {directory} does not match its shape description: " + "; ".join(problems[:5]))


def _resolve_dir(name_or_path: str, **hub_kwargs: Any) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    allowed = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.md"]
    keep = {k: hub_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in hub_kwargs}
    return snapshot_download(name_or_path, allow_patterns=allowed, **keep)


def base_config_from_dict(base: Mapping[str, Any]) -> PretrainedConfig:
    """The original architecture's config from its ``to_dict()`` form."""
    return AutoConfig.for_model(**dict(base))


def read_slicekit_config(directory: str) -> tuple[PretrainedConfig, dict[str, Any]]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise SlicekitShapeError(f"{directory} has no config.json")
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise SlicekitShapeError(f"{cfg_path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict) or "slicekit" not in raw or "base_config" not in raw:
        raise SlicekitShapeError("config.json has no slicekit section: this is not a slicekit checkpoint")
    try:
        base_config = base_config_from_dict(raw["base_config"])
    except (KeyError, ValueError, TypeError) as err:
        raise SlicekitShapeError(f"config.json has an unusable base_config ({err})") from err
    meta = dict(raw["slicekit"])
    if not isinstance(meta.get("shape"), dict) or "modules" not in meta["shape"]:
        raise SlicekitShapeError("config.json's slicekit.shape is missing or malformed")
    return base_config, meta


def load_compressed(directory: str, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a slicekit checkpoint as the original Hugging Face model class, compressed."""
    base_config, meta = read_slicekit_config(directory)
    shape, extra = upgrade_shape(meta["shape"])
    model = build_compressed_model(base_config, shape)
    load_weights(model, directory, device="cpu", extra=extra)
    if getattr(base_config, "tie_word_embeddings", False):
        model.tie_weights()
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model = model.to(device)
    model.eval()
    attach(model, {**meta, "shape": shape})
    return model


# ------------------------------------------------------------------------------- saving again

def slicekit_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` of a compressed model: its original config plus the shape."""
    from transformers import __version__ as tf_version

    base = model.config.to_dict()
    for key in ("quantization_config", "auto_map", "architectures", "_name_or_path"):
        base.pop(key, None)
    base["use_cache"] = True
    cfg = SlicekitConfig(base_config=base, slicekit=model.slicekit).to_dict()
    # The *base* model_type and no AutoConfig entry: AutoConfig (which AutoTokenizer and pipelines
    # read first) then needs no remote code, so a plain ``AutoTokenizer.from_pretrained(DIR)``
    # neither prompts nor warns.  Only AutoModelForCausalLM is mapped to this loader.
    cfg.update({"model_type": base.get("model_type", SLICEKIT_MODEL_TYPE),
                "architectures": ["SlicekitForCausalLM"], "transformers_version": tf_version,
                "auto_map": {"AutoModelForCausalLM": "modeling_slicekit.SlicekitForCausalLM"}})
    return cfg


def write_slicekit_files(model: nn.Module, directory: str) -> None:
    """``config.json`` (slicekit form) and this loader next to weights already in ``directory``."""
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(slicekit_config_dict(model), fh, indent=2)
    here = os.path.abspath(__file__)
    target = os.path.join(directory, "modeling_slicekit.py")
    if os.path.abspath(target) != here:
        shutil.copyfile(here, target)


def _save_pretrained(self: nn.Module, save_directory: str, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a compressed model: transformers writes the weights (and its own
    config, which describes the *original* shape), then the slicekit config and loader replace
    that config, so the directory loads back equal."""
    # The slicekit loader reads the module names the model has now; transformers' "original
    # format" would rename some on the way out (GPT-NeoX's lm_head -> embed_out since 5.2x).
    kwargs.setdefault("save_original_format", False)
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    write_slicekit_files(self, str(save_directory))
    return result


def attach(model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Record the shape on the model and make its ``save_pretrained`` write a slicekit checkpoint."""
    model.slicekit = dict(meta)
    model.save_pretrained = types.MethodType(_save_pretrained, model)


class SlicekitConfig(PretrainedConfig):
    """Config wrapper: ``base_config`` is the original model's config, ``slicekit`` the shape."""

    model_type = SLICEKIT_MODEL_TYPE

    def __init__(self, base_config: dict | None = None, slicekit: dict | None = None, **kwargs: Any) -> None:
        self.base_config = base_config or {}
        self.slicekit = slicekit or {}
        super().__init__(**kwargs)


class SlicekitForCausalLM(PreTrainedModel):
    """Entry point for ``auto_map``: ``from_pretrained`` returns the *original* model class
    (e.g. ``LlamaForCausalLM``) with the compressed shape, so ``generate`` and the KV cache are the
    installed transformers' own."""

    config_class = SlicekitConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any) -> nn.Module:
        directory = _resolve_dir(str(pretrained_model_name_or_path), **kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device_map = kwargs.get("device_map")
        if device_map is None or (isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential")):
            return load_compressed(directory, dtype=dtype, device=device_map or "cpu")
        model = load_compressed(directory, dtype=dtype, device="cpu")
        try:
            from accelerate import dispatch_model, infer_auto_device_map
        except ImportError as err:
            raise ImportError("device_map needs the accelerate package (pip install accelerate)") from err
        if not isinstance(device_map, Mapping):
            device_map = infer_auto_device_map(model, max_memory=kwargs.get("max_memory"),
                                               no_split_module_classes=model._no_split_modules)
        return dispatch_model(model, device_map=dict(device_map))
