"""DISP-LLM as a slicekit method: learn per-layer dimension subsets, then gather/scatter.

**What is pruned.**  Five *structures* per decoder layer (:data:`STRUCTURES`): the residual
dimensions the attention reads (columns of q/k/v), the ones it writes (rows and bias of the output
projection), the ones the MLP reads (columns of the up/gate linears), its intermediate neurons
(up rows ↔ down columns) and the residual dimensions it writes (down rows and bias).  Heads and the
residual width stay as they are; the pruned layer reads ``norm(x)[..., idx]`` and adds its output
with a scatter-add (the loader's ``residual_index`` form, :class:`slicekit.modeling_slicekit.SlicedLayer`).

**How.**  :func:`learn` (the pipeline's ``MethodSpec.learn`` step, before planning) trains
:class:`~slicekit.methods.disp.hypernet.HyperNetwork` on the calibration text with the model
frozen: the masks multiply the readers' inputs, the intermediate activations and the writers'
outputs through forward hooks (a masked model computes what the pruned one will), and the loss is
``CE + λ·|log(P/p)|`` with ``P`` the kept fraction of decoder parameters counted from the masks by
:class:`MaskCounter` — the one counter's count (:func:`slicekit.shape.count_plan`) with the five
structures' linears replaced by their masked sizes, equal to it for every hard mask.

**Plan.**  The learned scores (logits + offset, no noise) rank all dimensions of all structures;
a schedule mean ``m`` removes the lowest ``⌊m·N⌋`` of them (each structure keeps at least one), so
the pipeline's target solver meets ``target_params`` exactly on real counts; the learned hard masks
(score > 0) are where the bisection starts from and are reported next to it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slicekit.arch import ArchSpec, get_arch, linear_bias, linear_weight, set_linear
from slicekit.errors import SlicekitError
from slicekit.methods import MethodContext
from slicekit.methods.common import keep_mlp_neurons
from slicekit.methods.disp.config import DISPConfig
from slicekit.methods.disp.hypernet import HyperNetwork, gumbel_sigmoid_masks
from slicekit.modeling_slicekit import make_block
from slicekit.shape import Plan, block_spec, count_plan

#: the five structures of a decoder layer, in the hypernetwork's order
STRUCTURES = ("attn_read", "attn_write", "mlp_read", "mlp_mid", "mlp_write")
#: the structures that index the residual stream (the loader's block keys)
STREAM = ("attn_read", "attn_write", "mlp_read", "mlp_write")


def unsupported(model: nn.Module, config: Any = None) -> str | None:
    """Why DISP cannot prune this family (None: it can)."""
    spec = get_arch(model.config)
    b = spec.block
    if spec.mlp_fixed_reason:
        return spec.mlp_fixed_reason
    post = [n for n in (b.post_attn_norm, b.post_mlp_norm) if n is not None]
    if post:
        return (f"its attention/MLP outputs pass a norm ({', '.join(post)}) before the residual add, so a "
                "block cannot add a subset of output dimensions into the stream (the norm needs all of them)")
    if b.attn_norm is None:
        return "its decoder layer has no input norm, which the gather/scatter residual block reads after"
    return None


# ------------------------------------------------------------------------ sizes and counts

def structure_sizes(plan: Plan) -> list[int]:
    """Dimensions of every structure, layer-major (``STRUCTURES`` order)."""
    d = int(plan.config.hidden_size)
    out: list[int] = []
    for i in plan.layer_indices():
        out += [d, d, d, plan.mlp_width(i), d]
    return out


@dataclass(frozen=True)
class _Term:
    path: str
    in_key: str | None  # structure whose size is the linear's input width (None: fixed)
    out_key: str | None  # structure whose size is its output width
    in0: int
    out0: int
    bias: bool
    out_mult: int = 1  # fused up-projections stack this many copies of the intermediate


class MaskCounter:
    """Decoder parameters of the model the masks describe, from the one counter.

    ``count_plan(original).decoder`` minus the five structures' linears at their original size plus
    the same linears at the masked sizes (in × out, plus the bias where it follows the outputs).
    Works on integer sizes and on differentiable mask sums alike; for hard masks it equals
    ``count_plan(plan_from_keeps(...)).decoder`` (tested).
    """

    def __init__(self, plan: Plan) -> None:
        arch = plan.arch
        b = arch.block
        self.base = count_plan(plan).decoder
        self.layers: list[list[_Term]] = []
        for i in plan.layer_indices():
            terms = []

            def term(rel: str, in_key: str | None, out_key: str | None, mult: int = 1, i: int = i) -> _Term:
                path = arch.layer_path(i, rel)
                s = plan.modules[path]
                return _Term(path, in_key, out_key, s["in_features"], s["out_features"], bool(s.get("bias")),
                             mult)

            terms += [term(r, "attn_read", None) for r in b.attn_readers]
            terms.append(term(b.attn_writer, None, "attn_write"))
            terms += [term(u, "mlp_read", "mlp_mid", b.mlp_up_fused) for u in b.mlp_up]
            terms.append(term(b.mlp_down, "mlp_mid", "mlp_write"))
            self.layers.append(terms)
        self.original = sum(self._linear(t, t.in0, t.out0) for ts in self.layers for t in ts)

    @staticmethod
    def _linear(t: _Term, n_in: Any, n_out: Any) -> Any:
        return n_out * n_in + (n_out if t.bias else 0)

    def decoder(self, sizes: list[Any]) -> Any:
        """Decoder count for per-structure sizes (layer-major, ``STRUCTURES`` order)."""
        total: Any = self.base - self.original
        for li, terms in enumerate(self.layers):
            s = dict(zip(STRUCTURES, sizes[5 * li: 5 * li + 5], strict=True))
            for t in terms:
                n_in = s[t.in_key] if t.in_key else t.in0
                n_out = s[t.out_key] * t.out_mult if t.out_key else t.out0
                total = total + self._linear(t, n_in, n_out)
        return total


# ------------------------------------------------------------------------ masked forward

class MaskedModel:
    """Forward hooks that apply one mask per structure to the frozen model (training only).

    attention read: the input of every attention reader; attention write: the output projection's
    output (bias included, as the pruned rows drop it); MLP read: the inputs of the up linears; MLP
    intermediate: the input of the down linear (pruning neuron ``j`` removes exactly this
    contribution); MLP write: the down linear's output.  ``masks = None`` leaves the model as is.
    """

    def __init__(self, model: nn.Module) -> None:
        self.arch: ArchSpec = get_arch(model.config)
        self.masks: list[torch.Tensor] | None = None
        self._handles: list[Any] = []
        b = self.arch.block
        for li, layer in enumerate(self.arch.layer_list(model)):
            for r in b.attn_readers:
                self._pre(layer.get_submodule(r), 5 * li + 0)
            self._post(layer.get_submodule(b.attn_writer), 5 * li + 1)
            for u in b.mlp_up:
                self._pre(layer.get_submodule(u), 5 * li + 2)
            down = layer.get_submodule(b.mlp_down)
            self._pre(down, 5 * li + 3)
            self._post(down, 5 * li + 4)

    def _mask(self, k: int, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.masks is None else self.masks[k].to(like.dtype)

    def _pre(self, module: nn.Module, k: int) -> None:
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            m = self._mask(k, args[0])
            return None if m is None else (args[0] * m, *args[1:])
        self._handles.append(module.register_forward_pre_hook(hook))

    def _post(self, module: nn.Module, k: int) -> None:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m = self._mask(k, out)
            return None if m is None else out * m
        self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MaskedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@contextlib.contextmanager
def _checkpointed(layers: nn.ModuleList, enabled: bool) -> Iterator[None]:
    """Recompute every decoder layer in the backward pass (non-reentrant activation checkpointing).

    Done here rather than with ``gradient_checkpointing_enable`` because transformers only
    checkpoints in training mode, which would also switch dropout on in the frozen model."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        original = layer.forward

        def forward(*args: Any, _f: Any = original, **kwargs: Any) -> Any:
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


# ------------------------------------------------------------------------ learning

@dataclass
class DISPLearned:
    """What :func:`learn` hands the plan and the surgery: one score per dimension per structure."""

    scores: list[torch.Tensor]
    log: dict[str, Any] = field(default_factory=dict)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def noise_scale(step: int, steps: int, anneal: float) -> float:
    """Gumbel-noise scale at ``step`` of ``steps``: 1, then over the last ``round(anneal·steps)``
    steps a linear decline that reaches 0 on the final step (see ``DISPConfig.noise_anneal``)."""
    n = round(anneal * steps)
    if n <= 0:
        return 1.0
    return min(1.0, max(0.0, (steps - 1 - step) / n))


def learn(model: nn.Module, config: DISPConfig, ctx: MethodContext) -> DISPLearned:
    """Train the hypernetwork on the frozen model; return its noise-free scores."""
    if not ctx.calibration:
        raise SlicekitError("DISP trains on calibration text: give calibration batches")
    plan = Plan.of(model)
    sizes = structure_sizes(plan)
    counter = MaskCounter(plan)
    original = counter.base
    p = 1.0 - float(config.target_params)
    device = torch.device(ctx.device)
    home = next(model.parameters()).device
    batches = [b if config.train_seqlen is None else b[:, : config.train_seqlen] for b in ctx.calibration]
    per_step = [int(b.numel()) for b in batches]
    steps, seen = 0, 0
    while seen < config.train_tokens:
        seen += per_step[steps % len(batches)]
        steps += 1
    hn = HyperNetwork(sizes, hidden=config.hyper_hidden, seed=config.disp_seed).to(device)
    opt = torch.optim.AdamW(hn.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    noise = torch.Generator().manual_seed(config.disp_seed + 1)
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    was_training = model.training
    history: list[tuple[float, float, float]] = []
    t0 = time.perf_counter()
    model.to(device)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    try:
        with MaskedModel(model) as masked, _checkpointed(get_arch(model.config).layer_list(model),
                                                          config.gradient_checkpointing), torch.enable_grad():
            for step in range(steps):
                ids = batches[step % len(batches)].to(device)
                masks = gumbel_sigmoid_masks(hn(), config.offset, config.temperature, noise,
                                             noise_scale(step, steps, config.noise_anneal))
                masked.masks = masks
                ce = _lm_loss(model, ids)
                kept = counter.decoder([m.sum() for m in masks]) / original
                reg = config.lam * (torch.log(kept) - math.log(p)).abs()
                loss = ce + reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                masked.masks = None
                history.append((ce.item(), reg.item(), kept.item()))
                if ctx.progress and (step + 1) % max(1, steps // 10) == 0:
                    print(f"  DISP step {step + 1}/{steps}: ce {ce.item():.3f}  reg {reg.item():.3f}  "
                          f"kept {kept.item():.3f} (target {p:.3f})", file=sys.stderr)
    finally:
        for n, q in model.named_parameters():
            q.requires_grad_(flags[n])
        model.to(home)
        model.train(was_training)
    with torch.no_grad():
        scores = [(lg + config.offset).float().cpu() for lg in hn()]
    tail = history[-max(1, len(history) // 10):]
    log = {"steps": steps, "tokens": seen, "seconds": time.perf_counter() - t0,
           "hypernetwork_params": sum(q.numel() for q in hn.parameters()),
           "ce_first": history[0][0], "ce_last": sum(h[0] for h in tail) / len(tail),
           "kept_first": history[0][2], "kept_last": sum(h[2] for h in tail) / len(tail),
           "kept_final_step": history[-1][2], "noise_anneal": config.noise_anneal}
    return DISPLearned(scores, log)


# ------------------------------------------------------------------------ plan and surgery

def select(scores: list[torch.Tensor], remove: float | None, cap: float = 1.0,
           round_to: int = 1) -> list[torch.Tensor]:
    """Kept indices (sorted) of every structure: the learned hard masks (score > 0) when ``remove``
    is None, else all but the ``⌊remove·N⌋`` lowest scores of all structures together.  Every
    structure keeps at least its ``max(1, ⌈(1 − cap)·n⌉)`` best dimensions (``cap``: the config's
    ``max_layer_sparsity``; a block reading nothing is not a block).  ``round_to``: each
    structure's kept count is then rounded to the nearest multiple (ties up, never above its size
    ``n``, at least one multiple) by keeping its best-scoring dimensions — a matrix dimension that
    is not a multiple of 8 costs the CPU's float32 kernels about 20 % of their throughput
    (``benchmarks/alignment.py``).  Removing more never keeps more (rounding a non-increasing
    count keeps it non-increasing), so the pipeline's bisection on ``remove`` stays sound."""
    if remove is None:
        drops = [s <= 0 for s in scores]
    else:
        flat = torch.cat([s.flatten() for s in scores])
        r = math.floor(remove * flat.numel())
        order = torch.argsort(flat, stable=True)
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[order[:r]] = True
        drops = list(torch.split(drop, [s.numel() for s in scores]))
    out = []
    for s, d in zip(scores, drops, strict=True):
        n = s.numel()
        count = max(int((~d).sum()), max(1, math.ceil((1.0 - cap) * n - 1e-9)))
        if round_to > 1 and n >= round_to:
            count = min(n, max(round_to, round_to * math.floor(count / round_to + 0.5)))
        if count == int((~d).sum()):
            keep = ~d
        else:
            # the structure's best ``count`` dimensions (rounding or the floor moved the count away
            # from what the global ranking left; equal scores are kept in position order)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.argsort(s.flatten(), descending=True, stable=True)[:count]] = True
        out.append(torch.nonzero(keep).flatten())
    return out


def plan_from_keeps(model_or_plan: nn.Module | Plan, keeps: list[torch.Tensor]) -> Plan:
    """The plan in which every structure keeps the given dimensions (layer-major, ``STRUCTURES``)."""
    p = (model_or_plan if isinstance(model_or_plan, Plan) else Plan.of(model_or_plan)).copy()
    arch = p.arch
    b = arch.block
    d = int(p.config.hidden_size)
    base = block_spec(p.config)
    for li in p.layer_indices():
        k = dict(zip(STRUCTURES, [int(x.numel()) for x in keeps[5 * li: 5 * li + 5]], strict=True))
        for r in b.attn_readers:
            p.resize_linear(arch.layer_path(li, r), in_features=k["attn_read"])
        p.resize_linear(arch.layer_path(li, b.attn_writer), out_features=k["attn_write"])
        p.set_mlp_width(li, k["mlp_mid"])
        for u in b.mlp_up:
            p.resize_linear(arch.layer_path(li, u), in_features=k["mlp_read"])
        p.resize_linear(arch.layer_path(li, b.mlp_down), out_features=k["mlp_write"])
        index = {key: (None if k[key] == d else k[key]) for key in STREAM}
        if any(v is not None for v in index.values()):
            p.block(arch.layer_path(li), {**base, **index})
    return p


def _learned(learned: Any) -> DISPLearned:
    if not isinstance(learned, DISPLearned):
        raise SlicekitError("DISP plans from learned masks: run it through slicekit.pipeline.compress "
                            "(which calls its learn step first), or pass learn()'s result")
    return learned


def _remove(fractions: list[float]) -> float:
    return float(sum(fractions) / len(fractions)) if fractions else 0.0


def plan(model: nn.Module, config: DISPConfig, fractions: list[float], learned: Any = None) -> Plan:
    """The plan for the schedule mean (the share of all scored dimensions removed, see :func:`select`)."""
    keeps = select(_learned(learned).scores, _remove(fractions), config.max_layer_sparsity, config.round_to)
    return plan_from_keeps(model, keeps)


@torch.no_grad()

def _keep_stream(layer: nn.Module, readers: tuple[str, ...], writer: str, read: torch.Tensor,
                 write: torch.Tensor) -> None:
    """A half-block reads the stream coordinates ``read`` (its readers' columns) and writes
    ``write`` (its writer's rows)."""
    for r in readers:
        lin = layer.get_submodule(r)
        set_linear(lin, linear_weight(lin)[:, read].clone())
    lin = layer.get_submodule(writer)
    bias = linear_bias(lin)
    set_linear(lin, linear_weight(lin)[write].clone(), None if bias is None else bias[write].clone())


def prune(model: nn.Module, keeps: list[torch.Tensor]) -> None:
    """The surgery: slice every structure's linears to its kept dimensions and give each layer
    that reads or writes a subset of the stream its index buffers."""
    arch = get_arch(model.config)
    b = arch.block
    d = int(model.config.hidden_size)
    base = block_spec(model.config)
    for li, layer in enumerate(arch.layer_list(model)):
        k = dict(zip(STRUCTURES, keeps[5 * li: 5 * li + 5], strict=True))
        dev = next(layer.parameters()).device
        _keep_stream(layer, b.attn_readers, b.attn_writer, k["attn_read"].to(dev), k["attn_write"].to(dev))
        keep_mlp_neurons(layer, arch, k["mlp_mid"])
        _keep_stream(layer, b.mlp_up, b.mlp_down, k["mlp_read"].to(dev), k["mlp_write"].to(dev))
        index = {key: k[key] for key in STREAM if k[key].numel() != d}
        if index:
            sizes = {key: (int(index[key].numel()) if key in index else None) for key in STREAM}
            make_block(layer, {**base, **sizes})
            for key, idx in index.items():
                getattr(layer, f"{key}_index").copy_(idx.to(dev))


def apply(model: nn.Module, plan_: Plan, config: DISPConfig, ctx: MethodContext) -> dict[str, Any]:
    learned = _learned(ctx.learned)
    original = count_plan(Plan.of(model)).decoder
    keeps = select(learned.scores, _remove(ctx.fractions), config.max_layer_sparsity, config.round_to)
    mine = plan_from_keeps(model, keeps)
    if mine.differences(plan_):
        raise SlicekitError("DISP: the plan does not match the learned masks at this schedule mean; plan and "
                            "apply must get the same learned scores and fractions")
    hard = select(learned.scores, None, config.max_layer_sparsity, config.round_to)
    learned_kept = count_plan(plan_from_keeps(model, hard)).decoder / original
    prune(model, keeps)
    sizes = [[int(x.numel()) for x in keeps[5 * i: 5 * i + 5]] for i in range(len(keeps) // 5)]
    return {"training": learned.log, "learned_kept_fraction": learned_kept,
            "kept_fraction": count_plan(plan_).decoder / original,
            "structure_sizes": {"order": list(STRUCTURES), "layers": sizes}}
