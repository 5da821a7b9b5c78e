"""Method registry: each method is one sub-package that registers itself explicitly.

A method provides a typed config dataclass and a ``compress(model, calibration, config, ctx)``
function that changes the model in place through the calibration engine and returns a
:class:`CompressionResult`.  The saver, the loader and the parameter counter only ever see the
shape description derived from the model, never a method.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slicekit.errors import SlicekitError


@dataclass
class CompressionContext:
    """Where and how to compute, shared by all methods."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 8
    progress: bool = True


@dataclass
class CompressionResult:
    """What a method reports: the shape description and a human summary (widths, settings)."""

    shape: dict[str, Any]
    summary: dict[str, Any]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type
    compress: Callable[..., CompressionResult]
    description: str


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type, compress: Callable[..., CompressionResult], description: str) -> None:
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = MethodEntry(name, config_cls, compress, description)


_BROKEN: dict[str, str] = {}  # method name -> why its package failed to import


def get_method(name: str) -> MethodEntry:
    _load_builtin()
    if name in _BROKEN:
        raise SlicekitError(f"method {name!r} is unavailable: {_BROKEN[name]}")
    if name not in METHODS:
        raise SlicekitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


_BUILTIN = ("slicekit.methods.slicegpt", "slicekit.methods.modegpt", "slicekit.methods.fasp")


def _load_builtin() -> None:
    import importlib
    import importlib.util

    for mod in _BUILTIN:
        short = mod.rsplit(".", 1)[-1]
        if short in METHODS or short in _BROKEN or importlib.util.find_spec(mod) is None:
            continue
        try:
            importlib.import_module(mod)
        except ImportError as err:  # one method's missing dependency must not break the others
            _BROKEN[short] = f"{type(err).__name__}: {err}"


def config_to_dict(config: Any) -> dict[str, Any]:
    return {"config_version": getattr(config, "VERSION", 1), **dataclasses.asdict(config)}


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    data = dict(data)
    data.pop("config_version", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SlicekitError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    return cls(**data)


def config_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)
