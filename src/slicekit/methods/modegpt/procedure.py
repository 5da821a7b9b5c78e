"""MoDeGPT as a calibration-engine method.

Each decoder layer is three modules, each a pair of matrices compressed by a closed form that
reconstructs the module's output on calibration data (:mod:`slicekit.linalg`):

- **MLP** — Nyström: keep the intermediate neurons with the largest ridge leverage scores of the
  Gram matrix ``C`` of the down projection's input; keep those rows of the up (and gate) matrices;
  restore the down projection by least squares, ``W_D·C[:, S]·C[S, S]⁻¹``.
- **Key-query** — CR decomposition: keep the head dimensions with the largest
  ``‖C_q^{1/2}[:, j]‖·‖C_k^{1/2}[:, j]‖`` (Grams of the pre-RoPE query/key projections), rotary
  pairs together, scores summed over the query heads of a KV group; the same rows of W_Q and W_K.
- **Value-output** — whitened SVD of ``W_O·W_V·C_x^{1/2}`` per KV group (the output columns of all
  its query heads stacked), rank ``k``.

Calibration is sequential: every layer is calibrated on the outputs of the already compressed
earlier layers, and within a layer the MLP is calibrated after the attention was compressed.

Reduced attention heads need :class:`slicekit.modeling_slicekit.ReducedAttention`.  Where
slicekit cannot narrow a family's attention (fused q/k/v projections — Phi-3, GPT-2, GPT-NeoX —
or query-key layer norms in Phi-2), only the MLP is compressed and it takes the whole budget.

Choices beyond the paper (documented, measured in benchmarks/modegpt.py):

- the value bias (Qwen2, OPT, Phi-2) of a layer whose value-output pair is compressed is folded
  into the output bias first (attention rows sum to one), so the value projection is a pure
  linear map for the SVD;
- with *partial* rotary embeddings (Phi-2) all heads of a layer keep the same dimension set
  (scores summed over all heads), so that every head has the same number of rotated dims; with
  full rotary (Llama family) or none (OPT) each KV group chooses its own set;
- per-layer sparsity ``φ_l`` is applied as the same kept fraction to each compressed module of
  the layer, and the schedule's mean is solved for (bisection) so that the *real* share of
  decoder parameters removed is as close as the integer dimensions allow to the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slicekit.arch import ArchSpec, attention_info, get_arch, linear_bias, linear_weight, set_linear
from slicekit.calibration import CalibrationEngine, LayerStep
from slicekit.errors import SlicekitError
from slicekit.linalg import (
    cr_scores,
    lstsq_restore,
    nystrom_select,
    select_qk_dims,
    sqrt_and_inv_sqrt,
    whitened_svd,
)
from slicekit.methods import CompressionContext, CompressionResult
from slicekit.methods.modegpt.config import MoDeGPTConfig
from slicekit.modeling_slicekit import ReducedAttention
from slicekit.models import count_parameters
from slicekit.schedules import needs_scores, resolve_schedule
from slicekit.shape import describe


@dataclass(frozen=True)
class AttentionGeometry:
    """Where a layer's attention pieces are and how its heads are laid out."""

    path: str  # attention module, relative to the layer
    q: str
    k: str
    v: str
    o: str  # children of the attention module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_geometry(model: nn.Module, spec: ArchSpec) -> AttentionGeometry | None:
    """The geometry of the family's attention if :class:`ReducedAttention` can narrow it, else None."""
    b = spec.block
    if b.qkv_layout != "separate" or spec.rotary not in ("half", "none") or len(b.attn_readers) != 3:
        return None
    prefix = b.attn + "."
    names = [r[len(prefix):] for r in (*b.attn_readers, b.attn_writer)]
    attn = spec.layer_list(model)[0].get_submodule(b.attn)
    if getattr(attn, "qk_layernorm", False):
        return None
    info = attention_info(model.config)
    return AttentionGeometry(b.attn, *names, info.num_heads, info.num_kv_heads, info.head_dim, info.rotary_dim)


@dataclass
class LayerPlan:
    """Kept sizes of one layer: MLP neurons, query/key dims per head, value/output rank per head
    (``None`` where the family's attention is not narrowed)."""

    sparsity: float
    mlp_keep: int
    qk_keep: int | None
    vo_rank: int | None


@dataclass(frozen=True)
class UnitCosts:
    """Parameters one kept unit costs: an MLP neuron, a query/key dim (per head), a value rank."""

    mlp_width: int
    mlp: int
    head_dim: int
    qk: int
    vo: int
    rotary_dim: int
    vo_fold: int = 0  # parameters the value-bias fold removes (value bias − new output bias)

    def keeps(self, rho: float) -> tuple[int, int, int]:
        keep = 1.0 - rho
        mlp = max(1, min(self.mlp_width, round(keep * self.mlp_width))) if self.mlp else self.mlp_width
        if self.qk:
            qk = round(keep * self.head_dim)
            if self.rotary_dim:  # rotary pairs: keep an even number of dims
                qk = 2 * round(keep * self.head_dim / 2)
            qk = max(2 if self.rotary_dim else 1, min(self.head_dim, qk))
        else:
            qk = self.head_dim
        vo = max(1, min(self.head_dim, round(keep * self.head_dim))) if self.vo else self.head_dim
        return mlp, qk, vo

    def removed(self, rho: float) -> int:
        mlp, qk, vo = self.keeps(rho)
        return ((self.mlp_width - mlp) * self.mlp + (self.head_dim - qk) * self.qk
                + (self.head_dim - vo) * self.vo + (self.vo_fold if vo < self.head_dim else 0))


def _rows_cost(lin: nn.Module, rows_per_unit: int) -> int:
    w = linear_weight(lin)
    return rows_per_unit * (int(w.shape[1]) + (1 if lin.bias is not None else 0))


def unit_costs(layer: nn.Module, spec: ArchSpec, geo: AttentionGeometry | None, modules: set[str]) -> UnitCosts:
    b = spec.block
    down = layer.get_submodule(b.mlp_down)
    width = int(linear_weight(down).shape[1])
    mlp = 0
    if "mlp" in modules:
        mlp = sum(_rows_cost(layer.get_submodule(n), b.mlp_up_fused) for n in b.mlp_up) + int(linear_weight(down).shape[0])
    qk = vo = fold = 0
    head_dim, rot = 1, 0
    if geo is not None:
        attn = layer.get_submodule(geo.path)
        head_dim, rot = geo.head_dim, geo.rotary_dim
        if "qk" in modules:
            qk = (_rows_cost(getattr(attn, geo.q), geo.num_heads) + _rows_cost(getattr(attn, geo.k), geo.num_kv_heads))
        if "vo" in modules:
            v, o = getattr(attn, geo.v), getattr(attn, geo.o)
            out_dim = int(linear_weight(o).shape[0])
            vo = geo.num_kv_heads * int(linear_weight(v).shape[1]) + geo.num_heads * out_dim  # value bias folded away
            if v.bias is not None:
                fold = geo.num_kv_heads * geo.head_dim - (out_dim if o.bias is None else 0)
    return UnitCosts(width, mlp, head_dim, qk, vo, rot, fold)


def fold_value_bias(attn: nn.Module, geo: AttentionGeometry) -> None:
    """Move the value bias into the output bias: softmax rows sum to one, so every head adds the
    constant ``W_O,h·b_v``.  Exact; leaves the value projection bias-free."""
    v, o = getattr(attn, geo.v), getattr(attn, geo.o)
    bv = linear_bias(v)
    if bv is None:
        return
    expanded = bv.double().view(geo.num_kv_heads, geo.head_dim).repeat_interleave(geo.group, dim=0).reshape(-1)
    wo = linear_weight(o).double()
    bo = linear_bias(o)
    new_bo = wo @ expanded.to(wo.device) + (0 if bo is None else bo.double())
    set_linear(v, linear_weight(v).clone(), None, keep_bias=False)
    set_linear(o, linear_weight(o).clone(), new_bo)


def _select_rows(lin: nn.Module, rows: torch.Tensor) -> None:
    w, b = linear_weight(lin), linear_bias(lin)
    rows = rows.to(w.device)
    set_linear(lin, w[rows].clone(), None if b is None else b[rows].clone(), keep_bias=b is not None)


class ModularDecomposition:
    """The engine method: compresses attention, then the MLP, of every layer in turn."""

    def __init__(self, spec: ArchSpec, geo: AttentionGeometry | None, plans: list[LayerPlan],
                 config: MoDeGPTConfig) -> None:
        self.spec, self.geo, self.plans, self.config = spec, geo, plans, config
        self.modules = config.module_set
        self.errors: list[dict[str, float]] = []

    def begin(self, engine: CalibrationEngine) -> None:
        pass

    def end(self, engine: CalibrationEngine) -> None:
        pass

    # ------------------------------------------------------------ attention
    def _qk(self, attn: nn.Module, gq: torch.Tensor, gk: torch.Tensor, keep: int) -> list[torch.Tensor]:
        g = self.geo
        d, kv, grp = g.head_dim, g.num_kv_heads, g.group
        scores = torch.zeros(kv, d, dtype=torch.float64)
        for j in range(kv):
            ck = gk[j * d:(j + 1) * d, j * d:(j + 1) * d]
            for h in range(j * grp, (j + 1) * grp):
                scores[j] += cr_scores(gq[h * d:(h + 1) * d, h * d:(h + 1) * d], ck).cpu()
        if 0 < g.rotary_dim < d:  # partial rotary: one set for all heads (same rotated count per head)
            shared = select_qk_dims(scores.sum(0), keep, g.rotary_dim)
            index = [shared] * kv
        else:
            index = [select_qk_dims(scores[j], keep, g.rotary_dim) for j in range(kv)]
        q_rows = torch.cat([h * d + index[h // grp] for h in range(g.num_heads)])
        k_rows = torch.cat([j * d + index[j] for j in range(kv)])
        _select_rows(getattr(attn, g.q), q_rows)
        _select_rows(getattr(attn, g.k), k_rows)
        return index

    def _vo(self, attn: nn.Module, gram: torch.Tensor, rank: int) -> None:
        g = self.geo
        d, grp = g.head_dim, g.group
        v, o = getattr(attn, g.v), getattr(attn, g.o)
        wv, wo = linear_weight(v).double(), linear_weight(o).double()
        out_dim = wo.shape[0]
        new_v, new_o = [], [None] * g.num_heads
        roots = sqrt_and_inv_sqrt(gram, self.config.damping)
        for j in range(g.num_kv_heads):
            heads = range(j * grp, (j + 1) * grp)
            stacked = torch.cat([wo[:, h * d:(h + 1) * d] for h in heads], dim=0)
            a, bmat = whitened_svd(gram, wv[j * d:(j + 1) * d], stacked, rank, roots=roots)
            new_v.append(a)
            for n, h in enumerate(heads):
                new_o[h] = bmat[n * out_dim:(n + 1) * out_dim]
        set_linear(v, torch.cat(new_v, dim=0), None, keep_bias=False)
        set_linear(o, torch.cat(new_o, dim=1), None)

    def _attention(self, step: LayerStep, plan: LayerPlan) -> None:
        g, layer = self.geo, step.layer
        do_qk = "qk" in self.modules and plan.qk_keep < g.head_dim
        do_vo = "vo" in self.modules and plan.vo_rank < g.head_dim
        if not (do_qk or do_vo):
            return
        attn = layer.get_submodule(g.path)
        points = {"v": f"{g.path}.{g.v}:input", "q": f"{g.path}.{g.q}:output", "k": f"{g.path}.{g.k}:output"}
        wanted = ([points["v"]] if do_vo else []) + ([points["q"], points["k"]] if do_qk else [])
        obs = step.forward(grams=wanted)
        index = [torch.arange(g.head_dim)] * g.num_kv_heads
        qk_dim, rot = g.head_dim, g.rotary_dim
        if do_qk:
            index = self._qk(attn, obs.grams[points["q"]].matrix, obs.grams[points["k"]].matrix, plan.qk_keep)
            qk_dim = plan.qk_keep
            rot = int((index[0] < g.rotary_dim).sum())
        if do_vo:
            fold_value_bias(attn, g)
            self._vo(attn, obs.grams[points["v"]].matrix, plan.vo_rank)
        spec = {"q": g.q, "k": g.k, "v": g.v, "o": g.o, "num_heads": g.num_heads, "num_kv_heads": g.num_kv_heads,
                "qk_dim": qk_dim, "v_dim": plan.vo_rank if do_vo else g.head_dim, "rotary_dim": rot,
                "qk_index": [ix.tolist() for ix in index], "scaling": float(g.head_dim ** -0.5)}
        spec["scaling"] = float(getattr(attn, "scaling", spec["scaling"]))
        parent_path, _, name = g.path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, name, ReducedAttention(attn, spec))

    # ------------------------------------------------------------ MLP
    def _mlp(self, step: LayerStep, plan: LayerPlan) -> None:
        b, layer = self.spec.block, step.layer
        down = layer.get_submodule(b.mlp_down)
        width = int(linear_weight(down).shape[1])
        if "mlp" not in self.modules or plan.mlp_keep >= width:
            return
        point = f"{b.mlp_down}:input"
        gram = step.forward(grams=[point]).grams[point].matrix
        keep = nystrom_select(gram, plan.mlp_keep, self.config.ridge)
        set_linear(down, lstsq_restore(linear_weight(down), gram, keep, self.config.damping))
        keep = keep.cpu()
        rows = torch.cat([keep + f * width for f in range(b.mlp_up_fused)])
        for name in b.mlp_up:
            _select_rows(layer.get_submodule(name), rows)

    def process_layer(self, step: LayerStep) -> None:
        plan = self.plans[step.index]
        if self.geo is not None:
            self._attention(step, plan)
        self._mlp(step, plan)


def plan_layers(costs: UnitCosts, n_layers: int, removable_target: int, config: MoDeGPTConfig,
                scores=None) -> tuple[list[LayerPlan], float]:
    """Per-layer kept sizes whose total removed parameters is closest to ``removable_target``.

    The schedule gives fractions with mean ``m``; ``m`` is found by bisection (the removed count
    is non-decreasing in ``m``).  Returns the plans and the schedule mean used.
    """
    cap = config.max_layer_sparsity

    def fractions(mean: float) -> list[float]:
        return resolve_schedule(config.schedule, mean, n_layers, scores=scores, epsilon=config.epsilon, cap=cap)

    def removed(mean: float) -> int:
        return sum(costs.removed(r) for r in fractions(mean))

    lo, hi = 0.0, cap * (1 - 1e-9)
    if removed(hi) < removable_target:
        raise SlicekitError(f"cannot remove {removable_target} decoder parameters with the modules "
                            f"{config.modules!r} at a per-layer cap of {cap}")
    best = (abs(removed(0.0) - removable_target), 0.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        r = removed(mid)
        best = min(best, (abs(r - removable_target), mid))
        if r < removable_target:
            lo = mid
        else:
            hi = mid
    mean = best[1]
    plans = [LayerPlan(r, *costs.keeps(r)) for r in fractions(mean)]
    return plans, mean


@torch.no_grad()
def compress(model: nn.Module, calibration: list[torch.Tensor], config: MoDeGPTConfig,
             ctx: CompressionContext | None = None, fractions: list[float] | None = None) -> CompressionResult:
    """Compress ``model`` in place so that ``config.sparsity`` of its decoder parameters go.

    ``fractions``: per-layer sparsities to use as given (no schedule, no parameter matching).
    """
    ctx = ctx or CompressionContext()
    spec = get_arch(model.config)
    layers = spec.layer_list(model)
    n_layers = len(layers)
    modules = config.module_set
    original = count_parameters(model, spec)
    geo = attention_geometry(model, spec)
    if geo is not None and not ({"qk", "vo"} & modules):
        geo = None
    skipped = sorted({"qk", "vo"} & modules) if geo is None else []
    if modules - set(skipped) == set():
        raise SlicekitError(f"{model.config.model_type}: none of the modules {config.modules!r} can be compressed")
    costs = unit_costs(layers[0], spec, geo, modules)
    scores = None
    if fractions is None:
        if needs_scores(config.schedule):
            from slicekit.scores import layer_scores

            scores = layer_scores(model, calibration, device=ctx.device, progress=ctx.progress)
        target = round(config.sparsity * original["decoder"])
        plans, mean = plan_layers(costs, n_layers, target, config, scores)
    else:
        if len(fractions) != n_layers:
            raise SlicekitError(f"{len(fractions)} fractions for {n_layers} layers")
        plans, mean = [LayerPlan(r, *costs.keeps(r)) for r in fractions], sum(fractions) / n_layers
    if geo is None:
        for p in plans:
            p.qk_keep = p.vo_rank = None
    engine = CalibrationEngine(model, spec, calibration, device=ctx.device, progress=ctx.progress)
    method = ModularDecomposition(spec, geo, plans, config)
    engine.run(method, desc="modegpt")
    after = count_parameters(model, spec)
    summary = {
        "method": "modegpt",
        "modules": sorted(modules - set(skipped)),
        "skipped_modules": skipped,
        "schedule_mean": mean,
        "layers": [asdict(p) for p in plans],
        "block_importance": None if scores is None else list(scores.bi),
        "decoder_params": {"original": original["decoder"], "compressed": after["decoder"]},
        "decoder_share_removed": 1 - after["decoder"] / original["decoder"],
    }
    if not math.isfinite(summary["decoder_share_removed"]):
        raise SlicekitError("parameter count failed")
    return CompressionResult(describe(model), summary)
