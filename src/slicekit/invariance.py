"""Computational invariance: rewrite a model so an orthogonal map on the residual stream is free.

After :func:`make_invariant` every norm is a weightless RMSNorm (its scale and bias folded into the
linears that read it), LayerNorm models have a zero-mean residual stream (embeddings and writers
centred), the head is untied, and every decoder layer is a residual block (:class:`SlicedLayer`) ready to carry
shortcut matrices.  The model computes the same logits as before, to float round-off.
This is the common ground of SliceGPT, dynamic slicing, DOTResize and bits-back coding.

Today's families, worked out (the table row says which apply, :mod:`slicekit.arch`):

- **(1 + w) RMSNorm** (Gemma): the scale is ``γ = norm_offset + w``; it folds into the readers like
  any scale, ``W·diag(γ)``.
- **√D embedding scale** (Gemma): the embedding module multiplies its rows by a constant ``c``;
  ``(c·E)·Q = c·(E·Q)``, so rotating and slicing the matrix and keeping the module (and its ``c``)
  is exact.  Nothing to do.
- **q/k norms inside the heads** (Qwen3, Gemma 3, OLMo 2): they normalise the *outputs* of the
  q/k projections; a residual rotation only changes the projections' *inputs* (``W_q·Q``), so the
  norms see the same vectors.  Nothing to do.
- **Soft-capping** (Gemma 2: ``c·tanh(logits/c)`` after the head, the same on attention scores) acts
  after the head and inside the attention: untouched.  **Local/global layers**: untouched.
- **Output (sandwich / post) norms** (Gemma 2/3 ``post_attention_layernorm`` and
  ``post_feedforward_layernorm``; OLMo 2's only norms) are *not* a fold.  A writer ``W`` (``D × m``,
  bias ``b``) feeds ``N(y) = γ ∘ y / ρ(y)``, ``y = W·z + b``, ``ρ(y) = √(‖y‖²/D + ε)``, and the block
  adds ``N(y)`` to the stream.  With the stream rotated by ``Q`` and sliced to ``d`` the block must
  add ``Q_dᵀ·N(y)`` (``Q_d = Q[:, :d]``).  The numerator is linear and folds into a ``d``-row writer,
  ``Q_dᵀ·diag(γ)·W``, but the denominator needs ``‖y‖``, the norm of the *unscaled, full-width*
  output, which those ``d`` rows do not determine.  The norm is invariant under orthogonal maps,
  so write the thin SVD ``[W b] = U·Σ·Vᵀ`` (rank ``r ≤ min(D, m + 1)``) and let ``t = Σ·Vᵀ·[z; 1]``:
  then ``‖t‖ = ‖y‖`` and ``y = U·t``, hence

      Q_dᵀ·N(y) = (Q_dᵀ·diag(γ)·U) · t / √(‖t‖²/D + ε),

  i.e. **linear m → r, weightless RMSNorm over r entries that divides by D** (the existing
  ``UnitRMSNorm(r, norm_dim=D)``), **linear r → d**.  It is exact for every ``d`` (slicing only
  drops the discarded output directions, as everywhere in SliceGPT) — :func:`post_norm_factors`
  computes it.  It is also the cheapest exact form of this kind: ``ρ`` is a quadratic form of rank
  ``r`` in ``[z; 1]``, so fewer than ``r`` linear functionals of the input cannot give it, and the
  ``r × d`` map cannot be absorbed anywhere because its output is added to the stream.  The
  parameter cost is ``r·(m + d)`` where an ordinary family's sliced writer costs ``d·m``
  (:func:`post_norm_cost`).  For the MLP (``m = F > D``) that is the *whole* original down
  projection plus a ``D × d`` map; for the attention (``m = heads·head_dim``) ``min(D, m)·(m + d)``.
  Measured on the real configurations at 25 % slicing (``d = 0.75·D``), per decoder layer, with
  SliceGPT's readers, shortcuts and these writers: Gemma-2-2B 77.86 M → 77.85 M (0.0 % removed;
  the same layers without output norms would lose 17.3 %), Gemma-3-1B 26.84 M → 25.66 M (4.4 %
  vs 19.4 %), Gemma-3-4B 0.6 % vs 17.2 %, OLMo-2-1B 0.8 % vs 18.0 %; below about 25 % slicing the
  layers grow.  SliceGPT on these families therefore is refused (``ArchSpec.not_invariant_reason``)
  rather than offered at a cost that cancels its benefit; methods that do not rotate the stream
  (FASP, MoDeGPT, the MLP-width methods) work on them at no such cost.
- **Mixture-of-experts** MLPs (Mixtral, Qwen3-MoE, Qwen2-MoE) are invariant: the router's logits
  ``R·n`` and every expert's gate/up rows ``G_e·n`` read the MLP norm's output ``n``, so folding the
  norm's scale gives ``R·diag(γ)`` and ``G_e·diag(γ)``, and a rotation gives ``R·diag(γ)·Q`` etc.
  — the router logits, hence the top-k choice and the routing weights, are exactly those of the
  original model for every token; every expert's ``down_e`` (``D × F``) and the shared expert's
  down write the stream (``Q_dᵀ·down_e``); Qwen2-MoE's ``D → 1`` shared-expert gate is a reader.
  transformers keeps the experts as 3-D parameters (``E × 2F × D``, ``E × D × F``), not linears:
  :func:`reader_weight`/:func:`writer_weight` and their setters give every reader and writer of
  the stream, linear or not, one interface.  An experts block writes the width it reads (the
  expert loop accumulates into ``zeros_like`` of its input), so a SliceGPT plan gives a MoE layer's
  MLP the same input and output width (the attention does any change of width).
"""

from __future__ import annotations

import torch
from torch import nn

from slicekit.arch import ArchSpec, get_arch, is_linear, linear_bias, linear_weight, set_linear
from slicekit.errors import SlicekitError
from slicekit.linalg import center_rows, center_writer, fold_scale_into_readers, rotate_reader
from slicekit.modeling_slicekit import SlicedLayer, UnitRMSNorm, make_block, sync_moe_dims
from slicekit.models import untie_head
from slicekit.shape import Plan, block_spec, mlp_stream_children

# ------------------------------------------------------------------ readers and writers of any kind

def _experts_names(mod: nn.Module) -> tuple[str, str] | None:
    """``(gate_up, down)`` parameter names if ``mod`` is a mixture-of-experts module (3-D parameters)."""
    names = getattr(mod, "sk_experts", ("gate_up_proj", "down_proj"))
    p = mod._parameters
    if all(p.get(n) is not None and p[n].dim() == 3 for n in names):
        return names
    return None


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    ref = mod._parameters[name]
    mod._parameters[name] = nn.Parameter(value.to(dtype=ref.dtype, device=ref.device).contiguous(),
                                         requires_grad=ref.requires_grad)
    sync_moe_dims(mod)


def reader_weight(root: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a module that reads the stream, ``W`` as ``out × D`` — for an experts module
    its gate/up parameter ``E × 2F × D`` (a batch of readers), for a router its ``E × D`` weight."""
    mod = root.get_submodule(path)
    if is_linear(mod):
        return linear_weight(mod), linear_bias(mod)
    names = _experts_names(mod)
    if names is not None:
        return mod._parameters[names[0]].data, None
    if getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:  # a top-k router
        return mod.weight.data, None
    raise TypeError(f"{path} ({type(mod).__name__}) is not a reader slicekit knows")


def set_reader_weight(root: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace what :func:`reader_weight` returned (the size attributes follow)."""
    mod = root.get_submodule(path)
    if is_linear(mod):
        set_linear(mod, weight, bias)
        return
    if bias is not None:
        raise SlicekitError(f"{path} has no bias: a norm with a shift cannot be folded into it")
    names = _experts_names(mod)
    _set_param(mod, names[0] if names is not None else "weight", weight)


def writer_weight(root: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a module that writes the stream, ``W`` as ``D × in`` — for an experts module
    its down parameter ``E × D × F`` (a batch of writers)."""
    mod = root.get_submodule(path)
    if is_linear(mod):
        return linear_weight(mod), linear_bias(mod)
    names = _experts_names(mod)
    if names is None:
        raise TypeError(f"{path} ({type(mod).__name__}) is not a writer slicekit knows")
    return mod._parameters[names[1]].data, None


def stream_param_names(root: nn.Module, path: str, role: str) -> tuple[str, str | None]:
    """``(weight, bias)`` parameter names, relative to ``root``, of the reader (``role="read"``)
    or writer (``"write"``) at ``path``: ``path.weight``/``path.bias`` for a linear or a router,
    the gate/up (reader) or down (writer) parameter of an experts module (no bias)."""
    mod = root.get_submodule(path)
    names = None if is_linear(mod) else _experts_names(mod)
    if names is not None:
        return f"{path}.{names[0] if role == 'read' else names[1]}", None
    return f"{path}.weight", (f"{path}.bias" if getattr(mod, "bias", None) is not None else None)


def set_writer_weight(root: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    mod = root.get_submodule(path)
    if is_linear(mod):
        set_linear(mod, weight, bias)
        return
    _set_param(mod, _experts_names(mod)[1], weight)


def fold_reader(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                beta: torch.Tensor | None, out_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~slicekit.linalg.fold_scale_into_readers` for a reader or a batch of readers
    (``… × out × D``)."""
    flat = weight.reshape(-1, weight.shape[-1])
    if weight.dim() > 2 and beta is not None:
        raise SlicekitError("a norm with a shift cannot be folded into experts, which have no bias")
    w, b = fold_scale_into_readers(flat, bias, gamma, beta, out_dtype=out_dtype)
    return w.reshape(weight.shape), b


def rotate_any_reader(weight: torch.Tensor, q: torch.Tensor, width: int,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`~slicekit.linalg.rotate_reader` for a reader or a batch of readers (``… × out × D``)."""
    flat = rotate_reader(weight.reshape(-1, weight.shape[-1]), q, width, out_dtype=out_dtype)
    return flat.reshape(*weight.shape[:-1], width)


def rotate_stream_readers(root: nn.Module, paths, q: torch.Tensor, width: int) -> None:
    """Every reader at ``paths`` reads ``x·Q[:, :width]`` instead of ``x``."""
    for path in paths:
        w, b = reader_weight(root, path)
        set_reader_weight(root, path, rotate_any_reader(w, q, width, out_dtype=w.dtype), b)


def _norm_params(norm: nn.Module, offset: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """``(γ, β, ε)`` of a norm; ``γ = offset + weight`` (Gemma's ``(1 + w)`` norms have offset 1)."""
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None)
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", 1e-5)
    if gamma is not None:
        gamma = gamma.data if offset == 0.0 else gamma.data.double() + offset
    return (gamma, None if beta is None else beta.data, float(eps))


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a norm module, whatever the family calls it."""
    return _norm_params(norm)[2]


def _has_bias(norm: nn.Module) -> bool:
    return _norm_params(norm)[1] is not None


def _is_tied(model: nn.Module, spec: ArchSpec) -> bool:
    head = model.get_submodule(spec.head)
    return head.weight is spec.embeddings(model)[0].weight or bool(getattr(model.config, "tie_word_embeddings", False))


def check_invariant_family(spec: ArchSpec) -> None:
    """Refuse, with the table's reason, a family whose stream slicekit cannot rotate."""
    reason = spec.not_invariant_reason
    if reason:
        raise SlicekitError(f"cannot rotate the residual stream of {'/'.join(spec.model_types)}: {reason}")


def invariant_plan(model: nn.Module, spec: ArchSpec | None = None) -> Plan:
    """The shape :func:`make_invariant` will give ``model`` (nothing is changed): untied head,
    weightless norms of full width, LayerNorm biases folded into the readers (which gain a bias
    where they had none), every decoder layer a residual block without shortcuts."""
    spec = spec or get_arch(model.config)
    check_invariant_family(spec)
    p = Plan.of(model)
    if is_invariant(model):
        return p
    hidden = model.config.hidden_size
    if _is_tied(model, spec):
        p.untie()
    b = spec.block
    bspec = block_spec(model.config)

    def fold(norm_path: str, readers: list[str]) -> None:
        norm = model.get_submodule(norm_path)
        for r in readers:
            if _has_bias(norm):
                if p.modules[r]["type"] not in ("linear", "conv1d"):
                    raise SlicekitError(f"{norm_path} has a shift, which {r} (no bias) cannot absorb")
                p.resize_linear(r, bias=True)
        p.unit_norm(norm_path, hidden, hidden, norm_eps(norm))

    mlp_readers = mlp_stream_children(spec)[0]
    for i in range(len(spec.layer_list(model))):
        def at(name: str, i: int = i) -> str:
            return spec.layer_path(i, name)

        if b.mlp_norm is None:
            fold(at(b.attn_norm), [at(n) for n in b.attn_readers + mlp_readers])
        else:
            fold(at(b.attn_norm), [at(n) for n in b.attn_readers])
            fold(at(b.mlp_norm), [at(n) for n in mlp_readers])
        p.block(spec.layer_path(i), bspec)
    fold(spec.final_norm, [spec.head])
    return p


def _fold(norm: nn.Module, layer: nn.Module, readers: list[str], offset: float = 0.0) -> float:
    """Fold ``norm``'s scale (and shift) into the readers at ``readers`` (paths under ``layer``)."""
    gamma, beta, eps = _norm_params(norm, offset)
    for path in readers:
        w0, b0 = reader_weight(layer, path)
        w, b = fold_reader(w0, b0, gamma, beta, out_dtype=w0.dtype)
        set_reader_weight(layer, path, w, b)
    return eps


def _center_writer(layer: nn.Module, path: str) -> None:
    w, b = writer_weight(layer, path)
    if w.dim() != 2:
        raise SlicekitError(f"{path}: centring experts' outputs (a LayerNorm family) is not implemented")
    w, b = center_writer(w, b)
    set_writer_weight(layer, path, w, b)


def is_invariant(model: nn.Module) -> bool:
    spec = get_arch(model.config)
    return all(isinstance(layer, SlicedLayer) for layer in spec.layer_list(model))


@torch.no_grad()
def make_invariant(model: nn.Module, spec: ArchSpec | None = None, layers: bool = True) -> nn.Module:
    """Apply the invariance transforms in place (idempotent) and return the model.

    ``layers=False`` transforms only what lies outside the decoder layers (head, final norm,
    embeddings); :func:`make_layer_invariant` then does each layer when its turn comes — a
    streamed model (:mod:`slicekit.streaming`) has one layer in memory at a time, and the result
    is the same because every transform touches one layer (or the outer modules) only.
    """
    spec = spec or get_arch(model.config)
    if is_invariant(model):
        return model
    check_invariant_family(spec)
    if not isinstance(model.get_submodule(spec.final_norm), UnitRMSNorm):
        hidden = model.config.hidden_size
        if _is_tied(model, spec):
            untie_head(model, spec.head)
        if spec.norm_kind == "layer":
            for emb in spec.embeddings(model):
                emb.weight.data = center_rows(emb.weight.data).to(emb.weight.dtype)
        final_norm = model.get_submodule(spec.final_norm)
        eps = _fold(final_norm, model, [spec.head], spec.norm_offset)
        parent, _, name = spec.final_norm.rpartition(".")
        setattr(model.get_submodule(parent), name, UnitRMSNorm(hidden, hidden, eps))
    if layers:
        for i in range(len(spec.layer_list(model))):
            make_layer_invariant(model, i, spec)
    return model


@torch.no_grad()
def make_layer_invariant(model: nn.Module, index: int, spec: ArchSpec | None = None) -> None:
    """The invariance transforms of decoder layer ``index`` (idempotent): centred writers for
    LayerNorm families, norms folded into their readers, the layer made a residual block."""
    spec = spec or get_arch(model.config)
    layer = spec.layer_list(model)[index]
    if isinstance(layer, SlicedLayer):
        return
    off = spec.norm_offset
    hidden = model.config.hidden_size
    b = spec.block
    mlp_readers, mlp_writers = mlp_stream_children(spec)
    if spec.norm_kind == "layer":
        for path in (b.attn_writer, *mlp_writers):
            _center_writer(layer, path)
    attn_readers = list(b.attn_readers)
    if b.mlp_norm is None:  # one norm feeds attention and MLP (Phi-2)
        eps = _fold(layer.get_submodule(b.attn_norm), layer, attn_readers + list(mlp_readers), off)
        setattr(layer, b.attn_norm, UnitRMSNorm(hidden, hidden, eps))
    else:
        eps = _fold(layer.get_submodule(b.attn_norm), layer, attn_readers, off)
        setattr(layer, b.attn_norm, UnitRMSNorm(hidden, hidden, eps))
        eps = _fold(layer.get_submodule(b.mlp_norm), layer, list(mlp_readers), off)
        setattr(layer, b.mlp_norm, UnitRMSNorm(hidden, hidden, eps))
    make_block(layer, block_spec(model.config))


# ------------------------------------------------------------------ output (sandwich / post) norms

@torch.no_grad()
def post_norm_factors(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                      q: torch.Tensor, width: int, rtol: float = 1e-12
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The cheapest exact form of "writer, then output norm, then rotation and slicing".

    For a writer ``y = W·z + b`` (``weight`` ``D × m``) followed by ``N(y) = γ ∘ y / √(‖y‖²/D + ε)``
    and a stream rotated by ``q`` (``D × D``) and sliced to ``width = d``, returns ``(A, a, M)``
    with ``A`` ``r × m``, ``a`` ``r`` (None without ``bias``) and ``M`` ``d × r`` such that

        q[:, :d]ᵀ·N(W·z + b) = M · t / √(‖t‖²/D + ε),   t = A·z + a,

    for every ``z`` — ``t`` is the writer's output in an orthonormal basis of its range (same norm),
    ``r`` the rank of ``[W b]`` (at most ``min(D, m + 1)``).  See the module docstring for the
    derivation and the parameter cost; float64.
    """
    w = weight.double()
    aug = w if bias is None else torch.cat([w, bias.double()[:, None]], dim=1)
    u, sv, vh = torch.linalg.svd(aug, full_matrices=False)
    r = int((sv > rtol * sv.max()).sum()) if sv.numel() else 0
    u, sv, vh = u[:, :r], sv[:r], vh[:r]
    t_map = sv[:, None] * vh  # Σ·Vᵀ: r × (m [+ 1])
    a_mat, a_bias = (t_map, None) if bias is None else (t_map[:, :-1], t_map[:, -1])
    g = torch.ones(w.shape[0], dtype=torch.float64, device=w.device) if gamma is None else gamma.double()
    m_mat = q[:, :width].double().to(w.device).T @ (g[:, None] * u)
    return a_mat, a_bias, m_mat


def post_norm_cost(hidden: int, inner: int, width: int, bias: bool = False) -> tuple[int, int]:
    """Parameters of one writer followed by an output norm on a stream sliced to ``width``:
    ``(exact post-norm form, ordinary sliced writer)`` — ``r·(m + d) (+ r)`` against ``d·m (+ d)``
    with ``r = min(D, m + bias)`` (the generic rank)."""
    r = min(hidden, inner + int(bias))
    return r * (inner + width) + (r if bias else 0), width * inner + (width if bias else 0)
