"""The programmatic workflow the CLI, the demo and the benchmarks share — the same for every method.

``compress(model, tokenizer, method, config, CalibrationRequest)``:

1. checks that the method can compress this architecture (before any work);
2. draws calibration text only if the method or its schedule needs it;
3. scores the layers if the schedule needs it (:mod:`slicekit.scores`), and runs the method's
   ``learn`` step if it has one (what its plan depends on, e.g. DISP-LLM's masks);
4. turns the schedule into per-layer fractions and, if ``config.target_params`` is set, scales
   their mean until the **plan** removes that share of decoder parameters, counted by the one
   counter (:func:`slicekit.shape.count_plan`) — no surgery is done to find it;
5. lets the method apply the plan, then checks that the model is exactly the plan;
6. records the shape on the model (so ``save_pretrained`` writes a slicekit checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slicekit.arch import get_arch
from slicekit.data import load_text, sample_calibration
from slicekit.errors import SlicekitError
from slicekit.methods import MethodContext, MethodSpec, config_to_dict, get_method
from slicekit.profiling import Measurement, limit_heap_retention, measure, release_memory
from slicekit.schedules import is_schedule_file, needs_scores, resolve_schedule
from slicekit.shape import ParamCounts, Plan, count_plan


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
    plan: Plan
    summary: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "settings": self.settings, "calibration": self.calibration,
                "params": {"original": self.params_original, "compressed": self.params_compressed},
                "compression": self.measurement.as_dict(), "summary": self.summary, **self.extra}


def calibration_batches(tokenizer, req: CalibrationRequest) -> tuple[list[torch.Tensor], str]:
    source = load_text(req.dataset, req.split, purpose="calibration")
    cal = sample_calibration(tokenizer, source, req.nsamples, req.seqlen, req.seed, req.strategy)
    return cal.batches(req.batch_size), cal.description


def n_layers_of(model: nn.Module) -> int:
    return len(get_arch(model.config).layer_list(model))


def check_supported(entry: MethodSpec, model: nn.Module, config: Any) -> None:
    """Refuse early, naming what is supported, when the method cannot compress this model."""
    from slicekit.arch import get_arch, supported_model_types

    try:
        get_arch(model.config)
    except ValueError as err:
        raise SlicekitError(f"{err}. Compression needs an adapter; `info`, `eval` and `bench` work on any "
                            f"causal LM. Methods: {', '.join(sorted(_methods()))}; model types: "
                            f"{', '.join(supported_model_types())}") from err
    reason = entry.unsupported(model, config) if entry.unsupported else None
    if reason:
        raise SlicekitError(f"{entry.name} cannot compress this model: {reason}")


def _methods() -> list[str]:
    from slicekit.methods import available_methods

    return available_methods()


def needs_text(entry: MethodSpec, config: Any) -> bool:
    return entry.needs.calibration or needs_scores(config.schedule)


def schedule_fractions(entry: MethodSpec, model: nn.Module, config: Any, scores: Any) -> Callable[[float], list[float]]:
    """``mean -> per-layer fractions`` of the config's schedule."""
    n = n_layers_of(model)
    extra = entry.schedule_kwargs(model, config) if entry.schedule_kwargs else {}
    cap = config.max_layer_sparsity

    def fractions(mean: float) -> list[float]:
        return resolve_schedule(config.schedule, mean, n, scores=scores, slice_base=config.slice_base,
                                epsilon=config.epsilon, cap=cap, **extra)

    return fractions


def solve_target(make_plan: Callable[[float], Plan], target_decoder: int, upper: float) -> float:
    """The schedule mean in ``[0, upper)`` whose plan's decoder count is closest to
    ``target_decoder`` (counts fall as the mean rises; bisection on the plan, no surgery).
    A mean whose plan cannot be made (a width rounds to nothing) counts as too much removed."""
    def decoder(mean: float) -> int | None:
        try:
            return count_plan(make_plan(mean)).decoder
        except SlicekitError:
            return None

    lo, hi = 0.0, upper * (1 - 1e-9)
    at_lo = count_plan(make_plan(lo)).decoder  # an error here is the user's to see
    at_hi = decoder(hi)
    if at_hi is not None and at_hi > target_decoder:
        raise SlicekitError(f"the target cannot be met: even at the per-layer cap {upper} the plan keeps "
                            f"{at_hi:,} decoder parameters (target {target_decoder:,}); raise "
                            "max_layer_sparsity or lower target_params")
    best = (abs(at_lo - target_decoder), lo)
    if at_hi is not None:
        best = min(best, (abs(at_hi - target_decoder), hi))
    for _ in range(50):
        mid = (lo + hi) / 2
        d = decoder(mid)
        if d is not None:
            best = min(best, (abs(d - target_decoder), mid))
        if d is not None and d > target_decoder:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-7:
            break
    return best[1]


@dataclass
class PlannedRun:
    """Everything decided before surgery."""

    plan: Plan
    fractions: list[float]
    mean: float
    original: ParamCounts
    predicted: ParamCounts


def plan_compression(entry: MethodSpec, model: nn.Module, config: Any, scores: Any = None,
                     learned: Any = None) -> PlannedRun:
    """The plan a run will apply, with its parameter counts — nothing in ``model`` changes.
    ``learned``: the method's ``learn`` result, for methods that have that step."""
    original = count_plan(Plan.of(model))
    fractions_of = schedule_fractions(entry, model, config, scores)

    def make_plan(mean: float) -> Plan:
        return entry.make_plan(model, config, fractions_of(mean), learned)

    if is_schedule_file(config.schedule):
        # explicit per-layer fractions: nothing to solve, and a target share would be ignored
        # silently by the bisection (the file does not scale) — the file is the request
        mean = sum(fractions_of(0.0)) / max(1, n_layers_of(model))
    elif config.target_params is not None:
        target = round((1.0 - config.target_params) * original.decoder)
        mean = solve_target(make_plan, target, config.max_layer_sparsity)
    elif entry.default_mean is not None:
        mean = entry.default_mean(config)
    else:
        raise SlicekitError(f"{entry.name} needs target_params (the fraction of decoder parameters to remove)")
    fractions = fractions_of(mean)
    plan = entry.make_plan(model, config, fractions, learned)
    return PlannedRun(plan, fractions, mean, original, count_plan(plan))


def compress(model: nn.Module, tokenizer, method: str, config: Any, cal: CalibrationRequest | None = None,
             device: str | torch.device = "cpu", progress: bool = True,
             batches: list[torch.Tensor] | None = None, out_dir: str | None = None,
             restart: bool = False, offload_dir: str | None = None) -> CompressReport:
    """Compress ``model`` in place with a registered method; time and memory cover planning and
    the method itself (calibration sampling excluded, as in the reference's timing).

    A streamed model (:func:`slicekit.streaming.load_streamed`) writes each compressed layer to
    ``out_dir + ".partial"`` as it goes, resuming there if the same run was killed (``restart``
    discards such partial work); :func:`slicekit.checkpoint.save` to ``out_dir`` completes it.
    ``offload_dir``: keep the calibration activations there as memory-mapped files, not in RAM."""
    from slicekit.streaming import source_of

    entry = get_method(method)
    if not isinstance(config, entry.config_cls):
        raise SlicekitError(f"{method} takes a {entry.config_cls.__name__}, not a {type(config).__name__}")
    check_supported(entry, model, config)
    stream = source_of(model)
    if stream is not None:
        if entry.needs.scope != "layerwise" or entry.learn is not None or not entry.needs.calibration:
            raise SlicekitError(f"{method} needs the whole model at once and cannot stream layer by layer; "
                                "compress without --stream")
        if out_dir is None:
            raise SlicekitError("a streamed compression writes its layers as it goes: give the output directory")
    cal = cal or CalibrationRequest()
    description = "none (the method needs no calibration data)"
    if needs_text(entry, config):
        if batches is None:
            batches, description = calibration_batches(tokenizer, cal)
        else:
            description = "given batches"
    else:
        batches = None
    torch.manual_seed(cal.seed)
    limit_heap_retention()
    release_memory(collect=True)
    device = torch.device(device)
    with measure() as m:
        scores = None
        if needs_scores(config.schedule):
            from slicekit.scores import layer_scores

            scores = layer_scores(model, batches, device=device, progress=progress)
        learned = None
        if entry.learn is not None:
            with torch.enable_grad():
                learned = entry.learn(model, config, MethodContext(batches if entry.needs.calibration else None,
                                                                   device, progress, [], scores))
        run = plan_compression(entry, model, config, scores, learned)
        if stream is not None:
            from slicekit import __version__

            stream.prepare(out_dir, {"method": method, "settings": config_to_dict(config), "calibration": asdict(cal),
                                     "dtype": str(next(model.parameters()).dtype), "device": device.type,
                                     "slicekit": __version__, "batches": _digest(batches)},
                           run.plan.shape(), restart=restart)
        ctx = MethodContext(batches if entry.needs.calibration else None, device, progress, run.fractions, scores,
                            learned, offload_dir)
        from slicekit.validate import FiniteGuard

        # a NaN/inf activation stops the run naming the module, instead of a silently broken model
        with torch.set_grad_enabled(entry.needs.gradients), FiniteGuard(model, during=f"{method} calibration"):
            summary = entry.apply(model, run.plan, config, ctx)
    result = Plan.of(model, attributes=run.plan.attributes)
    wrong = run.plan.differences(result)
    if wrong:
        raise RuntimeError(f"{method} did not produce its plan: " + "; ".join(wrong[:5]))
    after = count_plan(result)
    if after != run.predicted:
        raise RuntimeError(f"{method}: counted {after} after surgery but planned {run.predicted}")
    summary = {"method": method, "schedule_mean": run.mean, "layer_fractions": run.fractions, **summary}
    if scores is not None:
        summary["layer_scores"] = scores.as_dict()
    settings = {**config_to_dict(config), "calibration": asdict(cal) if entry.needs.calibration else None}
    from slicekit.modeling_slicekit import attach

    attach(model, {"shape": run.plan.shape(), "info": {"method": method, "settings": settings}})
    if stream is not None:  # its layers are staged on disk: transformers' save_pretrained would copy meta tensors
        import types

        def _save_streamed(self: nn.Module, save_directory: str, *args: Any, **kwargs: Any) -> None:
            from slicekit.checkpoint import save

            save(self, None, str(save_directory))

        model.save_pretrained = types.MethodType(_save_streamed, model)
    return CompressReport(method, settings, description, run.original.as_dict(), after.as_dict(), m,
                          run.plan, summary)


def _digest(batches: list[torch.Tensor] | None) -> str:
    """SHA-256 of the calibration token ids: a streamed run resumes only with the same text."""
    import hashlib

    h = hashlib.sha256()
    for b in batches or []:
        t = b.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (for comparing before/after in one process)."""
    return copy.deepcopy(model)
