"""What a compression will cost, predicted before any weight is read (``compress --dry-run``).

The model is built on the meta device from its config alone, so its tensors' sizes are exact;
the prediction adds up what the code path holds at its peak, term by term (each term is printed,
so a wrong one can be found):

* ``base``: the process as it is when the prediction is made, after the imports a run needs;
* ``weights``: in memory, every tensor in the working dtype, plus the memory-mapped GGUF file
  where one is dequantised; a safetensors
  checkpoint is memory-mapped, and a method that rewrites the layers but keeps some tensors of
  every shard (the norms) leaves the shards' pages resident beside the rewritten layers
  (``mapped shards``: reclaimable file pages, but RSS counts them); streamed
  (:mod:`slicekit.streaming`), the modules outside the decoder layers plus two copies of the
  largest layer (the one being compressed and the tensors being written), never the whole;
* ``head copy``: rotating methods untie a tied head (a second vocabulary × hidden matrix);
* ``activations``: the calibration stream — the layer inputs, the kept outputs and the next
  layer's inputs coexist (three copies of tokens × hidden), plus one batch's forward temporaries
  (MLP intermediates, attention scores);
* ``method``: float64 Gram matrices and eigendecompositions of the widest interface the method
  factorises, and a float64 copy of the largest matrix it rewrites.

The time is an order of magnitude only: floating-point work (forward passes over the calibration
tokens, the decompositions, the rewrites) over this machine's measured matmul throughput.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slicekit.errors import SlicekitError


@dataclass
class Prediction:
    host_peak: int
    device_peak: int
    seconds: float
    mode: str  # "in memory" or "streamed"
    terms: dict[str, int] = field(default_factory=dict)
    device_terms: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        mib = 2**20
        return {"mode": self.mode, "host_peak_mib": self.host_peak / mib, "device_peak_mib": self.device_peak / mib,
                "seconds": self.seconds, "host_terms_mib": {k: v / mib for k, v in self.terms.items()},
                "device_terms_mib": {k: v / mib for k, v in self.device_terms.items()}}

    def describe(self) -> str:
        mib = 2**20
        lines = [f"predicted peak memory ({self.mode}): host {self.host_peak / mib:,.0f} MiB"
                 + (f", device {self.device_peak / mib:,.0f} MiB" if self.device_peak else ""),
                 "  " + ", ".join(f"{k} {v / mib:,.0f}" for k, v in self.terms.items()) + " (MiB)",
                 f"predicted time: ~{_human(self.seconds)} (order of magnitude: FLOPs over this machine's matmul speed)"]
        return "\n".join(lines)


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _config_of(model_spec: str):
    from transformers import AutoConfig

    from slicekit.models import cached_source, resolve_model

    src = resolve_model(model_spec)
    if src.kind in ("slicekit", "packed"):
        raise SlicekitError("--dry-run predicts the compression of an original model, not of a compressed one")
    src = cached_source(src)  # the run loads a converted GGUF's cached copy like any model directory
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(src.path, **kwargs), src
    except (OSError, ValueError) as err:
        raise SlicekitError(f"cannot read the config of {model_spec!r}: {str(err).splitlines()[0]}") from err


def _tokenizer_and_imports(src: Any, method: str) -> None:
    """Load what a run loads before its weights (the tokenizer, the method's code), so that the
    measured base includes them; failures are the real run's to report."""
    import contextlib

    from transformers import AutoTokenizer

    import slicekit.pipeline  # noqa: F401 - the run imports it
    from slicekit.methods import get_method

    get_method(method)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    with contextlib.suppress(Exception):
        _tokenizer_and_imports.keep = AutoTokenizer.from_pretrained(src.path, **kwargs)  # type: ignore[attr-defined]


def _planned(entry: Any, model: Any, config: Any):
    """The plan the run will apply, made on the meta-device model (a scored schedule is planned
    as constant: the scores need the weights); None for a method that must learn before it can
    plan (its plan depends on training)."""
    import dataclasses

    from slicekit.pipeline import check_supported, plan_compression
    from slicekit.schedules import needs_scores

    check_supported(entry, model, config)  # the run's refusal, before any weight is read
    if entry.learn is not None:
        return None
    if needs_scores(config.schedule):
        config = dataclasses.replace(config, schedule="constant")
    return plan_compression(entry, model, config).plan


def _matmul_flops() -> tuple[float, float]:
    """Measured float32 and float64 matmul throughput of this machine (FLOP/s), ~0.2 s."""
    out = []
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(384, 384, dtype=dtype)
        a @ a  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.08:
            a @ a
            n += 1
        out.append(2 * 384**3 * n / (time.perf_counter() - t0))
    return out[0], out[1]


def predict(model_spec: str, method: str, config: Any, nsamples: int, seqlen: int, batch_size: int,
            dtype: torch.dtype = torch.float32, device: str = "cpu", stream: bool = False) -> Prediction:
    """Peak host (and device) memory and time of ``compress`` with these settings; no weight is read."""
    from transformers import AutoModelForCausalLM

    from slicekit.arch import attention_info, get_arch, mlp_width, text_config
    from slicekit.methods import get_method
    from slicekit.modeling_slicekit import params_on_meta
    from slicekit.profiling import current_rss

    cfg, src = _config_of(model_spec)
    spec = get_arch(cfg)
    entry = get_method(method)
    _tokenizer_and_imports(src, method)  # part of the base: a run holds them too
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(cfg)
    s = torch.empty(0, dtype=dtype).element_size()
    layers = spec.layer_list(model)
    layer_numels = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    outer = total - sum(layer_numels)
    biggest_layer = max(layer_numels)
    hidden = cfg.hidden_size
    text = text_config(cfg)
    inter = mlp_width(cfg)
    heads = attention_info(cfg).num_heads
    vocab = int(text.vocab_size)
    tied = bool(text.tie_word_embeddings)
    biggest_matrix = max(p.numel() for p in layers[0].parameters())
    # what the run will do, read off the plan it will apply (made here on the meta model, no weights):
    # a rewritten residual stream (embedding resized) rewrites the vocabulary tables, a resized MLP
    # means Gram matrices over the MLP width, an untied head is a second table
    plan = _planned(entry, model, config)
    rotating = plan is not None and plan.modules[spec.token_embedding]["embedding_dim"] != hidden
    mlp_changed = plan is None or min(plan.mlp_widths()) < inter
    untied = plan is not None and tied and not bool(getattr(plan.config, "tie_word_embeddings", False))
    if plan is not None:
        from slicekit.shape import count_plan

        kept = count_plan(plan).decoder / max(1, sum(layer_numels))
    else:
        kept = 1.0 - float(getattr(config, "target_params", None) or 0.0)

    terms: dict[str, int] = {"base": current_rss()}
    on_device = device != "cpu"
    weights = (outer + 2 * biggest_layer) * s if stream else total * s
    if src.gguf_file and not stream:
        # transformers dequantises tensor by tensor into the model; the file itself is memory-mapped
        weights = total * s + os.path.getsize(os.path.join(src.path, src.gguf_file))
    elif not stream and not rotating:
        # transformers maps safetensors shards into memory: the file pages a calibration pass reads stay
        # resident (reclaimable, but counted in RSS) while any tensor of the shard lives — norms and
        # embeddings a pruning method keeps — beside the rewritten layers (the kept share of each)
        terms["mapped shards"] = int(sum(layer_numels) * s * kept)
    if not on_device or not stream:
        terms["weights"] = weights
    if untied:
        terms["head copy"] = vocab * hidden * s
    if rotating:  # the embedding (then the head) is rewritten into a new table while the old one lives
        terms["table rewrite"] = vocab * hidden * s
    tokens = nsamples * seqlen if entry.needs.calibration else 0
    act = 3 * tokens * hidden * 4
    per_batch = batch_size * seqlen * (3 * inter + 6 * hidden) * 4 + batch_size * heads * seqlen * seqlen * 4
    terms["activations"] = act + (per_batch if tokens else 0)
    widest = max(inter if mlp_changed else 0, hidden if rotating or not mlp_changed else 0)
    terms["method"] = 4 * widest * widest * 8 + 3 * biggest_matrix * 8
    experts = spec.block.experts
    if experts is not None and mlp_changed and entry.needs.calibration:
        # one float64 Gram per routed expert over its intermediate width (FASP's restoration)
        terms["method"] += int(getattr(cfg, experts.num_experts_key)) * inter * inter * 8
    device_terms: dict[str, int] = {}
    if on_device:
        device_terms = {"layer": 2 * biggest_layer * s, "batch": per_batch, "method": terms["method"]}
        if not stream:
            device_terms["weights"] = total * s
    host = sum(terms.values())
    f32, f64 = _matmul_flops()
    passes = 3 if tokens else 0
    work32 = passes * 2 * total * tokens + tokens * seqlen * hidden * 4 * len(layers) * passes
    work64 = len(layers) * (2 * 9 * widest**3 + 2 * 2 * biggest_layer * (hidden if rotating else widest))
    seconds = work32 / f32 + work64 / f64
    return Prediction(host, sum(device_terms.values()), seconds, "streamed" if stream else "in memory", terms,
                      device_terms)
