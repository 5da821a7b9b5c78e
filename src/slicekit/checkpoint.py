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

import copy
import errno
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from slicekit import modeling_slicekit as mk
from slicekit.errors import SlicekitError
from slicekit.modeling_slicekit import params_on_meta
from slicekit.shape import PLAIN_KINDS, Plan

MODELING_FILE = "modeling_slicekit.py"
DEFAULT_MAX_SHARD = "2GB"


def vanilla_config(model: nn.Module, plan: Plan) -> Any | None:
    """A config of the original architecture that builds exactly ``model``'s tensors, or None.

    Only plans that resize linears qualify (no replaced norms, no blocks, no attributes beyond
    head counts); candidate keys come from the architecture table (MLP width) and the head
    geometry (uniformly removed heads), and the candidate is verified by building it on the meta
    device and comparing every tensor shape.
    """
    from transformers import AutoModelForCausalLM

    from slicekit.arch import attention_info, get_arch, vanilla_config_overrides

    if plan.blocks or any(s["type"] not in PLAIN_KINDS for s in plan.modules.values()):
        return None
    spec = get_arch(model.config)
    overrides = vanilla_config_overrides(model.config, plan.mlp_widths())
    if overrides is None:
        return None
    cand = copy.deepcopy(model.config)
    for key, value in overrides.items():
        setattr(cand, key, value)
    if plan.attributes:  # whole heads removed: uniform counts become the config's
        info = attention_info(model.config)
        q_rows = {plan.linear(spec.layer_path(i, spec.block.attn_readers[0]))["out_features"]
                  for i in plan.layer_indices()}
        if len(q_rows) != 1 or spec.block.attn_q is None:
            return None
        kept_heads = q_rows.pop() // info.head_dim
        kept_kv = kept_heads // info.group_size
        cand.num_attention_heads, cand.num_key_value_heads, cand.head_dim = kept_heads, kept_kv, info.head_dim
    cand.__dict__.pop("quantization_config", None)
    try:
        with params_on_meta():
            built = AutoModelForCausalLM.from_config(cand)
    except (ValueError, TypeError, AttributeError, RuntimeError):  # the family's config cannot say it
        return None
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    have = {n: tuple(p.shape) for n, p in built.named_parameters()}
    return cand if want == have else None


def cast_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in the save dtype: floating-point tensors only (index buffers keep their integers)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _write_weights(tensors: dict[str, torch.Tensor], directory: str, max_shard_size: str | int,
                   dtype: torch.dtype | None = None) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    cpu = {k: cast_tensor(v.detach().cpu(), dtype).contiguous() for k, v in tensors.items()}
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
        lines += [f"- Original model: `{_public_name(info['base_model'])}`"]
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
    if info.get("weights_bytes"):
        orig = info.get("original_weights_bytes")
        lines += ["", "## Size on disk", "", f"- Weights: {info['weights_bytes'] / 2**20:,.1f} MiB"
                  + (f" ({info.get('save_dtype')})" if info.get("save_dtype") else "")]
        if orig:
            lines += [f"- Original model's weights: {orig / 2**20:,.1f} MiB"]
    ppl = info.get("perplexity")
    if ppl:
        lines += ["", "## Perplexity", "", *_perplexity_table(ppl)]
    lines += _recovery_lines(info.get("recovery"))
    recipe = info.get("recipe")
    if recipe:
        lines += ["", "## Reproduce", "", "The settings of this run are in `recipe.json`:", "", "```bash",
                  f"slicekit compress --model {_public_name(info.get('base_model', 'MODEL'))} --recipe recipe.json --out OUT",
                  "```", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```"]
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


def _recovery_lines(rec: dict[str, Any] | None) -> list[str]:
    """The card's recovery section: a recovered model's quality depends on what it was trained on
    and for how long as much as on the compression, so a reader needs the data, the budget and
    the numbers before and after (``RecoverReport.summary()``, plus ``perplexity`` rows from
    ``slicekit recover``)."""
    if not rec:
        return []
    mode = {"full": "full fine-tuning", "lora": "LoRA, merged back"}.get(rec.get("mode"), rec.get("mode", "?"))
    if rec.get("train_embeddings"):
        mode += " (token embeddings and a head tied to them trained too)"
    lines = ["", "## Recovery", "", f"- Data: {rec.get('data', '?')}",
             f"- Training: {mode}; loss {rec.get('loss', '?')}"
             + (f" (teacher: {rec['teacher']})" if rec.get("teacher") else "")]
    if rec.get("tokens") is not None:
        budget = (f"- Budget: {rec['tokens']:,} tokens in {rec.get('steps', '?')} optimizer steps"
                  f" (sequences of {rec.get('seqlen', '?')}), lr {rec.get('lr', '?')}, seed {rec.get('seed', '?')}")
        if rec.get("train_seconds") is not None:
            budget += (f"; {rec['train_seconds'] / 60:.1f} min of training at {rec.get('tokens_per_s', '?')} "
                       f"tokens/s ({rec.get('precision', '?')})")
        if rec.get("sample_seconds"):
            budget += f", plus {rec['sample_seconds'] / 60:.1f} min sampling the text from the teacher"
        lines.append(budget)
    if rec.get("first_loss") is not None and rec.get("last_loss") is not None:
        lines.append(f"- Training loss: {rec['first_loss']:.4f} at the first step, {rec['last_loss']:.4f} at the last")
    if rec.get("interrupted"):
        lines.append("- **The run was interrupted before its budget was spent.**")
    rows = rec.get("perplexity") or []
    if rows:
        lines += ["", *_perplexity_table(rows)]
    return lines


def _perplexity_table(rows: list[dict[str, Any]]) -> list[str]:
    """Perplexity rows (``PerplexityResult.as_dict()`` plus ``model``) as one markdown table, the
    same in the card's perplexity and recovery sections."""
    return ["| model | dataset | seqlen | windows | ppl |", "|---|---|---:|---:|---:|",
            *(f"| {r['model']} | {r['dataset']} | {r['seqlen']} | {r['windows']} | {r['ppl']:.3f} |" for r in rows)]


def _public_name(name: Any) -> Any:
    """What a model card may say about a local path: its last component, never the machine's path."""
    if isinstance(name, str) and (os.path.isabs(name) or os.sep in name) and os.path.exists(name):
        return os.path.basename(os.path.normpath(name))
    return name


def _scrub(obj: Any) -> Any:
    """Replace absolute local paths anywhere in a JSON-able object by their last component."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str) and "/" in obj:
        import re

        # any absolute path inside the text keeps only its last component
        return re.sub(r"(?<![\w.~])/(?:[^\s/'\"]+/)+([^\s/'\"]+)", r"\1", obj)
    return obj


def save(model: nn.Module, tokenizer: Any, directory: str, *, info: dict[str, Any] | None = None,
         max_shard_size: str | int = DEFAULT_MAX_SHARD, allow_vanilla: bool = True,
         extra_files: dict[str, bytes] | None = None, dtype: torch.dtype | None = None) -> str:
    """Write ``model`` to ``directory`` atomically; returns the format written ("slicekit"/"vanilla").

    The shape is the one the pipeline recorded on the model (``model.slicekit``), or the model's
    description.  ``info`` feeds the model card and is stored in ``config.json`` under
    ``slicekit.info``; ``extra_files`` (name → bytes) are written alongside (plots, reports).
    ``dtype``: write floating-point weights in this dtype (e.g. bfloat16 halves a float32 model's
    files; the config records it), without changing ``model``.  The model card states the weight
    bytes written next to ``info["original_weights_bytes"]`` when given.
    Nothing written names a local absolute path.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise SlicekitError(f"cannot create the output's parent directory {parent}: {err.strerror}") from err
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SlicekitError(f"output path {directory} exists and is not a directory")
    if not os.access(parent, os.W_OK):
        raise SlicekitError(f"cannot write to {parent}: permission denied")
    from slicekit.streaming import source_of

    stream = source_of(model)  # a streamed model's layers are already written, shard by shard
    meta = dict(getattr(model, "slicekit", None) or {})
    plan = Plan.from_shape(model.config, meta["shape"]) if "shape" in meta else Plan.of(model)
    info = _scrub(_jsonable({**meta.get("info", {}), **(info or {})}))
    _remove_stale(directory)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
        vanilla = vanilla_config(model, plan) if allow_vanilla else None
        fmt = "vanilla" if vanilla is not None else "slicekit"
        info["format"] = fmt
        if vanilla is not None:
            vanilla.use_cache = True
            vanilla.architectures = [type(model).__name__]
            if dtype is not None:
                vanilla.dtype = dtype
            vanilla.save_pretrained(tmp)
            if stream is not None:
                stream.write_weights(model, tmp)
            else:
                _write_weights({n: p.detach() for n, p in model.named_parameters()}, tmp, max_shard_size, dtype)
        else:
            mk.attach(model, {**meta, "shape": plan.shape(), "info": info})
            if stream is not None:
                stream.write_weights(model, tmp)
            else:
                _write_weights(mk.checkpoint_tensors(model), tmp, max_shard_size, dtype)
            mk.write_slicekit_files(model, tmp)
            if dtype is not None:
                _set_config_dtype(tmp, dtype)
        from slicekit.models import directory_weight_bytes

        info["weights_bytes"] = directory_weight_bytes(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(model_card(info))
        for name, data in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
        _swap_into_place(tmp, directory)
        if stream is not None:
            stream.cleanup()  # only once the output is in place
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise SlicekitError(f"no space left on the device while writing {directory}; nothing was changed") from err
        raise SlicekitError(f"cannot write {directory}: {err.strerror or err}; nothing was changed") from err
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if type(err).__name__ == "SafetensorError":  # safetensors wraps the write's OSError
            from slicekit.validate import write_error_reason

            raise SlicekitError(f"cannot write {directory}: {write_error_reason(err)}; nothing was changed") from err
        raise
    return fmt


def _set_config_dtype(directory: str, dtype: torch.dtype) -> None:
    """Record the save dtype in a slicekit ``config.json`` (its base config is what loaders read)."""
    path = os.path.join(directory, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if isinstance(cfg.get("base_config"), dict):
        cfg["base_config"]["dtype"] = name
    with open(path, "w") as fh:
        json.dump(cfg, fh, indent=2)


def _save_tokenizer(tokenizer: Any, directory: str) -> None:
    """Save the tokenizer so that plain ``AutoTokenizer.from_pretrained(DIR)`` needs no remote
    code: ``tokenizer_config.json`` names the tokenizer class, so transformers never reads our
    ``config.json`` (whose model type it does not know) to guess it."""
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as fh:
            cfg = json.load(fh)
        cfg.setdefault("tokenizer_class", type(tokenizer).__name__)
        cfg.pop("auto_map", None)
        with open(path, "w") as fh:
            json.dump(cfg, fh, indent=2)


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
    """Load a saved directory, or a file written by ``slicekit pack``, without remote code:
    ``(model, tokenizer)``.

    A packed file is decoded into a temporary directory and loaded from there
    (:func:`slicekit.bitsback.load_packed`); a damaged one raises :class:`SlicekitError` saying
    whether it is truncated or corrupt.  Any other file is not a checkpoint, so it gets the
    packed-file reader's "not a packed slicekit model" error rather than "no such directory".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(directory):
        from slicekit.bitsback import load_packed

        return load_packed(directory, dtype=dtype, device=device)
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
        if "slicekit" in raw and "base_config" in raw:
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
