"""Inference speed of a model against its baseline, measured side by side with alternating runs.

The machine this runs on may be shared and noisy, so the two models are measured in turns
(model, baseline, model, baseline …) and the median of each is reported together with the ratio.
Prefill: one forward pass over ``batch × seqlen`` tokens (no cache).  Decode: ``generate`` with the
KV cache for ``n`` new tokens, minus a 1-token ``generate`` (the prefill of the prompt), divided by
the ``batch·(n−1)`` decoded tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from slicekit.profiling import measure

PREFILL_SHAPES = ((1, 2048), (8, 512))
DECODE_BATCHES = (1, 8)


@dataclass
class BenchSettings:
    repeats: int = 3
    prompt_len: int = 64
    new_tokens: int = 32
    prefill_shapes: tuple[tuple[int, int], ...] = PREFILL_SHAPES
    decode_batches: tuple[int, ...] = DECODE_BATCHES
    threads: int | None = None
    seed: int = 0


@dataclass
class SpeedResult:
    prefill_tps: dict[str, list[float]] = field(default_factory=dict)  # "BxT" -> tokens/s per repeat
    decode_tps: dict[str, list[float]] = field(default_factory=dict)  # "B" -> tokens/s per repeat
    peak_rss_mib: float = 0.0
    cuda_peak_mib: float = 0.0

    def medians(self) -> dict:
        return {"prefill_tokens_per_s": {k: statistics.median(v) for k, v in self.prefill_tps.items()},
                "decode_tokens_per_s": {k: statistics.median(v) for k, v in self.decode_tps.items()},
                "peak_rss_mib": self.peak_rss_mib, "cuda_peak_mib": self.cuda_peak_mib}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return ids.numel() / (time.perf_counter() - t0)


@torch.no_grad()
def _decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    device = ids.device
    pad = getattr(model.generation_config, "pad_token_id", None)
    # The prompts are unpadded: an all-ones mask says so (transformers cannot infer it when the
    # pad token is also the EOS token, and warns).
    kw = dict(do_sample=False, use_cache=True, pad_token_id=pad if pad is not None else 0,
              attention_mask=torch.ones_like(ids))
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    _sync(device)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    _sync(device)
    t2 = time.perf_counter()
    decode_time = max((t2 - t1) - (t1 - t0), 1e-9)
    return ids.shape[0] * (new_tokens - 1) / decode_time


def _one_round(model: nn.Module, vocab: int, settings: BenchSettings, result: SpeedResult, gen: torch.Generator) -> None:
    device = next(model.parameters()).device
    with measure() as m:
        for b, t in settings.prefill_shapes:
            ids = torch.randint(10, vocab, (b, t), generator=gen).to(device)
            result.prefill_tps.setdefault(f"{b}x{t}", []).append(_prefill(model, ids))
        for b in settings.decode_batches:
            ids = torch.randint(10, vocab, (b, settings.prompt_len), generator=gen).to(device)
            result.decode_tps.setdefault(str(b), []).append(_decode(model, ids, settings.new_tokens))
    result.peak_rss_mib = max(result.peak_rss_mib, m.rss_peak / 2**20)
    result.cuda_peak_mib = max(result.cuda_peak_mib, m.cuda_peak / 2**20)


def bench_models(models: dict[str, nn.Module], settings: BenchSettings | None = None) -> dict[str, SpeedResult]:
    """Measure several models in alternating rounds (after one untimed warm-up round each)."""
    settings = settings or BenchSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = {name: SpeedResult() for name in models}
    vocab = min(m.config.vocab_size for m in models.values())
    for model in models.values():  # warm-up: allocator, kernels, caches
        _one_round(model, vocab, BenchSettings(1, 8, 4, ((1, 64),), (1,)), SpeedResult(), torch.Generator().manual_seed(0))
    for r in range(settings.repeats):
        for name, model in models.items():
            _one_round(model, vocab, settings, results[name], torch.Generator().manual_seed(settings.seed + r))
    return results


def ratios(result: SpeedResult, baseline: SpeedResult) -> dict:
    a, b = result.medians(), baseline.medians()
    return {
        "prefill": {k: a["prefill_tokens_per_s"][k] / b["prefill_tokens_per_s"][k] for k in a["prefill_tokens_per_s"]},
        "decode": {k: a["decode_tokens_per_s"][k] / b["decode_tokens_per_s"][k] for k in a["decode_tokens_per_s"]},
    }


def linear_flops_per_token(model: nn.Module) -> int:
    """2 × (parameters of every matrix a token passes through: linears, shortcut matrices, head).

    Attention-score FLOPs (which grow with context and which no width-slicing method changes for
    the query/key head dims it keeps) are left out, so this is the FLOP ratio of the matrix work.
    """
    from transformers.pytorch_utils import Conv1D

    from slicekit.modeling_slicekit import ResidualBlock

    total = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            total += mod.weight.numel()
        elif isinstance(mod, ResidualBlock):
            for key in ("attn_shortcut", "mlp_shortcut"):
                p = getattr(mod, key)
                if p is not None:
                    total += p.numel()
    return 2 * total


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes the KV cache holds per token of context, measured: one token through the model with
    transformers' own cache, then the size of every tensor the cache keeps.  Methods that remove
    KV heads (FASP) or narrow heads (MoDeGPT, whose heads are stored padded to one size) show
    here as they really are in memory, not as an idealised count."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    was = model.training
    model.eval()
    import inspect

    # transformers renamed the argument (``past_key_values`` → ``cache``) within 5.x
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        model(input_ids=ids, use_cache=True, **{key: cache})
    finally:
        model.train(was)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
