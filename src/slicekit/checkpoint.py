"""Saving compressed models as ordinary Hugging Face directories, atomically; loading them back.

Layout of a saved directory::

    config.json               model_type "slicekit", auto_map, base_config, slicekit.shape/summary
    model.safetensors         (or model-0000k-of-0000n.safetensors + index) — never pickle
    modeling_slicekit.py      the standalone loader (no slicekit import), registered via auto_map
    tokenizer files, generation_config.json, README.md (model card)

When the compressed shape fits the original architecture (e.g. uniform MLP-width pruning) a
*vanilla* config of the original ``model_type`` is written instead, with no custom code at all.

Atomicity: everything is written into a temporary sibling directory which is renamed into place
only when complete; an existing output is moved aside first and deleted last, so an interrupted
save leaves either the old directory or the new one, never a half-written one under the name.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from slicekit import modeling_slicekit as mk
from slicekit.errors import SlicekitError

MODELING_FILE = "modeling_slicekit.py"
DEFAULT_MAX_SHARD = "2GB"


def _base_config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_name_or_path", "auto_map"):
        if hasattr(cfg, attr):
            with contextlib.suppress(AttributeError):
                delattr(cfg, attr)
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d.pop("auto_map", None)
    d.pop("architectures", None)
    d["use_cache"] = True
    return d


def vanilla_config(model: nn.Module, shape: dict[str, Any]) -> Any | None:
    """A config of the original architecture that builds exactly ``model``'s tensors, or None.

    Only structure-preserving changes qualify (no replaced norms, no blocks, no attributes); the
    candidate is verified by building it on the meta device and comparing every tensor shape.
    """
    from transformers import AutoModelForCausalLM

    from slicekit.arch import get_arch, mlp_width

    kinds = {spec["type"] for spec in shape["modules"].values()}
    if kinds - {"linear", "conv1d", "embedding"} or shape.get("attributes"):
        return None
    spec = get_arch(model.config)
    downs = [layer.get_submodule(spec.block.mlp_down) for layer in spec.layer_list(model)]
    from slicekit.arch import linear_weight

    widths = {int(linear_weight(d).shape[1]) for d in downs}
    if len(widths) != 1:
        return None
    cand = copy.deepcopy(model.config)
    width = widths.pop()
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        if getattr(cand, key, None) is not None or (key == "n_inner" and cand.model_type == "gpt2"):
            setattr(cand, key, width)
            break
    if mlp_width(cand) != width:
        return None
    if hasattr(cand, "quantization_config"):
        delattr(cand, "quantization_config")
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(cand)
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    have = {n: tuple(p.shape) for n, p in built.named_parameters()}
    return cand if want == have else None


def _write_weights(tensors: dict[str, torch.Tensor], directory: str, max_shard_size: str | int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(cpu, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: cpu[n] for n in names}, os.path.join(directory, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in cpu.values())},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)


def model_card(info: dict[str, Any]) -> str:
    """A README.md that states what was done and what was measured (only what is given)."""
    lines = ["---", "library_name: transformers", "tags: [slicekit, structured-compression]", "---", "",
             f"# {info.get('title', 'slicekit compressed model')}", ""]
    lines.append(f"Compressed with [slicekit](https://pypi.org/project/slicekit/) using **{info.get('method', '?')}**.")
    lines.append("")
    if info.get("base_model"):
        lines += [f"- Original model: `{info['base_model']}`"]
    if info.get("settings"):
        lines += [f"- Settings: `{json.dumps(info['settings'], sort_keys=True)}`"]
    if info.get("calibration"):
        lines += [f"- Calibration data: {info['calibration']}"]
    if info.get("compression_seconds") is not None:
        lines += [f"- Compression time: {info['compression_seconds']:.1f} s"]
    params = info.get("params")
    if params:
        lines += ["", "## Real parameter counts", "", "| | original | compressed | ratio |", "|---|---:|---:|---:|"]
        for key in ("total", "non_embedding", "decoder"):
            o, c = params["original"][key], params["compressed"][key]
            lines.append(f"| {key} | {o:,} | {c:,} | {c / o:.3f} |")
    ppl = info.get("perplexity")
    if ppl:
        lines += ["", "## Perplexity", "", "| model | dataset | seqlen | windows | ppl |", "|---|---|---:|---:|---:|"]
        for row in ppl:
            lines.append(f"| {row['model']} | {row['dataset']} | {row['seqlen']} | {row['windows']} | {row['ppl']:.3f} |")
    widths = info.get("widths")
    if widths:
        lines += ["", "## Per-layer widths", "", "```", json.dumps(widths), "```"]
    lines += ["", "## Loading", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)"
              if info.get("format") == "slicekit" else "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
              "or, without remote code: `slicekit.load(PATH)`.", ""]
    return "\n".join(lines)


def save(model: nn.Module, tokenizer: Any, directory: str, *, shape: dict[str, Any] | None = None,
         info: dict[str, Any] | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD,
         allow_vanilla: bool = True, extra_files: dict[str, bytes] | None = None) -> str:
    """Write ``model`` to ``directory`` atomically; returns the format written ("slicekit"/"vanilla").

    ``shape`` defaults to the description of the model; ``info`` feeds the model card and is
    stored in ``config.json`` under ``slicekit.info``; ``extra_files`` (name → bytes) are written
    alongside (plots, JSON reports).
    """
    from slicekit.shape import describe

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SlicekitError(f"output path {directory} exists and is not a directory")
    shape = shape if shape is not None else describe(model)
    info = dict(info or {})
    _remove_stale(directory)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        vanilla = vanilla_config(model, shape) if allow_vanilla else None
        fmt = "vanilla" if vanilla is not None else "slicekit"
        info["format"] = fmt
        if vanilla is not None:
            vanilla.use_cache = True
            vanilla.architectures = [type(model).__name__]
            vanilla.save_pretrained(tmp)
            tensors = {n: p.detach() for n, p in model.named_parameters()}  # persistent state only
            _write_weights(tensors, tmp, max_shard_size)
        else:
            from transformers import __version__ as tf_version

            config = {
                "model_type": mk.SLICEKIT_MODEL_TYPE,
                "architectures": ["SlicekitForCausalLM"],
                "auto_map": {"AutoConfig": "modeling_slicekit.SlicekitConfig",
                             "AutoModelForCausalLM": "modeling_slicekit.SlicekitForCausalLM"},
                "base_config": _base_config_dict(model),
                "slicekit": {"shape": shape, "info": _jsonable(info)},
                "transformers_version": tf_version,
            }
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(config, fh, indent=2)
            shutil.copyfile(mk.__file__, os.path.join(tmp, MODELING_FILE))
            _write_weights(mk.checkpoint_tensors(model), tmp, max_shard_size)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(model_card(info))
        for name, data in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        _swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fmt


def _remove_stale(directory: str, min_age_s: float = 3600.0) -> None:
    """Delete temporary siblings an interrupted save left behind (hidden, never complete-looking),
    once they are old enough not to belong to a save still running."""
    import glob
    import time

    base = os.path.basename(directory)
    olds = sorted(glob.glob(os.path.join(os.path.dirname(directory), f".{base}.old-*")), key=os.path.getmtime)
    if olds and not os.path.exists(directory):  # killed between the two renames: restore the old output
        os.rename(olds.pop(), directory)
    for path in glob.glob(os.path.join(os.path.dirname(directory), f".{base}.tmp-*")) + olds:
        try:
            if time.time() - os.path.getmtime(path) > min_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _swap_into_place(tmp: str, directory: str) -> None:
    old = None
    if os.path.exists(directory):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
        os.rmdir(old)
        os.rename(directory, old)
    os.rename(tmp, directory)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def load(directory: str, dtype: torch.dtype | str | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a saved directory without remote code: ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(directory):
        raise SlicekitError(f"no such checkpoint directory: {directory}")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise SlicekitError(f"{directory} has no config.json: not a saved model")
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise SlicekitError(f"{cfg_path} is corrupt: {err}") from err
    try:
        if raw.get("model_type") == mk.SLICEKIT_MODEL_TYPE:
            model = mk.load_compressed(directory, dtype=dtype, device=device)
        else:
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).to(device).eval()
    except mk.SlicekitShapeError as err:
        raise SlicekitError(str(err)) from err
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise SlicekitError(f"cannot load {directory}: {str(err).splitlines()[0]}") from err
    tokenizer = None
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it reads config.json, whose model_type it does not know
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise SlicekitError(f"cannot load the tokenizer saved in {directory}: {str(err).splitlines()[0]}") from err
        finally:
            hf_logging.set_verbosity(level)
    model.config.use_cache = True
    return model, tokenizer
