"""The compressed shape: a plan made before surgery, counted, applied, saved, loaded.

A :class:`Plan` is the shape description of ``modeling_slicekit`` (every linear and embedding
with its sizes, replaced norms, residual blocks with their shortcut shapes, narrowed attention)
plus the config the loader builds from.  The life of a compression::

    plan = Plan.of(model)                  # the model as it is
    method.plan(...) edits plan            # widths, shortcut shapes, … — no weight is touched
    count_plan(plan)                       # the one parameter counter (arithmetic, no tensors)
    method.apply(model, plan, …)           # surgery
    Plan.of(model) == plan                 # checked by the pipeline
    save / load                            # write and interpret plan.shape()

:func:`count_plan` is the only parameter counter in slicekit: budgets are solved against it,
reports and benchmarks print it, and :func:`slicekit.models.count_parameters` counts a real model
by describing it first.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from slicekit.arch import ArchSpec, get_arch, linear_shape_spec, text_config
from slicekit.modeling_slicekit import (
    SHAPE_FORMAT,
    ReducedAttention,
    SlicedLayer,
    UnitRMSNorm,
    base_config_from_dict,
    build_compressed_model,
    params_on_meta,
    shape_features,
)


def _module_spec(mod: nn.Module) -> dict[str, Any] | None:
    if isinstance(mod, (nn.Linear, Conv1D)):
        return linear_shape_spec(mod)
    if isinstance(mod, nn.Embedding):
        return {"type": "embedding", "num_embeddings": mod.num_embeddings, "embedding_dim": mod.embedding_dim}
    if isinstance(mod, UnitRMSNorm):
        return {"type": "unit_rmsnorm", "dim": mod.dim, "norm_dim": mod.norm_dim, "eps": mod.eps}
    return None


def experts_spec_of(module: nn.Module, gate_up: str, down: str) -> dict[str, Any]:
    """The shape entry of a mixture-of-experts module (3-D parameters ``gate_up``, ``down``)."""
    e, _, d = getattr(module, gate_up).shape
    return {"type": "experts", "num_experts": int(e), "in_features": int(d),
            "width": int(getattr(module, down).shape[-1]), "gate_up": gate_up, "down": down}


def router_spec_of(module: nn.Module) -> dict[str, Any]:
    """The shape entry of a top-k router (``weight`` ``E × D``, no bias)."""
    e, d = module.weight.shape
    return {"type": "router", "num_experts": int(e), "in_features": int(d)}


def _describe_experts(model: nn.Module, modules: dict[str, dict]) -> None:
    """Routers and experts modules, by the architecture table (they are not linears, so only the
    row says which modules they are)."""
    from slicekit.arch import UnsupportedArchitectureError

    try:
        spec = get_arch(model.config)
    except (UnsupportedArchitectureError, AttributeError):
        return
    e = spec.block.experts
    if e is None:
        return
    for i in range(len(spec.layer_list(model))):
        modules[spec.layer_path(i, e.experts)] = experts_spec_of(
            model.get_submodule(spec.layer_path(i, e.experts)), e.gate_up, e.down)
        modules[spec.layer_path(i, e.router)] = router_spec_of(model.get_submodule(spec.layer_path(i, e.router)))


def describe_modules(model: nn.Module) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every linear, embedding, replaced norm, narrowed attention, router and experts module;
    residual blocks apart."""
    modules: dict[str, dict] = {}
    blocks: dict[str, dict] = {}
    _describe_experts(model, modules)
    for name, mod in model.named_modules():
        spec = _module_spec(mod)
        if spec is not None:
            modules[name] = spec
        if isinstance(mod, ReducedAttention):
            modules[name] = {"type": "reduced_attention",
                             **{k: v for k, v in mod.sk_spec.items() if k != "pad_dim"}}
        if isinstance(mod, SlicedLayer):
            spec = {"type": "block", **mod.sk_spec}
            for key in ("attn_shortcut", "mlp_shortcut"):
                p = getattr(mod, key)
                spec[key] = None if p is None else list(p.shape)
            blocks[name] = spec
    return modules, blocks


@dataclass
class Plan:
    """The compressed shape of one model: what the loader builds and the counter counts.

    ``config``: the original architecture's config as the loader will build it (a method that
    unties the head sets ``tie_word_embeddings`` to False here).  ``modules``: path → spec, as
    ``modeling_slicekit.apply_shape`` reads them; ``blocks``: decoder-layer path → residual block
    spec; ``attributes``: module attributes to set (dotted path → value).
    """

    config: PretrainedConfig
    modules: dict[str, dict[str, Any]]
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ making plans
    @classmethod
    def of(cls, model: nn.Module, attributes: Mapping[str, Any] | None = None) -> Plan:
        """The plan that describes ``model`` as it is now."""
        modules, blocks = describe_modules(model)
        attrs = dict(attributes if attributes is not None else (getattr(model, "slicekit", None) or {})
                     .get("shape", {}).get("attributes", {}))
        return cls(copy.deepcopy(model.config), modules, blocks, attrs)

    @classmethod
    def from_shape(cls, config: PretrainedConfig | Mapping[str, Any], shape: Mapping[str, Any]) -> Plan:
        if not isinstance(config, PretrainedConfig):
            config = base_config_from_dict(config)
        modules = {p: dict(s) for p, s in shape["modules"].items() if s["type"] != "block"}
        blocks = {p: dict(s) for p, s in shape["modules"].items() if s["type"] == "block"}
        return cls(copy.deepcopy(config), modules, blocks, dict(shape.get("attributes", {})))

    def copy(self) -> Plan:
        return Plan(copy.deepcopy(self.config), copy.deepcopy(self.modules), copy.deepcopy(self.blocks),
                    copy.deepcopy(self.attributes))

    @property
    def arch(self) -> ArchSpec:
        return get_arch(self.config)

    # ------------------------------------------------------------------ editing
    def resize_linear(self, path: str, *, in_features: int | None = None, out_features: int | None = None,
                      bias: bool | None = None) -> None:
        spec = self.modules[path]
        if spec["type"] not in ("linear", "conv1d"):
            raise ValueError(f"{path} is a {spec['type']}, not a linear")
        if in_features is not None:
            spec["in_features"] = int(in_features)
        if out_features is not None:
            spec["out_features"] = int(out_features)
        if bias is not None:
            spec["bias"] = bool(bias)

    def linear(self, path: str) -> dict[str, Any]:
        return self.modules[path]

    def resize_embedding(self, path: str, dim: int) -> None:
        self.modules[path]["embedding_dim"] = int(dim)

    def unit_norm(self, path: str, dim: int, norm_dim: int, eps: float) -> None:
        self.modules[path] = {"type": "unit_rmsnorm", "dim": int(dim), "norm_dim": int(norm_dim), "eps": float(eps)}

    def block(self, path: str, spec: Mapping[str, Any]) -> None:
        self.blocks[path] = {"type": "block", **spec}

    def reduced_attention(self, path: str, spec: Mapping[str, Any]) -> None:
        self.modules[path] = {"type": "reduced_attention", **spec}

    def set_mlp_width(self, layer: int, width: int) -> None:
        """The MLP of decoder layer ``layer`` keeps ``width`` intermediate neurons (for a
        mixture-of-experts layer: every routed expert keeps ``width``)."""
        b = self.arch.block
        if b.experts is not None:
            self.modules[self.arch.layer_path(layer, b.experts.experts)]["width"] = int(width)
            return
        for name in b.mlp_up:
            self.resize_linear(self.arch.layer_path(layer, name), out_features=width * b.mlp_up_fused)
        self.resize_linear(self.arch.layer_path(layer, b.mlp_down), in_features=width)

    def mlp_width(self, layer: int) -> int:
        """Intermediate neurons of decoder layer ``layer``'s MLP (of each routed expert)."""
        b = self.arch.block
        if b.experts is not None:
            return int(self.modules[self.arch.layer_path(layer, b.experts.experts)]["width"])
        return int(self.modules[self.arch.layer_path(layer, b.mlp_down)]["in_features"])

    def mlp_stream_paths(self, layer: int) -> tuple[list[str], list[str]]:
        """Model-level paths of the modules of layer ``layer``'s MLP that read the stream (after
        the MLP norm) and that write it: the ``mlp_up``/``mlp_down`` linears, or for a
        mixture-of-experts MLP the router, the experts module (reader and writer: it writes the
        width it reads) and the shared expert's linears and gate."""
        readers, writers = mlp_stream_children(self.arch)
        return [self.arch.layer_path(layer, n) for n in readers], [self.arch.layer_path(layer, n) for n in writers]

    def set_mlp_stream(self, layer: int, read: int | None = None, write: int | None = None) -> None:
        """Layer ``layer``'s MLP reads a stream ``read`` wide and writes one ``write`` wide.  An
        experts block writes the width it reads (see
        :func:`slicekit.modeling_slicekit.resize_experts`), so the two must agree there."""
        readers, writers = self.mlp_stream_paths(layer)
        if self.arch.block.experts is not None and read is not None and write is not None and read != write:
            raise ValueError(f"layer {layer}: a mixture-of-experts MLP writes the width it reads ({read} != {write})")
        for path, width, key in [(p, read, "in") for p in readers] + [(p, write, "out") for p in writers]:
            if width is None:
                continue
            spec = self.modules[path]
            if spec["type"] in ("experts", "router"):
                spec["in_features"] = int(width)
            else:
                self.resize_linear(path, **{f"{key}_features": width})

    def untie(self) -> None:
        """The head gets its own matrix (the loader must not tie it to the embeddings)."""
        self.config.tie_word_embeddings = False
        text_config(self.config).tie_word_embeddings = False

    # ------------------------------------------------------------------ reading
    def shape(self) -> dict[str, Any]:
        """The shape description (``config.json`` → ``slicekit.shape``), blocks last."""
        modules = {**self.modules, **self.blocks}
        out = {"format": SHAPE_FORMAT, "features": [], "modules": modules, "attributes": dict(self.attributes)}
        out["features"] = shape_features(out)
        return json.loads(json.dumps(out))

    def mlp_widths(self) -> list[int]:
        n = len(self.layer_indices())
        return [self.mlp_width(i) for i in range(n)]

    def layer_indices(self) -> list[int]:
        prefix = self.arch.layers + "."
        idx = {int(p[len(prefix):].split(".")[0]) for p in self.modules if p.startswith(prefix)}
        return sorted(idx)

    def is_plain(self) -> bool:
        """Whether the shape is the original architecture's with resized linears only."""
        kinds = {s["type"] for s in self.modules.values()}
        return not self.blocks and not self.attributes and kinds <= PLAIN_KINDS

    def differences(self, other: Plan) -> list[str]:
        """Human-readable differences (for the check that surgery did what the plan said)."""
        a, b = self.shape()["modules"], other.shape()["modules"]
        out = [f"{p}: planned {a.get(p)} but got {b.get(p)}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        if self.attributes != other.attributes:
            out.append(f"attributes: planned {self.attributes} but got {other.attributes}")
        if bool(getattr(self.config, "tie_word_embeddings", False)) != bool(getattr(other.config, "tie_word_embeddings", False)):
            out.append("tie_word_embeddings differs")
        return out


#: module kinds an original-architecture model has (resized or not): a plain config may describe them
PLAIN_KINDS = frozenset({"linear", "conv1d", "embedding", "experts", "router"})


# ------------------------------------------------------------------------ the one counter

@dataclass(frozen=True)
class ParamCounts:
    """Real parameter counts: total; without embeddings (token/position tables and the LM head);
    decoder only (what the decoder layers hold, shortcut matrices included)."""

    total: int
    non_embedding: int
    decoder: int

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "non_embedding": self.non_embedding, "decoder": self.decoder}

    def __getitem__(self, key: str) -> int:  # reports index counts by name
        return self.as_dict()[key]


@lru_cache(maxsize=16)
def _inventory(config_json: str) -> tuple[dict[str, int], frozenset[str]]:
    """Parameters each module of the original architecture holds directly (not recursively), by
    path, from a model built on the meta device; and the paths whose weight is tied to another's."""
    config = base_config_from_dict(json.loads(config_json))
    from transformers import AutoModelForCausalLM

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    own: dict[str, int] = {}
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, mod in model.named_modules():
        n = 0
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                tied.add(name)
                continue
            seen[id(p)] = name
            n += p.numel()
        own[name] = n
    return own, frozenset(tied)


def _config_key(config: PretrainedConfig) -> str:
    d = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map", "architectures", "transformers_version"):
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


def _spec_params(spec: Mapping[str, Any]) -> int:
    kind = spec["type"]
    if kind in ("linear", "conv1d"):
        return spec["out_features"] * spec["in_features"] + (spec["out_features"] if spec.get("bias") else 0)
    if kind == "embedding":
        return spec["num_embeddings"] * spec["embedding_dim"]
    if kind == "experts":  # gate_up E × 2F × D and down E × D × F
        return 3 * spec["num_experts"] * spec["width"] * spec["in_features"]
    if kind == "router":
        return spec["num_experts"] * spec["in_features"]
    if kind == "block":
        return sum(a * b for key in ("attn_shortcut", "mlp_shortcut") if spec.get(key) for a, b in [spec[key]])
    return 0  # unit_rmsnorm (weightless), reduced_attention (an index buffer, no parameters)


def module_counts(plan: Plan) -> dict[str, int]:
    """Parameters each module of the planned model holds directly, by path (tied copies 0).

    The original architecture's per-module counts (from a meta-device build, cached per config)
    are replaced by the counts of every module the plan lists; a replaced norm loses its
    parameters, a block adds its shortcut matrices, and a head tied to the embeddings (where the
    plan's config keeps the tie) is counted once.
    """
    own, tied = _inventory(_config_key(plan.config))
    counts = dict(own)
    for path, spec in {**plan.modules, **plan.blocks}.items():
        if path not in counts:
            raise ValueError(f"the plan names {path!r}, which the architecture does not have")
        counts[path] = 0 if path in tied else _spec_params(spec)
        if spec["type"] == "unit_rmsnorm":  # the whole norm module is replaced
            prefix = path + "."
            for p in counts:
                if p.startswith(prefix):
                    counts[p] = 0
    return counts


def count_plan(plan: Plan) -> ParamCounts:
    """Parameter counts of the model ``plan`` describes — arithmetic, no tensor is built.
    The one parameter counter of slicekit (see the module docstring)."""
    counts = module_counts(plan)
    spec = plan.arch
    total = sum(counts.values())
    layers = spec.layers + "."
    decoder = sum(n for p, n in counts.items() if p.startswith(layers))
    emb_paths = {spec.token_embedding, spec.head} | ({spec.position_embedding} if spec.position_embedding else set())
    emb = sum(counts.get(p, 0) for p in emb_paths)
    return ParamCounts(total, total - emb, decoder)


def layer_counts(plan: Plan) -> list[int]:
    """Parameters of each decoder layer of the planned model (same arithmetic as :func:`count_plan`)."""
    counts = module_counts(plan)
    spec = plan.arch
    out = []
    for i in plan.layer_indices():
        prefix = spec.layer_path(i) + "."
        out.append(sum(n for p, n in counts.items() if p.startswith(prefix)) + counts.get(spec.layer_path(i), 0))
    return out


def count_built(plan: Plan) -> ParamCounts:
    """The same counts from the model the loader would build (meta device): a cross-check of
    :func:`count_plan` used by tests."""
    model = build_compressed_model(plan.config, plan.shape())
    spec = get_arch(model.config)
    total = sum(p.numel() for p in model.parameters())
    emb_ids: set[int] = set()
    emb = 0
    for m in [*spec.embeddings(model), model.get_submodule(spec.head)]:
        for p in m.parameters(recurse=False):
            if id(p) not in emb_ids:
                emb_ids.add(id(p))
                emb += p.numel()
    decoder = sum(p.numel() for p in spec.layer_list(model).parameters())
    return ParamCounts(total, total - emb, decoder)


def mlp_stream_children(arch: ArchSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Paths, relative to a decoder layer, of what reads the MLP's input stream and what writes the
    MLP's output: the ``mlp_up``/``mlp_down`` linears, or for a mixture-of-experts MLP the router,
    the experts module (a reader through its gate/up parameter and a writer through its down
    parameter) and Qwen2-MoE's shared expert (its gate/up linears read, its down writes) and
    shared-expert gate (a reader)."""
    b = arch.block
    e = b.experts
    if e is None:
        return tuple(b.mlp_up), (b.mlp_down,)
    readers, writers = [e.router, e.experts], [e.experts]
    if e.shared is not None:
        readers += [f"{e.shared}.{n}" for n in e.shared_up]
        writers.append(f"{e.shared}.{e.shared_down}")
    if e.shared_gate is not None:
        readers.append(e.shared_gate)
    return tuple(readers), tuple(writers)


def block_spec(config: PretrainedConfig) -> dict[str, Any]:
    """The residual-block wiring for a family, from its adapter row."""
    b = get_arch(config).block
    return {"attn": b.attn, "attn_norm": b.attn_norm, "mlp": list(b.mlp), "mlp_norm": b.mlp_norm,
            "parallel": b.parallel, "attn_shortcut": None, "mlp_shortcut": None}
