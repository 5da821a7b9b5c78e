"""PruneNet settings, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig


@dataclass
class PruneNetConfig(MethodConfig):
    """``target_params`` (default 0.25) is met by narrowing every layer's MLP width, with no
    calibration data.  ``selection``: ``policy`` (PruneNet's learned policy), or the two
    calibration-free baselines ``random`` and ``magnitude`` (same widths, other rows).
    ``policy``: a saved policy (safetensors) to apply instead of training one; ``save_policy``:
    where to write the learned policy for reuse at other ratios or on another model of the same
    width.  ``episodes``/``lr``/``gamma``: REINFORCE training.  ``policy_seed``: training noise and the
    random baseline.  ``round_to``: widths are multiples of this.
    """

    VERSION: ClassVar[int] = 1
    HELP: ClassVar[dict[str, str]] = {
        "selection": "policy (learned), or the calibration-free baselines random / magnitude",
        "policy": "apply this saved policy (safetensors) instead of training one",
        "save_policy": "write the learned policy here (safetensors) for reuse at other ratios",
        "episodes": "REINFORCE episodes over all layers",
        "lr": "AdamW learning rate of the policy",
        "gamma": "per-layer discount of the reward, as the reference",
        "policy_seed": "seed of the policy training noise and of the random baseline",
        "round_to": "MLP widths are multiples of this",
    }

    target_params: float | None = 0.25
    selection: Literal["policy", "random", "magnitude"] = "policy"
    policy: str | None = None
    save_policy: str | None = None
    episodes: int = 20
    lr: float = 1e-3
    gamma: float = 0.99
    policy_seed: int = 0
    round_to: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params is None:
            raise SlicekitError("PruneNet needs target_params (the fraction of decoder parameters removed)")
        if self.episodes < 1:
            raise SlicekitError(f"episodes must be ≥ 1 (got {self.episodes})")
        if not self.lr > 0:
            raise SlicekitError(f"lr must be > 0 (got {self.lr})")
        if not 0 < self.gamma <= 1:
            raise SlicekitError(f"gamma must be in (0, 1] (got {self.gamma})")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.policy is not None and not os.path.isfile(self.policy):
            raise SlicekitError(f"policy file not found: {self.policy}")
        if self.policy is not None and self.selection != "policy":
            raise SlicekitError("--policy applies a learned policy: it needs selection=policy")
