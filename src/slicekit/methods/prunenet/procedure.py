"""PruneNet as a slicekit method: calibration-free MLP-width pruning by a learned policy.

The policy (:mod:`slicekit.methods.prunenet.policy`) is trained on the layers' first MLP matrix
(the gate for gated MLPs, as the reference; the first half of a fused gate/up) or loaded from a
file, then applied deterministically: layer ``l`` keeps the ``k_l`` rows with the largest logits.
No text is read (``Needs(calibration=False)``), the whole model is looked at once (the policy is
shared across layers) and no layer-by-layer forward pass is needed.  The output is the original
architecture with narrower MLPs; uniform widths save with a plain config.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from slicekit.arch import get_arch, linear_weight, mlp_refusal, model_type_of
from slicekit.methods import MethodContext
from slicekit.methods.common import (
    keep_mlp_neurons,
    mlp_up_weights,
    mlp_width_of,
    plan_mlp_widths,
    select_expert_neurons,
)
from slicekit.methods.prunenet.config import PruneNetConfig
from slicekit.shape import Plan


def unsupported(model: nn.Module, config: PruneNetConfig) -> str | None:
    """Mixture-of-experts MLPs: the weight-only baselines (random, magnitude) narrow every expert
    of a layer to one width; the learned policy, trained on one dense MLP matrix per layer, does not
    apply to them.  Other families: the table's MLP refusal."""
    if get_arch(model.config).block.experts is not None:
        if config.selection == "policy":
            return ("its MLP is a mixture of experts and PruneNet's policy scores the rows of one dense MLP "
                    "matrix per layer; use selection=random or selection=magnitude, which narrow every expert")
        return None
    return mlp_refusal(model, config)


def plan(model: nn.Module, config: PruneNetConfig, fractions: list[float]) -> Plan:
    return plan_mlp_widths(model, fractions, config.round_to)


@torch.no_grad()
def _states(model: nn.Module) -> list[torch.Tensor]:
    spec = get_arch(model.config)
    return [mlp_up_weights(layer, spec)[0].detach().double().cpu() for layer in spec.layer_list(model)]


def apply(model: nn.Module, plan_: Plan, config: PruneNetConfig, ctx: MethodContext) -> dict[str, Any]:
    from slicekit.methods.prunenet.policy import (
        load_policy,
        magnitude_rows,
        random_rows,
        save_policy,
        select_rows,
        train_policy,
    )

    spec = get_arch(model.config)
    layers = spec.layer_list(model)
    widths = plan_.mlp_widths()
    if spec.block.experts is not None:
        # every routed expert of layer l keeps widths[l] neurons (one width per layer), each expert
        # its own, chosen by the weight-only baselines (the policy refuses experts: see unsupported)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                if widths[i] < mlp_width_of(layer, spec):
                    keep = select_expert_neurons(layer, spec, widths[i], config.selection, seed=config.policy_seed + i)
                    keep_mlp_neurons(layer, spec, keep)
        return {"selection": config.selection, "mlp_widths": widths}
    states = _states(model)
    summary: dict[str, Any] = {"selection": config.selection, "mlp_widths": widths}
    policy = None
    if config.selection == "policy":
        t0 = time.perf_counter()
        if config.policy is not None:
            policy, meta = load_policy(config.policy, hidden_size=model.config.hidden_size)
            summary["policy"] = {"loaded": True, "meta": meta}
        else:
            with torch.enable_grad():
                policy, log = train_policy(states, widths, episodes=config.episodes, lr=config.lr,
                                           gamma=config.gamma, seed=config.policy_seed, progress=ctx.progress)
            trained = log.to_dict()
            summary["policy"] = {"loaded": False, "episodes": config.episodes,
                                 **{k: trained[k] for k in ("mean_reward", "seconds") if k in trained}}
            if config.save_policy:
                save_policy(policy, config.save_policy, {
                    "model_type": model_type_of(model.config), "hidden_size": model.config.hidden_size,
                    "target_params": config.target_params, "episodes": config.episodes, "seed": config.policy_seed})
        summary["policy_seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        for i, layer in enumerate(layers):
            k = widths[i]
            if k >= states[i].shape[0]:
                continue
            if config.selection == "policy":
                keep = select_rows(policy, states[i], k)
            elif config.selection == "random":
                keep = random_rows(states[i].shape[0], k, seed=config.policy_seed + i)
            else:
                ups = [w.double() for w in mlp_up_weights(layer, spec)]
                keep = magnitude_rows(ups, linear_weight(layer.get_submodule(spec.block.mlp_down)).double(), k)
            keep_mlp_neurons(layer, spec, keep.cpu())
    return summary
