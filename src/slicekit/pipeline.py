"""The programmatic workflow the CLI, the demo and the benchmarks share.

``compress(model, tokenizer, CompressRequest)`` draws the calibration set, runs the method through
the calibration engine, measures time and memory, and returns everything a report or a model
card needs.  Nothing here knows a particular method.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slicekit.data import load_text, sample_calibration
from slicekit.methods import CompressionContext, CompressionResult, config_to_dict, get_method
from slicekit.models import count_parameters
from slicekit.profiling import Measurement, limit_heap_retention, measure, release_memory


@dataclass
class CalibrationRequest:
    dataset: str = "wikitext2"
    split: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    seed: int = 42
    strategy: str = "documents"


@dataclass
class CompressReport:
    method: str
    settings: dict[str, Any]
    calibration: str
    params_original: dict[str, int]
    params_compressed: dict[str, int]
    measurement: Measurement
    result: CompressionResult
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "settings": self.settings, "calibration": self.calibration,
                "params": {"original": self.params_original, "compressed": self.params_compressed},
                "compression": self.measurement.as_dict(), "summary": self.result.summary, **self.extra}


def calibration_batches(tokenizer, req: CalibrationRequest) -> tuple[list[torch.Tensor], str]:
    source = load_text(req.dataset, req.split, purpose="calibration")
    cal = sample_calibration(tokenizer, source, req.nsamples, req.seqlen, req.seed, req.strategy)
    return cal.batches(req.batch_size), cal.description


def compress(model: nn.Module, tokenizer, method: str, config: Any, cal: CalibrationRequest,
             device: str | torch.device = "cpu", progress: bool = True,
             batches: list[torch.Tensor] | None = None) -> CompressReport:
    """Compress ``model`` in place with a registered method; time and memory cover the method
    itself (calibration sampling excluded, as in the reference's timing)."""
    entry = get_method(method)
    before = count_parameters(model)
    description = "given batches"
    if batches is None:
        batches, description = calibration_batches(tokenizer, cal)
    ctx = CompressionContext(device=torch.device(device), batch_size=cal.batch_size, progress=progress)
    torch.manual_seed(cal.seed)
    limit_heap_retention()
    release_memory(collect=True)
    with measure() as m:
        result = entry.compress(model, batches, config, ctx)
    after = count_parameters(model)
    settings = {**config_to_dict(config), "calibration": asdict(cal)}
    return CompressReport(method, settings, description, before, after, m, result)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (for comparing before/after in one process)."""
    return copy.deepcopy(model)
