"""Method registry and the contract every compression method follows.

A method is one folder (``methods/<name>/``: a typed config dataclass, its procedure, its pure
maths) and one line in :data:`_BUILTIN`.  It registers a :class:`MethodSpec` saying

- what it **needs** (:class:`Needs`): calibration text or none, gradients, layer-wise or global;
- how it **plans**: ``plan(model, config, fractions) -> Plan`` — the compressed shape for
  per-layer fractions (what a fraction means is the method's: residual width for SliceGPT, share
  of the layer's parameters for FASP, …), without touching a weight;
- how it **applies** the plan: ``apply(model, plan, config, ctx) -> summary`` — the surgery, with
  calibration through ``ctx.engine()``;
- optionally, what it must **learn** before it can plan: ``learn(model, config, ctx) -> state``
  (DISP-LLM's masks, trained on the calibration text); the pipeline then calls
  ``plan(model, config, fractions, learned=state)`` and hands ``apply`` the same state as
  ``ctx.learned``.

Everything else — drawing calibration text, layer scores, schedules, meeting a parameter
target against the one counter, checking that the result is the plan, reports — is the
pipeline's (:mod:`slicekit.pipeline`), the same for every method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slicekit.errors import SlicekitError
from slicekit.schedules import DEFAULT_CAP, DEFAULT_EPSILON, check_schedule


@dataclass(frozen=True)
class Needs:
    """What a method needs from the pipeline."""

    calibration: bool = True  # calibration batches (False: the pipeline reads no text at all)
    gradients: bool = False  # trains something (the pipeline leaves autograd on)
    scope: str = "layerwise"  # "layerwise" (one layer at a time) or "global" (the whole model at once)


@dataclass
class MethodConfig:
    """Settings every method shares; a method's config dataclass extends it.

    ``target_params``: fraction of the model's **decoder parameters removed** (real count: the
    shortcut matrices of SliceGPT count, the embeddings and head do not), met against the one
    parameter counter by scaling the schedule's mean.  ``None``: the method's own knob decides.
    ``schedule``: how the removal is spread over layers — ``constant``, ``dynamic`` (layer
    redundancy, with ``slice_base``), ``modegpt`` (``softmax(−BI/ε)`` with ``epsilon``) or a JSON
    file (see :mod:`slicekit.schedules`); ``max_layer_sparsity`` caps any one layer.
    """

    VERSION: ClassVar[int] = 2
    #: recorded version -> values of fields added after it that reproduce that version's behaviour
    LEGACY: ClassVar[dict[int, dict[str, Any]]] = {}
    #: one-line help per field for the command line (subclasses add theirs; the docstring is the fallback)
    HELP: ClassVar[dict[str, str]] = {
        "target_params": "fraction of decoder parameters REMOVED, real count (0.25 keeps 75 %)",
        "schedule": "spread over layers: constant, dynamic, modegpt, or a JSON file of widths/fractions",
        "slice_base": "dynamic schedule: the fraction every layer loses at least",
        "epsilon": "modegpt schedule: softmax temperature of the block-importance allocation",
        "max_layer_sparsity": "cap on the fraction removed from any one layer",
    }

    target_params: float | None = None
    schedule: str = "constant"
    slice_base: float | None = None
    epsilon: float = DEFAULT_EPSILON
    max_layer_sparsity: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        if self.target_params is not None and not (0.0 <= self.target_params < 1.0):
            raise SlicekitError(f"target_params is the fraction of decoder parameters removed and must be in "
                                f"[0, 1) (got {self.target_params})")
        check_schedule(self.schedule)
        if not self.epsilon > 0:
            raise SlicekitError(f"epsilon must be > 0 (got {self.epsilon})")
        if not 0 < self.max_layer_sparsity < 1:
            raise SlicekitError(f"max_layer_sparsity must be in (0, 1) (got {self.max_layer_sparsity})")
        if self.slice_base is not None and not 0.0 <= self.slice_base < 1.0:
            raise SlicekitError(f"slice_base must be in [0, 1) (got {self.slice_base})")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                raise SlicekitError(f"{f.name} must be a number (got nan)")


@dataclass
class MethodContext:
    """What the pipeline hands a method's ``apply``."""

    calibration: list[torch.Tensor] | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    fractions: list[float] = field(default_factory=list)
    scores: Any = None  # slicekit.scores.LayerScores when the schedule needed them
    learned: Any = None  # what the method's ``learn`` step returned (None: it has none)
    offload_dir: str | None = None  # calibration activations as memory-mapped files here (--offload-dir)

    def engine(self, model: nn.Module):
        """The calibration engine over this run's calibration batches."""
        from slicekit.arch import get_arch
        from slicekit.calibration import CalibrationEngine

        if not self.calibration:
            raise SlicekitError("this method needs calibration data")
        return CalibrationEngine(model, get_arch(model.config), self.calibration, device=self.device,
                                 progress=self.progress, offload_dir=self.offload_dir)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method."""

    name: str
    config_cls: type
    plan: Callable[..., Any]
    apply: Callable[..., dict[str, Any]]
    description: str
    needs: Needs = Needs()
    #: the schedule mean used when ``target_params`` is None (e.g. SliceGPT's ``slicing``)
    default_mean: Callable[[Any], float] | None = None
    #: extra keyword arguments for ``resolve_schedule`` (e.g. SliceGPT's width rounding)
    schedule_kwargs: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    #: why the method cannot compress this model (None: it can); checked before any work
    unsupported: Callable[[nn.Module, Any], str | None] | None = None
    #: ``learn(model, config, ctx) -> state``, run once before planning, with autograd on and the
    #: calibration batches in ``ctx``; ``state`` reaches ``plan(..., learned=state)`` and
    #: ``ctx.learned`` in ``apply``.  For methods whose shape depends on something trained.
    learn: Callable[[nn.Module, Any, MethodContext], Any] | None = None

    def make_plan(self, model: nn.Module, config: Any, fractions: list[float], learned: Any = None) -> Any:
        """``plan(model, config, fractions)``, with ``learned=`` for a method that has a learn step."""
        if self.learn is not None:
            return self.plan(model, config, fractions, learned=learned)
        return self.plan(model, config, fractions)


METHODS: dict[str, MethodSpec] = {}
#: options `slicekit compress` has for every method: a method's config may not reuse the names
RESERVED_OPTIONS = frozenset({"model", "dtype", "device", "json", "quiet", "method", "recipe", "seed", "out",
                              "eval", "cal_dataset", "cal_split", "cal_nsamples", "cal_seqlen", "cal_batch_size",
                              "cal_strategy", "eval_dataset", "eval_seqlen", "eval_max_windows", "eval_batch_size",
                              "stream", "restart", "dry_run", "save_dtype", "offload_dir", "device_map"})


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    if not (dataclasses.is_dataclass(spec.config_cls) and issubclass(spec.config_cls, MethodConfig)):
        raise TypeError(f"{spec.name}: the config must be a dataclass extending MethodConfig")
    clash = {f.name for f in dataclasses.fields(spec.config_cls)} & RESERVED_OPTIONS
    if clash:
        raise TypeError(f"{spec.name}: config fields {sorted(clash)} clash with options of `slicekit compress`")
    METHODS[spec.name] = spec
    return spec


#: method name -> the module that registers it (imported on first use; a failing import makes
#: only that method unavailable, with the reason).
_BUILTIN: dict[str, str] = {
    "slicegpt": "slicekit.methods.slicegpt",
    "modegpt": "slicekit.methods.modegpt",
    "fasp": "slicekit.methods.fasp",
    "dotresize": "slicekit.methods.dotresize",
    "prunenet": "slicekit.methods.prunenet",
    "disp": "slicekit.methods.disp",
}
_BROKEN: dict[str, str] = {}


def register_builtin(name: str, module: str) -> None:
    """Make a method importable by name (for plug-ins: one line, no package-name convention)."""
    _BUILTIN[name] = module


def _load_builtin() -> None:
    import importlib

    for name, module in list(_BUILTIN.items()):
        if name in METHODS or name in _BROKEN:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:  # one method's missing dependency must not break the others
            _BROKEN[name] = f"{type(err).__name__}: {err}"


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if name in _BROKEN:
        raise SlicekitError(f"method {name!r} is unavailable: {_BROKEN[name]}")
    if name not in METHODS:
        raise SlicekitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


# ------------------------------------------------------------------------ configs as data

def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool, tuple | None]:
    """(base type, optional, choices) of a config field, from its annotation."""
    hints = typing.get_type_hints(cls)
    ann = hints.get(f.name, str)
    optional = False
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = len(args) < len(typing.get_args(ann))
        ann = args[0] if len(args) == 1 else str
        origin = typing.get_origin(ann)
    choices = None
    if origin is typing.Literal:
        choices = typing.get_args(ann)
        ann = type(choices[0])
    return ann, optional, choices


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """Turn a value from the command line or a recipe into the field's type, or explain."""
    fields = {f.name: f for f in config_fields(cls)}
    if name not in fields:
        raise SlicekitError(f"unknown {cls.__name__} setting {name!r}; known: {', '.join(sorted(fields))}")
    base, optional, choices = field_type(cls, fields[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise SlicekitError(f"{name} cannot be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = low in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif base is str and not isinstance(value, str):
            raise ValueError(value)
    except (TypeError, ValueError):
        raise SlicekitError(f"{name} must be {'one of ' + ', '.join(map(str, choices)) if choices else 'a ' + base.__name__}"
                            f" (got {value!r})") from None
    if choices and value not in choices:
        raise SlicekitError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    return {"config_version": getattr(config, "VERSION", 1), **dataclasses.asdict(config)}


def upgrade_settings(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config's settings (``config_version`` removed) with the values that reproduce it
    under today's config: a field added after the recorded version takes the value that matches
    the old behaviour (``cls.LEGACY[version]``), not today's default, unless the record has it."""
    data = dict(data)
    version = data.pop("config_version", None)
    legacy: dict[int, dict[str, Any]] = getattr(cls, "LEGACY", {})
    if isinstance(version, int):
        for v in sorted(legacy):
            if version <= v:
                for k, value in legacy[v].items():
                    data.setdefault(k, value)
    return data


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    data = upgrade_settings(cls, data)
    return cls(**{k: coerce_field(cls, k, v) for k, v in data.items()})


def config_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)
