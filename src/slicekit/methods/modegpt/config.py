"""MoDeGPT settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig

MODULES = ("mlp", "qk", "vo")


@dataclass
class MoDeGPTConfig(MethodConfig):
    """``sparsity`` is the share of *decoder parameters* removed (real counts, e.g. 0.25).

    ``schedule``: per-layer allocation — ``modegpt`` (``softmax(−BI/ε)``, the paper's), ``constant``,
    ``dynamic`` or a JSON file (see :mod:`slicekit.schedules`); the schedule's mean is then scaled
    so that the real decoder parameter share removed matches ``target_params`` (default 0.25).  ``epsilon``: the
    softmax temperature ε; ``max_layer_sparsity``: the per-layer cap.
    ``modules``: comma-separated subset of ``mlp,qk,vo`` to compress (the others keep their size
    and the rest take the whole budget); attention modules are skipped on families whose
    attention slicekit cannot narrow (fused q/k/v projections, query-key norms).
    ``ridge``: λ of the ridge leverage scores relative to ``mean(diag C)`` (1.0: on SmolLM2-135M with
    8 × 256 calibration tokens, 0.01 / 1 / 10 gave WikiText-2 perplexity 104 / 94 / 96 at 25 %).
    ``damping``: relative diagonal damping of the least-squares solve (MLP) and of the whitening
    (value-output); in the same setting 0.001 instead of 0.01 gave 132 instead of 104 (ridge 0.01)
    and 0.1 gave 102 instead of 94 (ridge 1).
    ``round_to``: kept MLP widths are multiples of this (routed experts: of ``lcm(round_to, 8)``);
    the schedule gives every layer its own width, and float32 matrix kernels lose 20–30 % of their
    throughput on widths that are not multiples of 8 (``benchmarks/alignment.py``).  1: as the
    schedule says; version-2 recipes, written before the option existed, reproduce with 1.
    ``fast_heads``: every head of a layer keeps the same query/key dims (CR scores summed over all
    heads instead of per KV group) and the value rank equals the query/key width, so that the
    family's own RoPE applies to the narrowed heads and no head is padded, which saves the
    per-head rotary work of the general path.  On SmolLM2-135M at 25 %, in one run of
    ``benchmarks/speed.py`` (``speed.json``): decode at batch 8 1.29× dense against 1.24× for the
    default, at a WikiText-2 perplexity of 69.1 instead of 58.8 (``modegpt_fast_heads.json``).
    False (default): the paper's per-group dims and value rank.
    """

    VERSION: ClassVar[int] = 3
    LEGACY: ClassVar[dict[int, dict[str, object]]] = {2: {"round_to": 1}}

    target_params: float | None = 0.25
    schedule: str = "modegpt"
    modules: str = "mlp,qk,vo"
    ridge: float = 1.0
    damping: float = 1e-2
    round_to: int = 8
    fast_heads: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params is None:
            raise SlicekitError("MoDeGPT needs target_params (the fraction of decoder parameters removed)")
        if self.ridge <= 0:
            raise SlicekitError(f"ridge must be > 0 (got {self.ridge})")
        if self.damping < 0:
            raise SlicekitError(f"damping must be ≥ 0 (got {self.damping})")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        mods = self.module_set
        bad = mods - set(MODULES)
        if bad or not mods:
            raise SlicekitError(f"modules must be a comma-separated subset of {','.join(MODULES)} (got {self.modules!r})")

    @property
    def module_set(self) -> set[str]:
        return {m.strip() for m in self.modules.split(",") if m.strip()}
