"""DISP-LLM settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig


@dataclass
class DISPConfig(MethodConfig):
    """``target_params`` (default 0.25) is the share of decoder parameters removed; it is the
    target ``p = 1 − target_params`` of the training regulariser and, after training, met exactly
    against the one counter by shifting one global threshold on the learned scores.

    Training (the hypernetwork only; the model is frozen): ``train_tokens`` tokens of the
    calibration text (its batches are cycled; each cropped to ``train_seqlen`` tokens if set),
    AdamW with ``lr``/``weight_decay``, regulariser weight ``lam``, Gumbel-sigmoid temperature
    ``temperature`` and logit offset ``offset`` (a positive offset starts with most dimensions
    kept), GRU width ``hyper_hidden``.  ``gradient_checkpointing`` recomputes each decoder layer in
    the backward pass (less memory, ~1.3× the time).  ``disp_seed`` seeds the hypernetwork's
    initialisation, its fixed input and the Gumbel noise.  ``schedule`` must stay ``constant``:
    the masks decide where to prune, so per-layer shares are not used.  ``max_layer_sparsity``
    caps the share removed from any one structure (each keeps at least ``1 − cap`` of its
    dimensions) and bounds the global share the target solver may remove.  ``round_to``: every
    structure's kept count is rounded to a multiple of this (1: the masks as learned); version-1
    recipes, written before the option existed, reproduce with 1.
    """

    VERSION: ClassVar[int] = 2
    LEGACY: ClassVar[dict[int, dict[str, object]]] = {1: {"round_to": 1}}
    HELP: ClassVar[dict[str, str]] = {
        "train_tokens": "token budget of the hypernetwork training (calibration batches are cycled)",
        "train_seqlen": "crop every calibration sequence to this many tokens for training (None: as drawn)",
        "lr": "AdamW learning rate of the hypernetwork",
        "weight_decay": "AdamW weight decay of the hypernetwork",
        "lam": "weight λ of the parameter regulariser λ·|log(P/p)|",
        "temperature": "Gumbel-sigmoid temperature",
        "offset": "logit offset added before the sigmoid (positive: start by keeping most dimensions)",
        "noise_anneal": "final fraction of the steps over which the Gumbel noise shrinks to zero (0: off)",
        "hyper_hidden": "input width of the hypernetwork's bidirectional GRU (its state is twice this)",
        "gradient_checkpointing": "recompute decoder layers in the backward pass (less memory)",
        "disp_seed": "seed of the hypernetwork initialisation, its fixed input and the Gumbel noise",
        "round_to": "round every structure's kept count to a multiple of this (matrix kernels; 1: as learned)",
    }

    target_params: float | None = 0.25
    train_tokens: int = 1_000_000
    train_seqlen: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    lam: float = 16.0
    temperature: float = 0.4
    offset: float = 3.0
    hyper_hidden: int = 32
    noise_anneal: float = 0.25
    gradient_checkpointing: bool = False
    disp_seed: int = 0
    round_to: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params is None or self.target_params <= 0:
            raise SlicekitError("DISP needs target_params > 0 (the fraction of decoder parameters removed)")
        if self.schedule != "constant":
            raise SlicekitError("DISP learns where to prune; use schedule=constant "
                                "(per-layer shares are not used)")
        if self.train_tokens < 1:
            raise SlicekitError(f"train_tokens must be ≥ 1 (got {self.train_tokens})")
        if self.train_seqlen is not None and self.train_seqlen < 2:
            raise SlicekitError(f"train_seqlen must be ≥ 2 (got {self.train_seqlen})")
        for name in ("lr", "temperature", "lam"):
            if not getattr(self, name) > 0:
                raise SlicekitError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.weight_decay < 0:
            raise SlicekitError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if not 0.0 <= self.noise_anneal <= 1.0:
            raise SlicekitError(f"noise_anneal is a fraction of the steps in [0, 1] (got {self.noise_anneal})")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.hyper_hidden < 1:
            raise SlicekitError(f"hyper_hidden must be ≥ 1 (got {self.hyper_hidden})")
