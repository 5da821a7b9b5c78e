"""Checks that run before any work: arguments, the model's context, dtype/device, the output
location and its free space — and guards against non-finite weights and activations.

Why a module of its own: a user who typed ``--seqlen 0`` or a window longer than the model's
context should hear so in a second, not after a minute of loading weights; everything here
reads only the command line, small files (``config.json``, safetensors headers, GGUF metadata)
and the file system.  Every check raises :class:`~slicekit.errors.SlicekitError` with one line
that names the problem and what to do, which the CLI prints as ``slicekit: error: …`` (exit 2).

:func:`preflight` runs every check that applies to a parsed ``slicekit`` command line;
:func:`check_finite_model` and :class:`FiniteGuard` turn a silent NaN model into an error that
names the parameter or the layer.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slicekit.errors import SlicekitError

#: config keys that hold a model's maximum context, in order of preference
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)


# ----------------------------------------------------------------------------- numbers on the command line


def check_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an int in ``[minimum, maximum]``; ``name`` is what the user typed (``--seqlen``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SlicekitError(f"{name} must be a whole number (got {value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"≥ {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise SlicekitError(f"{name} must be {bounds} (got {value}){'; ' + hint if hint else ''}")
    return value


def check_positive_int(name: str, value: Any, hint: str = "") -> int:
    """A count that must be at least one (samples, windows, repeats, batch sizes, threads)."""
    return check_int(name, value, minimum=1, hint=hint)


def check_optional_positive_int(name: str, value: Any, hint: str = "") -> int | None:
    """``None`` (the default: unlimited/automatic) or a count ≥ 1."""
    return None if value is None else check_positive_int(name, value, hint)


def check_fraction(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = False) -> float:
    """A share in ``[0, 1)`` (by default); NaN and non-numbers are refused."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SlicekitError(f"{name} must be a number between 0 and 1 (got {value!r})") from None
    low_ok = x >= 0 if allow_zero else x > 0
    high_ok = x <= 1 if allow_one else x < 1
    if math.isnan(x) or not (low_ok and high_ok):
        interval = ("[" if allow_zero else "(") + "0, 1" + ("]" if allow_one else ")")
        raise SlicekitError(f"{name} must be in {interval} (got {value})")
    return x


# ------------------------------------------------------------------------------------- the model's context


def context_from_config(raw: Mapping[str, Any]) -> int | None:
    """The maximum context a config dict declares, or None when it declares none.

    A slicekit checkpoint keeps the original config under ``base_config``; multimodal configs
    keep the language model's under ``text_config``.
    """
    if isinstance(raw.get("base_config"), Mapping) and "slicekit" in raw:
        raw = raw["base_config"]
    for cfg in (raw, raw.get("text_config")):
        if not isinstance(cfg, Mapping):
            continue
        for key in CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _gguf_reader(path: str) -> Any | None:
    try:
        from gguf import GGUFReader
    except ImportError:  # the package is optional: no context known
        return None
    try:
        return GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError) as err:
        raise SlicekitError(
            f"{path} is not a readable GGUF file ({_first_line(err)}); "
            "give a .gguf model file, a model directory or a hub id"
        ) from err


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types and field.types[0].name == "STRING" else part[0]


def gguf_context_length(path: str) -> int | None:
    """``<arch>.context_length`` from a GGUF file's metadata (memory-mapped; no tensor is read)."""
    reader = _gguf_reader(path)
    if reader is None:
        return None
    arch = _gguf_value(reader, "general.architecture")
    value = _gguf_value(reader, f"{arch}.context_length") if arch else None
    return int(value) if value else None


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise SlicekitError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}): "
            "the model directory is corrupt; re-download or re-save it"
        ) from err
    except OSError as err:
        raise SlicekitError(f"cannot read {path}: {err.strerror}") from err
    if not isinstance(raw, dict):
        raise SlicekitError(f"{path} is not a JSON object: the model directory is corrupt")
    return raw


def _hub_config(repo: str) -> dict[str, Any] | None:
    """The config.json of a hub model if it is already in the local cache (never downloads)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "config.json", local_files_only=True)
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        return raw if isinstance(raw, dict) else None
    except Exception:  # not cached, offline, malformed id: the loader reports it properly
        return None


def model_context_length(model_spec: str) -> int | None:
    """The model's maximum context in tokens, read WITHOUT loading weights, or None if unknown.

    Sources: a local directory's ``config.json`` (a slicekit checkpoint's ``base_config``), a
    GGUF file's ``<arch>.context_length``, a packaged alias (resolved by
    :func:`slicekit.models.resolve_model`), a hub model only if its config is already cached.
    A missing path or a corrupt config raises the loader's one-line error.
    """
    from slicekit.models import cached_source, resolve_model

    src = cached_source(resolve_model(model_spec))
    if src.gguf_file:
        return gguf_context_length(os.path.join(src.path, src.gguf_file))
    if src.kind in ("dir", "slicekit"):
        return context_from_config(_read_config(src.path))
    raw = _hub_config(src.path)
    return context_from_config(raw) if raw else None


def check_window(
    seqlen: int, context: int | None, *, name: str = "--seqlen", model: str = "the model"
) -> None:
    """Refuse a window longer than the model's context (positions past it are untrained, and
    learned position tables simply have no row for them)."""
    if context is not None and seqlen > context:
        raise SlicekitError(
            f"{name} {seqlen} is longer than the context of {model} ({context} tokens); "
            f"use {name} {context} or less"
        )


# ------------------------------------------------------------------------------ parameters without loading


def _safetensors_numel(path: str) -> int:
    """Elements in a safetensors file, from its JSON header alone."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("truncated header")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(fh.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def model_parameter_count(model_spec: str) -> int | None:
    """Parameters stored by a model, from safetensors headers or GGUF tensor infos (None if
    unknown, e.g. a hub id or pickled weights) — for the disk-space estimate."""
    from slicekit.models import cached_source, resolve_model

    src = resolve_model(model_spec)
    try:
        src = cached_source(src)
        if src.gguf_file:
            reader = _gguf_reader(os.path.join(src.path, src.gguf_file))
            return None if reader is None else int(sum(int(t.n_elements) for t in reader.tensors))
        if src.kind in ("dir", "slicekit"):
            files = [f for f in os.listdir(src.path) if f.endswith(".safetensors")]
            return sum(_safetensors_numel(os.path.join(src.path, f)) for f in files) if files else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a corrupt file is the loader's to report, with its own message
    return None


# ---------------------------------------------------------------------------------------- dtype and device


def check_dtype_device(
    dtype: str | torch.dtype | None, device: str | torch.device
) -> tuple[torch.dtype, torch.device]:
    """Refuse an unknown dtype, an unknown or absent device, and a dtype the device cannot
    compute in — before anything is loaded onto it."""
    from slicekit.models import parse_dtype

    dt = parse_dtype(dtype)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SlicekitError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            )
            raise SlicekitError(f"--device {device} requested but {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SlicekitError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
        if dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise SlicekitError("this GPU cannot compute in bfloat16; use --dtype float16 or float32")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SlicekitError(f"--device {device} requested but MPS is not available; use --device cpu")
    elif dev.type != "cpu":
        raise SlicekitError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        try:
            a = torch.ones(2, 2, dtype=dt)
            (a @ a).sum().item()
        except RuntimeError as err:
            raise SlicekitError(
                f"--dtype {_dtype_name(dt)} is not supported on this CPU by torch "
                f"{torch.__version__} ({str(err).splitlines()[0]}); use --dtype float32"
            ) from err
    return dt, dev


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ------------------------------------------------------------------------------------- the output location


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_output_dir(path: str) -> None:
    """The output can be written: it is not a file, not a directory that is not a model (an
    atomic save replaces the whole directory), and its nearest existing ancestor is a writable
    directory (checked by creating and removing a hidden probe file, which also catches
    read-only mounts and, as root, the cases permission bits do not)."""
    target = os.path.abspath(path)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise SlicekitError(f"--out {path} exists and is not a directory; choose another --out")
        cwd = os.path.abspath(os.getcwd())
        if (
            target == cwd
            or cwd.startswith(target.rstrip(os.sep) + os.sep)
            or target == os.path.expanduser("~")
        ):
            raise SlicekitError(
                f"--out {path} would replace the current or home directory; choose a new directory"
            )
        entries = [e for e in os.listdir(target) if not e.startswith(".")]
        if entries and "config.json" not in entries:
            raise SlicekitError(
                f"--out {path} is a non-empty directory that is not a saved model (no config.json) "
                "and saving replaces it entirely; choose a new or empty directory"
            )
    base = _nearest_existing(os.path.dirname(target))
    if not os.path.isdir(base):
        raise SlicekitError(
            f"cannot create --out {path}: {base} is a file, not a directory; choose another --out"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise SlicekitError(
            f"cannot write --out {path}: {base} is not writable (permission denied); choose another --out"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".slicekit-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SlicekitError(
            f"cannot write --out {path}: {base}: {write_error_reason(err)}; choose another --out"
        ) from err


def estimated_output_bytes(params: int, dtype: str | torch.dtype | None) -> int:
    """Bytes a saved model of ``params`` parameters in ``dtype`` takes, with room to spare: 10 %
    over the weights (a compressed model can hold a little more than the original, e.g.
    SliceGPT's shortcut matrices at light slicing) plus 32 MiB for tokenizer, loader and card."""
    from slicekit.models import parse_dtype

    size = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return int(params * size * 1.10) + 32 * 2**20


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_disk_space(path: str, needed_bytes: int) -> None:
    """Refuse to start when the file system that will hold ``path`` has less free space than
    ``needed_bytes`` (the save writes a complete new copy before the old one is removed)."""
    base = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return  # nothing to measure on: the save itself reports a failing write
    if free < needed_bytes:
        raise SlicekitError(
            f"not enough disk space for --out {path}: about {_human(needed_bytes)} needed, "
            f"{_human(free)} free on {base}; free some space or choose another --out"
        )


def write_error_reason(err: BaseException) -> str:
    """What a failed write means, in words (``OSError`` or safetensors' wrapped I/O errors, whose
    message carries ``os error N``)."""
    code = getattr(err, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(err))
        code = int(m.group(1)) if m else None
    if code == errno.ENOSPC:
        return "no space left on the device"
    if code == errno.EFBIG:
        return "file too large (the file system or a size limit such as `ulimit -f` refused it)"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code is not None:
        return os.strerror(code)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# --------------------------------------------------------------- things written must not name this machine

_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[\w.@+-]+/)*[\w.@+-]+")


def public_text(text: str) -> str:
    """``text`` with every absolute local path replaced by its last component
    (``wikitext2/validation from /data/wikitext-2/wiki.valid.tokens`` →
    ``… from wiki.valid.tokens``); URLs are left alone."""
    return _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or m.group(0), text)


def public_value(obj: Any) -> Any:
    """:func:`public_text` applied to every string in a JSON-able object (keys included)."""
    if isinstance(obj, dict):
        return {public_value(k): public_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_value(v) for v in obj]
    if isinstance(obj, str):
        return public_text(obj)
    return obj


# ---------------------------------------------------------------------- non-finite weights and activations

_CHUNK = 1 << 24  # elements per finiteness check (bounds the temporary boolean tensor)


def _nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±inf count) of a floating tensor, in slices (a big embedding would otherwise
    need a boolean copy of itself)."""
    flat = t.detach().reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        if bool(torch.isfinite(part).all()):
            continue
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """Raise naming ``where`` when ``tensor`` holds NaN or ±inf (integer tensors always pass)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    nan, inf = _nonfinite_counts(tensor)
    if nan or inf:
        what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if s)
        raise SlicekitError(f"{where} contains {what} value(s) of {tensor.numel()}")


def check_finite_model(model: nn.Module, source: str = "the model") -> None:
    """Refuse a model with a NaN/inf weight, naming the first such parameter (or persistent
    buffer): compressing or evaluating it would silently give a NaN model or a NaN perplexity."""
    seen: set[int] = set()
    named = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] not in _non_persistent(model, n)
    ]
    for name, t in named:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        try:
            check_finite(t, f"parameter {name}")
        except SlicekitError as err:
            raise SlicekitError(
                f"{source} has non-finite weights: {err}; the file is corrupt or the model "
                "diverged — use another checkpoint"
            ) from None


def _non_persistent(model: nn.Module, buffer_name: str) -> set[str]:
    parent, _, _ = buffer_name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return set(getattr(module, "_non_persistent_buffers_set", ()))


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


class FiniteGuard:
    """Forward hooks that stop a run at the first module whose output is NaN/inf, naming it.

    Hooked: the input embeddings, the children of every ``nn.ModuleList`` (the decoder layers)
    and their direct children (attention, MLP, norms) — a few cheap checks per layer and batch
    (a float32 sum, which is non-finite whenever an element is; an exact element-wise check
    confirms before raising, so a finite tensor whose sum merely overflows passes).  Usage::

        with FiniteGuard(model, during="calibration"):
            ...   # any forward passes, e.g. CalibrationEngine.run
    """

    def __init__(self, model: nn.Module, during: str = "calibration", dtype_hint: bool = True) -> None:
        self.model = model
        self.during = during
        self.dtype_hint = dtype_hint
        self._handles: list[Any] = []

    def _targets(self) -> Iterator[tuple[str, nn.Module]]:
        seen: set[int] = set()
        emb = getattr(self.model, "get_input_embeddings", lambda: None)()
        names = {id(m): n for n, m in self.model.named_modules()}
        if emb is not None and id(emb) in names:
            seen.add(id(emb))
            yield names[id(emb)], emb
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList):
                for i, layer in enumerate(module):
                    prefix = f"{name}.{i}" if name else str(i)
                    # the layer's own parts too: methods may run half a layer (attention or MLP)
                    # through ``LayerStep.forward(call=…)`` without calling the layer itself
                    for sub, child in [("", layer), *layer.named_children()]:
                        if id(child) not in seen and not isinstance(child, nn.ModuleList):
                            seen.add(id(child))
                            yield f"{prefix}.{sub}" if sub else prefix, child

    def _hook(self, name: str):
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None or not t.is_floating_point():
                return
            with torch.no_grad():
                if bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all()):
                    return
            hint = (
                f"; the activations overflow {_dtype_name(t.dtype)}: try --dtype float32"
                if self.dtype_hint and t.dtype in (torch.float16, torch.bfloat16)
                else "; the model's weights are out of range or broken (check the checkpoint)"
            )
            raise SlicekitError(
                f"activations became non-finite (NaN/inf) at the output of {name} "
                f"({type(module).__name__}) during {self.during}{hint}"
            )

        return hook

    def __enter__(self) -> FiniteGuard:
        for name, module in self._targets():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# -------------------------------------------------------------------------------------------- text sources


def check_text_source(
    name_or_path: str, split: str | None, purpose: str, option: str = "--cal-dataset"
) -> None:
    """Refuse, without reading it, a dataset that cannot serve ``purpose`` ("calibration" or
    "eval"): an unknown name, a missing file, an evaluation split used for calibration, a
    dataset without an evaluation split.  Mirrors :func:`slicekit.data.load_text`, which gives
    the same refusals later; this one runs before the model is loaded."""
    from slicekit.data import DATASETS

    spec = DATASETS.get(name_or_path)
    if spec is not None:
        if purpose == "calibration" and split in spec.eval_splits and spec.name != "brown":
            raise SlicekitError(
                f"refusing to calibrate on {spec.name} split {split!r}: it is an evaluation split; "
                f"use one of {', '.join(spec.calibration_splits)}"
            )
        if purpose == "eval" and split is None and not spec.eval_splits:
            raise SlicekitError(f"{spec.name} has no evaluation split; give --split explicitly")
        return
    if os.path.exists(name_or_path):
        return
    if os.sep in name_or_path or name_or_path.endswith((".txt", ".jsonl", ".json", ".raw")):
        raise SlicekitError(f"{option}: dataset file not found: {name_or_path}")
    raise SlicekitError(
        f"{option}: unknown dataset {name_or_path!r}: use one of {', '.join(sorted(DATASETS))} "
        "or a path to a text/JSONL file or directory"
    )


# ---------------------------------------------------------------------------------- the whole command line


#: window options whose default follows the model's context (``None`` on the command line)
WINDOW_DEFAULTS = {"seqlen": 2048, "cal_seqlen": 2048, "eval_seqlen": 2048}


def default_window(default: int, context: int | None) -> int:
    """A default window length that the model can take: ``default``, or its context if shorter."""
    return min(default, context) if context else default


def preflight(args: Any, cal: Any = None) -> dict[str, Any]:
    """Every check a parsed ``slicekit`` command line allows before a model is loaded.

    ``args``: the argparse namespace of ``info``/``eval``/``compress``/``recover``/``bench``; ``cal``: for
    ``compress``, the :class:`~slicekit.pipeline.CalibrationRequest` built from the options and
    the recipe.  Returns what it learnt (``context``, ``params``) for the caller's use.
    """
    command = getattr(args, "command", None)
    check_dtype_device(getattr(args, "dtype", None), getattr(args, "device", "cpu"))
    context = model_context_length(args.model)
    # window options left at their default (None) become 2048 tokens, or the context if shorter;
    # only a window the user asked for is refused for being too long
    for attr in WINDOW_DEFAULTS:
        if hasattr(args, attr) and getattr(args, attr) is None:
            setattr(args, attr, default_window(WINDOW_DEFAULTS[attr], context))
    found: dict[str, Any] = {"context": context, "params": None}
    model = args.model
    if command == "info" and getattr(args, "layer_scores", False):
        check_text_source(args.cal_dataset, None, "calibration")
        check_positive_int("--cal-nsamples", args.cal_nsamples)
        check_int("--cal-seqlen", args.cal_seqlen, minimum=2)
        check_window(args.cal_seqlen, context, name="--cal-seqlen", model=model)
    elif command == "eval" and getattr(args, "tasks", None):  # zero-shot tasks: no perplexity windows
        check_positive_int("--batch-size", args.batch_size)
        check_optional_positive_int("--limit", getattr(args, "limit", None))
        check_int("--num-fewshot", getattr(args, "num_fewshot", 0), minimum=0)
    elif command == "eval":
        check_text_source(args.dataset, args.split, "eval", option="--dataset")
        check_int("--seqlen", args.seqlen, minimum=2)
        check_window(args.seqlen, context, name="--seqlen", model=model)
        check_optional_positive_int("--max-windows", args.max_windows)
        check_positive_int("--batch-size", args.batch_size)
    elif command in ("compress", "recover"):
        if cal is not None:
            check_text_source(cal.dataset, cal.split, "calibration")
            check_positive_int("--cal-nsamples", cal.nsamples)
            check_int("--cal-seqlen", cal.seqlen, minimum=2)
            check_window(cal.seqlen, context, name="--cal-seqlen", model=model)
            check_positive_int("--cal-batch-size", cal.batch_size)
            check_int("--seed", cal.seed, minimum=0)
        if getattr(args, "eval", False):
            check_text_source(args.eval_dataset, None, "eval", option="--eval-dataset")
            check_int("--eval-seqlen", args.eval_seqlen, minimum=2)
            check_window(args.eval_seqlen, context, name="--eval-seqlen", model=model)
            check_optional_positive_int("--eval-max-windows", args.eval_max_windows)
            check_positive_int("--eval-batch-size", getattr(args, "eval_batch_size", 1))
        if getattr(args, "out", None):
            check_output_dir(args.out)
            params = model_parameter_count(args.model)
            found["params"] = params
            if params:
                check_disk_space(args.out, estimated_output_bytes(params, getattr(args, "dtype", None)))
    elif command == "bench":
        check_positive_int("--repeats", args.repeats)
        check_positive_int("--prompt-len", args.prompt_len)
        check_int("--new-tokens", args.new_tokens, minimum=2, hint="decode speed needs at least 2 new tokens")
        check_optional_positive_int("--threads", args.threads)
        total = args.prompt_len + args.new_tokens
        for spec in [args.model] + ([args.baseline] if getattr(args, "baseline", None) else []):
            ctx = context if spec == args.model else model_context_length(spec)
            if ctx is not None and total > ctx:
                raise SlicekitError(
                    f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = {total} is "
                    f"longer than the context of {spec} ({ctx} tokens); lower them"
                )
    return found
