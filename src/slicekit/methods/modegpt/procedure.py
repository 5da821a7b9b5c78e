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

from dataclasses import asdict, dataclass

import torch
from torch import nn

from slicekit.arch import ArchSpec, attention_info, get_arch, linear_bias, linear_weight, set_linear
from slicekit.calibration import CalibrationEngine, LayerStep
from slicekit.linalg import (
    cr_scores,
    lstsq_restore,
    nystrom_select,
    select_qk_dims,
    sqrt_and_inv_sqrt,
    whitened_svd,
)
from slicekit.methods import MethodContext
from slicekit.methods.common import mlp_multiple, mlp_width_of, round_mlp_width
from slicekit.methods.experts import ExpertGrams, narrow_experts
from slicekit.methods.modegpt.config import MoDeGPTConfig
from slicekit.modeling_slicekit import make_reduced_attention
from slicekit.shape import Plan


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
    """The geometry of the family's attention if its heads can be narrowed, else None: the
    table must name separate q/k/v/o projections, and per-head q/k norms (which normalise the
    full head) rule it out."""
    b = spec.block
    if None in (b.attn_q, b.attn_k, b.attn_v, b.attn_o) or b.qk_norm or spec.rotary not in ("half", "none"):
        return None
    info = attention_info(model.config)
    return AttentionGeometry(b.attn, b.attn_q, b.attn_k, b.attn_v, b.attn_o, info.num_heads, info.num_kv_heads,
                             info.head_dim, info.rotary_dim)


@dataclass
class LayerPlan:
    """Kept sizes of one layer: MLP neurons, query/key dims per head (of which ``rotary`` are
    rotated), value/output rank per head (``None`` where attention is not narrowed)."""

    sparsity: float
    mlp_keep: int
    qk_keep: int | None
    vo_rank: int | None
    rotary: int = 0


def keeps(rho: float, mlp_width: int, geo: AttentionGeometry | None, modules: set[str],
          multiple: int = 1, fast_heads: bool = False) -> LayerPlan:
    """Sizes kept at layer sparsity ``rho``: the same kept fraction for every compressed module
    (rotary pairs stay whole; with partial rotary the rotated share of the head is kept).  Kept
    MLP widths are multiples of ``multiple`` (``methods.common.mlp_multiple``: the config's
    ``round_to``, for routed experts its lcm with 8).  ``fast_heads``: the value rank equals the
    query/key width where both are narrowed (no head padding)."""
    keep = 1.0 - rho
    mlp = mlp_width
    if "mlp" in modules:
        mlp = round_mlp_width(mlp_width, rho, multiple)
    if geo is None:
        return LayerPlan(rho, mlp, None, None)
    d, r = geo.head_dim, geo.rotary_dim
    qk = d
    if "qk" in modules:
        qk = 2 * round(keep * d / 2) if r else round(keep * d)
        qk = max(2 if r else 1, min(d, qk))
    rot = 0
    if r:
        rot = min(r, qk, 2 * round(qk * r / d / 2))
        need = qk - (d - r)  # dims beyond the unrotated ones must be rotated
        if need > rot:
            rot = need + need % 2
    vo = max(1, min(d, round(keep * d))) if "vo" in modules else d
    if fast_heads and {"qk", "vo"} <= modules:
        vo = qk
    return LayerPlan(rho, mlp, qk, vo, rot)


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
        self.expert_records: list[dict] = []

    def begin(self, engine: CalibrationEngine) -> None:
        pass

    def end(self, engine: CalibrationEngine) -> None:
        pass

    # ------------------------------------------------------------ attention
    def _qk(self, attn: nn.Module, gq: torch.Tensor, gk: torch.Tensor, keep: int, rotated: int) -> list[torch.Tensor]:
        g = self.geo
        d, kv, grp = g.head_dim, g.num_kv_heads, g.group
        scores = torch.zeros(kv, d, dtype=torch.float64)
        for j in range(kv):
            ck = gk[j * d:(j + 1) * d, j * d:(j + 1) * d]
            for h in range(j * grp, (j + 1) * grp):
                scores[j] += cr_scores(gq[h * d:(h + 1) * d, h * d:(h + 1) * d], ck).cpu()
        if 0 < g.rotary_dim < d or self.config.fast_heads:
            # one set for all heads: partial rotary needs the same rotated count per head, and
            # fast_heads lets the family's own RoPE rotate every head alike
            shared = select_qk_dims(scores.sum(0), keep, g.rotary_dim, rotated)
            index = [shared] * kv
        else:
            index = [select_qk_dims(scores[j], keep, g.rotary_dim, rotated) for j in range(kv)]
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
        do_qk, do_vo = plan.qk_keep < g.head_dim, plan.vo_rank < g.head_dim
        if not (do_qk or do_vo):
            return
        attn = layer.get_submodule(g.path)
        points = {"v": f"{g.path}.{g.v}:input", "q": f"{g.path}.{g.q}:output", "k": f"{g.path}.{g.k}:output"}
        wanted = ([points["v"]] if do_vo else []) + ([points["q"], points["k"]] if do_qk else [])
        obs = step.forward(grams=wanted)
        index = [torch.arange(g.head_dim)] * g.num_kv_heads
        if do_qk:
            index = self._qk(attn, obs.grams[points["q"]].matrix, obs.grams[points["k"]].matrix, plan.qk_keep,
                             plan.rotary)
        if do_vo:
            fold_value_bias(attn, g)
            self._vo(attn, obs.grams[points["v"]].matrix, plan.vo_rank)
        make_reduced_attention(attn, attention_spec(g, plan))
        attn.qk_index.copy_(torch.stack(index).to(attn.qk_index.device))

    # ------------------------------------------------------------ MLP
    def _mlp(self, step: LayerStep, plan: LayerPlan) -> None:
        b, layer = self.spec.block, step.layer
        if "mlp" not in self.modules or plan.mlp_keep >= mlp_width_of(layer, self.spec):
            return
        if b.experts is not None:
            self._experts(step, plan.mlp_keep)
            return
        down = layer.get_submodule(b.mlp_down)
        width = int(linear_weight(down).shape[1])
        point = f"{b.mlp_down}:input"
        gram = step.forward(grams=[point]).grams[point].matrix
        keep = nystrom_select(gram, plan.mlp_keep, self.config.ridge)
        set_linear(down, lstsq_restore(linear_weight(down), gram, keep, self.config.damping))
        keep = keep.cpu()
        rows = torch.cat([keep + f * width for f in range(b.mlp_up_fused)])
        for name in b.mlp_up:
            _select_rows(layer.get_submodule(name), rows)

    def _experts(self, step: LayerStep, k: int) -> None:
        """A mixture-of-experts MLP: Nyström per routed expert — its ``k`` columns of largest ridge
        leverage and their least-squares down projection, both on the Gram of the tokens the
        layer's own router sends it (:mod:`slicekit.methods.experts`)."""
        stats = ExpertGrams.collect(step, self.spec)

        def choose(_e: int, w: torch.Tensor, g: torch.Tensor, _tokens: int) -> tuple[torch.Tensor, torch.Tensor, None]:
            keep = nystrom_select(g, k, self.config.ridge)
            return keep, lstsq_restore(w.double(), g, keep, self.config.damping), None

        record, _ = narrow_experts(step.layer, self.spec, stats, k, choose)
        self.expert_records.append({"layer": step.index, **record})

    def process_layer(self, step: LayerStep) -> None:
        plan = self.plans[step.index]
        if self.geo is not None:
            self._attention(step, plan)
        self._mlp(step, plan)


def attention_spec(g: AttentionGeometry, lp: LayerPlan) -> dict:
    """The ``reduced_attention`` entry of the shape for one layer."""
    rotary = lp.rotary if lp.qk_keep < g.head_dim else g.rotary_dim
    return {"q": g.q, "k": g.k, "v": g.v, "o": g.o, "num_heads": g.num_heads, "num_kv_heads": g.num_kv_heads,
            "qk_dim": lp.qk_keep, "v_dim": lp.vo_rank, "rotary_dim": rotary}


def _geometry(model: nn.Module, config: MoDeGPTConfig) -> tuple[ArchSpec, AttentionGeometry | None]:
    spec = get_arch(model.config)
    geo = attention_geometry(model, spec) if {"qk", "vo"} & config.module_set else None
    return spec, geo


def layer_plans(model: nn.Module, config: MoDeGPTConfig, fractions: list[float]) -> list[LayerPlan]:
    spec, geo = _geometry(model, config)
    width = mlp_width_of(spec.layer_list(model)[0], spec)
    return [keeps(r, width, geo, config.module_set, mlp_multiple(spec, config.round_to), config.fast_heads)
            for r in fractions]


def plan(model: nn.Module, config: MoDeGPTConfig, fractions: list[float]) -> Plan:
    """Kept MLP neurons, query/key dims and value ranks per layer at per-layer sparsities
    ``fractions`` (the same kept fraction for each compressed module of a layer)."""
    spec, geo = _geometry(model, config)
    p = Plan.of(model)
    for i, lp in enumerate(layer_plans(model, config, fractions)):
        if lp.mlp_keep < p.mlp_width(i):
            p.set_mlp_width(i, lp.mlp_keep)
        if geo is None or (lp.qk_keep >= geo.head_dim and lp.vo_rank >= geo.head_dim):
            continue
        def at(child: str | None = None, i: int = i) -> str:
            return spec.attn_path(i, child)

        p.resize_linear(at(geo.q), out_features=geo.num_heads * lp.qk_keep)
        p.resize_linear(at(geo.k), out_features=geo.num_kv_heads * lp.qk_keep)
        if lp.vo_rank < geo.head_dim:
            v_bias = p.linear(at(geo.v))["bias"]
            p.resize_linear(at(geo.v), out_features=geo.num_kv_heads * lp.vo_rank, bias=False)
            p.resize_linear(at(geo.o), in_features=geo.num_heads * lp.vo_rank,
                            bias=p.linear(at(geo.o))["bias"] or v_bias)
        p.reduced_attention(at(), attention_spec(geo, lp))
    return p


def unsupported(model: nn.Module, config: MoDeGPTConfig) -> str | None:
    """MoDeGPT needs at least one module it can compress on this family (routed experts are
    compressed one expert at a time, so the table's linear-only MLP refusal does not apply)."""
    spec = get_arch(model.config)
    fixed = spec.mlp_fixed_reason
    if fixed and spec.block.experts is None:
        return fixed
    _, geo = _geometry(model, config)
    if geo is None and config.module_set <= {"qk", "vo"}:
        return (f"its attention heads cannot be narrowed (fused q/k/v or per-head q/k norms) and modules="
                f"{config.modules!r} leaves nothing else; add mlp")
    return None


@torch.no_grad()
def apply(model: nn.Module, plan_: Plan, config: MoDeGPTConfig, ctx: MethodContext) -> dict:
    """Compress attention, then the MLP, of every layer in turn, on sequential calibration."""
    spec, geo = _geometry(model, config)
    plans = layer_plans(model, config, ctx.fractions)
    method = ModularDecomposition(spec, geo, plans, config)
    ctx.engine(model).run(method, desc="modegpt")
    skipped = sorted({"qk", "vo"} & config.module_set) if geo is None else []
    out = {"modules": sorted(config.module_set - set(skipped)), "skipped_modules": skipped,
           "layers": [asdict(p) for p in plans]}
    if method.expert_records:
        out["experts"] = method.expert_records
    return out
