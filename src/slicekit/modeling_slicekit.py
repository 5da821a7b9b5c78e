"""Loading code for slicekit checkpoints that needs nothing but torch, transformers and safetensors.

This one file is copied next to every compressed checkpoint and registered through ``auto_map``,
so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where slicekit is
not installed.  slicekit itself uses the very same functions for its in-memory models, which is
what makes the compressed-shape description the single source of truth: the object that the
compressor produces, the saver writes, the loader reads and the parameter counter counts is one
``shape`` dictionary interpreted by :func:`apply_shape` below.

Why an interpreter and not a model class per architecture: the compressed model *is* the
original Hugging Face model (its attention and MLP modules, its embedding and rotary code), with
some linears and embeddings resized in place, some norms replaced by a weightless RMSNorm, and
some decoder layers replaced by :class:`ResidualBlock`, a generic pre-norm residual wiring that
adds the shortcut matrices SliceGPT needs and calls the original attention/MLP submodules.
No Hugging Face forward code is copied, so the file keeps working across transformers releases.

The ``shape`` dictionary (``config.json`` → ``slicekit.shape``)::

    {"version": 1,
     "modules": {path: spec, ...},   # applied in insertion order, blocks last
     "attributes": {dotted.path: value, ...}}

with ``spec["type"]`` one of ``linear`` / ``conv1d`` / ``embedding`` (resized in place, keeping
the module's class), ``unit_rmsnorm`` (replaces a norm), ``block`` (wraps a decoder layer) and
``reduced_attention`` (wraps an attention module whose query/key and value/output head widths
were reduced, see :class:`ReducedAttention`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

SHAPE_VERSION = 1
SLICEKIT_MODEL_TYPE = "slicekit"


class SlicekitShapeError(ValueError):
    """A checkpoint does not match its compressed-shape description (truncated, edited, mixed)."""


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


class ResidualBlock(nn.Module):
    """Generic pre-norm residual wiring around the original attention and MLP submodules.

    The original decoder layer's children are adopted under their own names, so parameter names
    do not change.  Only the residual arithmetic is ours: ``out = x·S + f(norm(x))`` where ``S``
    is an optional shortcut matrix (``None`` means identity).  Sequential blocks (Llama, OPT,
    GPT-2, Phi-3) have an attention and an MLP shortcut; parallel ones (GPT-NeoX, Phi-2) one.

    Positional and keyword arguments from the model's layer loop are passed to the attention
    module unchanged: every supported family forwards them to its attention under the same
    names (and GPT-2 in the same positional order).
    """

    def __init__(self, layer: nn.Module, spec: Mapping[str, Any]) -> None:
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.spec = dict(spec)
        self.attn_name: str = spec["attn"]
        self.attn_norm_name: str = spec["attn_norm"]
        self.mlp_names: list[str] = list(spec["mlp"])
        self.mlp_norm_name: str | None = spec.get("mlp_norm")
        self.parallel: bool = bool(spec["parallel"])
        ref = next(layer.parameters())
        for key in ("attn_shortcut", "mlp_shortcut"):
            shp = spec.get(key)
            param = None if shp is None else nn.Parameter(torch.empty(*shp, dtype=ref.dtype, device=ref.device))
            self.register_parameter(key, param)

    @staticmethod
    def _residual(x: torch.Tensor, mat: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``x·S + out``.  ``S = None`` is the identity; if the block then writes a wider stream
        than it reads, ``x`` holds the leading coordinates of the wider one (the truncated
        identity — SliceGPT's calibration uses it to avoid a shortcut product)."""
        if mat is not None:
            return torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]),
                               mat.to(x.dtype)).view(out.shape)
        if x.shape[-1] == out.shape[-1]:
            return x + out
        if torch.is_grad_enabled():
            return out + F.pad(x, (0, out.shape[-1] - x.shape[-1]))
        out[..., : x.shape[-1]] += x
        return out

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        for name in self.mlp_names:
            h = getattr(self, name)(h)
        return h

    def attn_half(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sequential blocks: the stream after the attention residual, ``x·S_attn + attn(norm(x))``."""
        x = hidden_states
        attn_out = getattr(self, self.attn_name)(getattr(self, self.attn_norm_name)(x), *args, **kwargs)
        if isinstance(attn_out, tuple):
            attn_out = attn_out[0]
        return self._residual(x, self.attn_shortcut, attn_out)

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Sequential blocks: ``h·S_mlp + mlp(norm(h))`` on the stream after attention."""
        return self._residual(hidden_states, self.mlp_shortcut,
                              self._mlp(getattr(self, self.mlp_norm_name)(hidden_states)))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.parallel:
            return self.mlp_half(self.attn_half(hidden_states, *args, **kwargs))
        x = hidden_states
        h = getattr(self, self.attn_norm_name)(x)
        attn_out = getattr(self, self.attn_name)(h, *args, **kwargs)
        if isinstance(attn_out, tuple):
            attn_out = attn_out[0]
        h_mlp = h if self.mlp_norm_name is None else getattr(self, self.mlp_norm_name)(x)
        return self._residual(x, self.attn_shortcut, attn_out + self._mlp(h_mlp))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad the narrower of (q, k) and v in the head dimension to the wider one.

    Fused attention kernels (PyTorch's CPU flash kernel, FlashAttention) need one head size for
    q, k and v; with different sizes SDPA falls back to its math path, which materialises the
    T×T scores and skips no causal block: 4-5x slower at 2048 tokens.  Zero columns change
    neither the scores ``q·kᵀ`` nor the first ``v_dim`` output columns (the caller drops the
    rest), and the softmax scale is passed explicitly, so the result is the same.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if dq < dv:
        return F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq)), v
    if dv < dq:
        return q, k, F.pad(v, (0, dq - dv))
    return q, k, v


class ReducedAttention(nn.Module):
    """Attention whose heads were narrowed: ``qk_dim`` query/key and ``v_dim`` value dims per head.

    Used by MoDeGPT, which keeps a subset of each head's query/key dimensions and a low-rank
    value/output factorisation.  The original attention module's children (its q/k/v/o linears,
    already resized) are adopted under their own names, so parameter names do not change, and
    the original module's attributes (``config``, ``layer_idx``, ``scaling``, ``is_causal``,
    ``sliding_window`` …) are copied.  Only the head plumbing is ours: project, split into heads,
    apply RoPE to the kept rotary dimensions, update the KV cache, and call the installed
    transformers' attention function (``ALL_ATTENTION_FUNCTIONS`` for the configured
    implementation, else the family's own ``eager_attention_forward``), then the output linear.

    RoPE on a subset: a head keeps rotary pairs ``(j, j + r/2)`` together and stores them in the
    order ``[firsts, partners, unrotated dims]`` (``qk_index`` holds their original positions, one
    row per KV head; the query heads of a GQA group share their KV head's row).  ``rotate_half`` of
    the reduced vector then rotates the same pairs, and cos/sin are gathered at ``qk_index``: the
    scores are exactly those of the original head restricted to the kept dimensions.  The softmax
    scale stays the original ``head_dim ** -0.5`` (``scaling``).

    Spec: ``{"type": "reduced_attention", "q", "k", "v", "o": child names, "num_heads",
    "num_kv_heads", "qk_dim", "v_dim", "rotary_dim" (rotated dims among the kept ones),
    "qk_index": [[int] * qk_dim] * num_kv_heads, "scaling"}``.
    """

    def __init__(self, attn: nn.Module, spec: Mapping[str, Any]) -> None:
        super().__init__()
        for key, value in vars(attn).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.eager_module = type(attn).__module__
        self.set_spec(spec)

    def set_spec(self, spec: Mapping[str, Any]) -> None:
        self.spec = {k: v for k, v in spec.items() if k != "type"}
        self.num_heads = int(spec["num_heads"])
        self.num_kv_heads = int(spec["num_kv_heads"])
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.qk_dim, self.v_dim = int(spec["qk_dim"]), int(spec["v_dim"])
        self.rotary_dim = int(spec["rotary_dim"])
        self.scaling = float(spec["scaling"])
        self.qk_index = [list(map(int, row)) for row in spec["qk_index"]]
        self._index_cache: dict = {}

    def _rope_index(self, device: torch.device) -> torch.Tensor:
        idx = self._index_cache.get(device)
        if idx is None:
            idx = torch.tensor([row[: self.rotary_dim] for row in self.qk_index], dtype=torch.long, device=device)
            self._index_cache[device] = idx
        return idx

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if args:
            raise TypeError("ReducedAttention takes its arguments by keyword, as the decoder layers pass them")
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        kwargs.pop("output_attentions", None)
        spec = self.spec
        lead = hidden_states.shape[:-1]
        q = getattr(self, spec["q"])(hidden_states).view(*lead, self.num_heads, self.qk_dim).transpose(1, 2)
        k = getattr(self, spec["k"])(hidden_states).view(*lead, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        v = getattr(self, spec["v"])(hidden_states).view(*lead, self.num_kv_heads, self.v_dim).transpose(1, 2)
        if self.rotary_dim and position_embeddings is not None:
            cos, sin = position_embeddings
            idx = self._rope_index(cos.device)  # (kv_heads, r)
            cos_k, sin_k = cos[..., idx].movedim(-2, -3), sin[..., idx].movedim(-2, -3)  # (..., kv, T, r)
            g = self.num_key_value_groups
            cos_q = cos_k.repeat_interleave(g, dim=-3) if g > 1 else cos_k
            sin_q = sin_k.repeat_interleave(g, dim=-3) if g > 1 else sin_k
            q, k = self._rope(q, cos_q.to(q.dtype), sin_q.to(q.dtype)), self._rope(k, cos_k.to(k.dtype), sin_k.to(k.dtype))
        q, k, v = equal_head_dims(q, k, v)  # before the cache, which then holds them padded
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = getattr(sys.modules.get(self.eager_module), "eager_attention_forward", None)
        impl = getattr(self.config, "_attn_implementation", "eager")
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager) if eager is not None else ALL_ATTENTION_FUNCTIONS[impl]
        # Mistral reads the window from the config, Qwen2 from the module (None on full layers).
        window = self.sliding_window if "sliding_window" in vars(self) else getattr(self.config, "sliding_window", None)
        extra = {} if window is None else {"sliding_window": window}
        dropout = getattr(self, "attention_dropout", getattr(self, "dropout", 0.0))
        out, weights = interface(self, q, k, v, attention_mask, dropout=dropout if self.training else 0.0,
                                 scaling=self.scaling, **extra, **kwargs)
        if out.shape[-1] > self.v_dim:
            out = out[..., : self.v_dim]
        out = out.reshape(*lead, -1).contiguous()
        return getattr(self, spec["o"])(out), weights

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, qk_dim={self.qk_dim}, "
                f"v_dim={self.v_dim}, rotary_dim={self.rotary_dim}")


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _new_param(like: torch.Tensor, shape: Iterable[int]) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


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


def apply_shape(model: nn.Module, shape: Mapping[str, Any]) -> nn.Module:
    """Turn an original-architecture model into the compressed architecture, in place.

    Only the structure changes: resized modules get uninitialised storage of the right shape.
    Weights are filled afterwards (by a compressor, or by :func:`load_weights`).
    """
    if int(shape.get("version", -1)) != SHAPE_VERSION:
        raise SlicekitShapeError(f"unsupported slicekit shape version {shape.get('version')!r}")
    blocks = []
    for path, spec in shape["modules"].items():
        kind = spec["type"]
        if kind == "block":
            blocks.append((path, spec))
            continue
        if kind in ("linear", "conv1d"):
            _resize_linear(model.get_submodule(path), spec)
        elif kind == "embedding":
            emb = model.get_submodule(path)
            emb.weight = _new_param(emb.weight, (int(spec["num_embeddings"]), int(spec["embedding_dim"])))
            emb.num_embeddings, emb.embedding_dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
        elif kind == "unit_rmsnorm":
            parent, name = _parent_and_name(model, path)
            setattr(parent, name, UnitRMSNorm(spec["dim"], spec["norm_dim"], spec["eps"]))
        elif kind == "reduced_attention":
            parent, name = _parent_and_name(model, path)
            attn = model.get_submodule(path)
            if isinstance(attn, ReducedAttention):
                attn.set_spec(spec)
            else:
                setattr(parent, name, ReducedAttention(attn, spec))
        else:
            raise SlicekitShapeError(f"unknown module type {kind!r} for {path!r} in the shape description")
    for path, spec in blocks:
        parent, name = _parent_and_name(model, path)
        layer = model.get_submodule(path)
        block = layer if isinstance(layer, ResidualBlock) else ResidualBlock(layer, spec)
        if block is layer:  # re-applying: refresh the shortcut shapes
            for key in ("attn_shortcut", "mlp_shortcut"):
                shp = spec.get(key)
                block.register_parameter(key, None if shp is None else _new_param(next(block.parameters()), shp))
            block.spec = dict(spec)
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = block
        else:
            setattr(parent, name, block)
    for dotted, value in shape.get("attributes", {}).items():
        parent, name = _parent_and_name(model, dotted)
        setattr(parent, name, value)
    # Resizing gave the embedding and the head new storage: re-tie them where the config ties
    # them (methods that keep the tie, e.g. MoDeGPT), so the checkpoint holds the matrix once.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a checkpoint of ``model`` must hold (params and buffers).

    Non-persistent buffers (rotary frequencies, causal masks) are included: the loader builds the
    model on the meta device, so they have to come from the file rather than from ``__init__``.
    """
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=True):
        out[name] = tuple(tensor.shape)
    for name, tensor in model.named_buffers(remove_duplicate=True):
        out[name] = tuple(tensor.shape)
    return out


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: parameters without tied duplicates, plus all buffers, contiguous."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.named_parameters(remove_duplicate=True):
        tensors[name] = tensor.detach().contiguous()
    for name, tensor in model.named_buffers(remove_duplicate=True):
        tensors[name] = tensor.detach().contiguous()
    return tensors


def _checkpoint_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise SlicekitShapeError(f"checkpoint {directory} is incomplete: missing shard(s) {', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise SlicekitShapeError(f"no model.safetensors (or index) in {directory}")
    return [single]


def load_weights(model: nn.Module, directory: str, device: str | torch.device = "cpu") -> None:
    """Fill ``model`` (whose tensors may live on the meta device) from the safetensors files.

    Every expected tensor must be present with exactly the expected shape, and nothing else may
    be in the files: a truncated, edited or mismatched checkpoint fails with a message naming the
    first problems instead of loading garbage.
    """
    from safetensors import SafetensorError, safe_open

    expected = expected_tensors(model)
    seen: set[str] = set()
    problems: list[str] = []
    owners = {}
    for name, _ in model.named_parameters(remove_duplicate=True):
        owners[name] = "param"
    for name, _ in model.named_buffers(remove_duplicate=True):
        owners[name] = "buffer"
    for path in _checkpoint_files(directory):
        try:
            handle = safe_open(path, framework="pt", device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise SlicekitShapeError(f"cannot read {os.path.basename(path)} ({err}): the file is corrupt or truncated") from err
        with handle as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key not in expected:
                    problems.append(f"unexpected tensor {key}")
                    continue
                shp = tuple(fh.get_slice(key).get_shape())
                if shp != expected[key]:
                    problems.append(f"{key}: file has shape {list(shp)}, the shape description says {list(expected[key])}")
                    continue
                try:
                    tensor = fh.get_tensor(key)
                except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                    raise SlicekitShapeError(f"cannot read tensor {key} from {os.path.basename(path)}: {err}") from err
                parent, name = _parent_and_name(model, key)
                if owners[key] == "param":
                    old = parent._parameters[name]
                    # the file's dtype is the truth (a bfloat16 checkpoint stays bfloat16 unless asked)
                    parent._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
                else:
                    persistent = name not in parent._non_persistent_buffers_set
                    parent.register_buffer(name, tensor, persistent=persistent)
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        problems.insert(0, f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if problems:
        raise SlicekitShapeError(f"checkpoint {directory} does not match its shape description: " + "; ".join(problems[:5]))


def build_compressed_model(base_config: PretrainedConfig, shape: Mapping[str, Any]) -> nn.Module:
    """The compressed architecture with uninitialised (meta) storage, built without allocating the
    original-size model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    apply_shape(model, shape)
    return model


def _resolve_dir(name_or_path: str, **hub_kwargs: Any) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    allowed = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.md"]
    keep = {k: hub_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in hub_kwargs}
    return snapshot_download(name_or_path, allow_patterns=allowed, **keep)


def _split_config(raw: Mapping[str, Any]) -> tuple[PretrainedConfig, dict[str, Any]]:
    if "slicekit" not in raw or "base_config" not in raw:
        raise SlicekitShapeError("config.json has no slicekit section: this is not a slicekit checkpoint")
    base = dict(raw["base_config"])
    base_config = AutoConfig.for_model(base.pop("model_type"), **base)
    return base_config, dict(raw["slicekit"])


def load_compressed(directory: str, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a slicekit checkpoint as the original Hugging Face model class, compressed."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise SlicekitShapeError(f"{directory} has no config.json")
    with open(cfg_path) as fh:
        raw = json.load(fh)
    base_config, meta = _split_config(raw)
    model = build_compressed_model(base_config, meta["shape"])
    load_weights(model, directory, device="cpu")
    if getattr(base_config, "tie_word_embeddings", False):
        model.tie_weights()
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model = model.to(device)
    model.eval()
    model.slicekit = meta  # the shape and provenance, for users and for slicekit.save
    return model


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
        device = device_map if isinstance(device_map, str) and device_map != "auto" else "cpu"
        if device_map == "auto" and torch.cuda.is_available():
            device = "cuda"
        return load_compressed(directory, dtype=dtype, device=device)
