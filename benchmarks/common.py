"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, shared machine")


def today() -> str:
    return datetime.date.today().isoformat()


def write_result(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc.setdefault("date", today())
    doc.setdefault("machine", machine())
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    return path


def slicegpt_decoder_params(model, width: int, slice_head: bool = False) -> int:
    """Real decoder parameter count of a constant-width SliceGPT model, from the adapter table:
    readers keep ``width`` input columns, writers ``width`` output rows, each sequential layer gets
    ``width × width`` shortcuts (the last one ``width × D`` when the head stays full width),
    norms lose their weights; biases are counted where the original linear has one."""
    from slicekit.arch import get_arch, linear_weight

    spec = get_arch(model.config)
    b = spec.block
    hidden = model.config.hidden_size
    layers = spec.layer_list(model)
    total = 0
    for i, layer in enumerate(layers):
        d_in = width
        d_out = width if (i + 1 < len(layers) or slice_head or spec.head_width_is_embedding_width) else hidden
        counted = set()
        mid = width
        for name in b.attn_readers + b.mlp_readers:
            lin = layer.get_submodule(name)
            out_f = linear_weight(lin).shape[0]
            total += out_f * width + (out_f if lin.bias is not None else 0)
            counted.add(name)
        for name, rows in ((b.attn_writer, d_out if b.parallel else mid), (b.mlp_writer, d_out)):
            lin = layer.get_submodule(name)
            in_f = linear_weight(lin).shape[1]
            total += rows * in_f + (rows if lin.bias is not None else 0)
            counted.add(name)
        total += d_in * d_out if b.parallel else d_in * mid + mid * d_out
        norms = {b.attn_norm, b.mlp_norm} - {None}
        for pname, p in layer.named_parameters():
            mod = pname.rsplit(".", 1)[0]
            if mod not in counted and mod not in norms:
                total += p.numel()
    return total


def slicegpt_sparsity_for_decoder_share(model, share: float, round_to: int = 8) -> tuple[float, int, float]:
    """The SliceGPT sparsity (a width multiple of ``round_to``) whose real decoder parameter count
    removes the share closest to ``share``; returns (sparsity, width, achieved share)."""
    from slicekit.models import count_parameters

    hidden = model.config.hidden_size
    dense = count_parameters(model)["decoder"]
    best = None
    for width in range(hidden, 0, -round_to):
        got = 1 - slicegpt_decoder_params(model, width) / dense
        if best is None or abs(got - share) < abs(best[2] - share):
            best = ((hidden - width) / hidden, width, got)
    return best


def method_config(method: str, model, share: float):
    """The config that removes ``share`` of the decoder parameters with ``method``.

    SliceGPT's knob is the width fraction, so the width whose real decoder count (shortcuts
    included) is closest to the target is searched; the other methods take the share directly.
    """
    from slicekit.methods import get_method

    entry = get_method(method)
    if method == "slicegpt":
        sparsity, _, _ = slicegpt_sparsity_for_decoder_share(model, share)
        return entry.config_cls(sparsity=sparsity)
    import dataclasses

    names = {f.name for f in dataclasses.fields(entry.config_cls)}
    for key in ("decoder_share", "target_share", "target", "share", "sparsity"):
        if key in names:
            return entry.config_cls(**{key: share})
    raise ValueError(f"do not know how to ask {method} for a decoder share (fields: {sorted(names)})")
