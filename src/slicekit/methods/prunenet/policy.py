"""PruneNet's learned row-pruning policy (Sengupta et al., ICLR 2025): the model-agnostic core.

PruneNet compresses an MLP without calibration data.  The *state* of layer ``l`` is its first MLP
matrix ``W_l`` (``F × D``: one row per intermediate neuron); a small policy network shared by all
layers maps each row to a logit; rows are sampled by a relaxed Bernoulli and the top ``k`` are kept;
the reward is ``1 / KS(σ(W_l), σ(W_l[kept]))``, the inverse Kolmogorov–Smirnov statistic between the
singular values before and after, so the policy learns to keep the rows that preserve the layer's
spectrum.  Training is REINFORCE with AdamW over the layers of one model.  At compression time the
policy is applied deterministically (top-``k`` logits), so one learned policy serves any ratio and any
model of the same hidden width ``D``.

Everything here is a function of tensors: which matrix is the state (and how the kept rows are cut
out of the up/gate/down projections) is the caller's business.  The reference uses the matrix that
feeds the activation: ``fc1`` (OPT, Phi), ``dense_h_to_4h`` (Falcon) and, for gated LLaMA MLPs,
``gate_proj`` (not ``up_proj``).  Either works here; it is an ``F × D`` matrix.

Where this differs from the reference (``LCS2-IIITD/PruneNet``) and why:

* **Policy architecture.**  The reference scores row ``i`` as ``sigmoid(((W P^T + b) r)_i)`` with
  ``P`` of shape ``F × D``: a linear function of the row (``W_i·(P^T r) + b·r``) whose parameters are
  nonetheless tied to ``F``.  Ours keeps that linear row score as a ``D``-vector ``v`` and adds a
  small MLP over standardised row statistics (log row norm, log leverage):
  ``logit_i = v·x_i/√D + MLP(stats_i)``, ``x`` the rows over the matrix RMS.  It is tied to ``D``
  only, so one policy runs on any number of rows and is reusable on models of the same width; the
  statistics give it the handles a linear row score lacks ("drop weak / redundant rows").  Measured
  on SmolLM2-135M (``up_proj``, 25 %, 20 episodes): a first version, one tanh MLP over
  ``[x_i, norm_i]``, stayed at random-row quality (mean 1/KS 7.0 → 7.2); this one reaches 8.8
  (random 7.1, magnitude 8.4).  ``v`` itself made no measurable difference there; it is kept as the
  reference's dependence on the raw row (and is what ties a policy to ``D``).
* **Sampling.**  The reference draws relaxed-Bernoulli keep probabilities and then samples the kept
  rows with ``torch.multinomial`` (also at compression time, so its compressed model is random).  We
  keep the top ``k`` relaxed-Bernoulli scores during training (a logistic-noise analogue of Gumbel
  top-``k``; the temperature does not change which rows win) and the top ``k`` logits at compression.
  Noise comes from a seeded ``torch.Generator``, not the global RNG.
* **Loss.**  The reference's loss is ``-Σ_kept log(q_i) · r`` where ``q`` is a *fresh* relaxed sample,
  so dropped rows get no direct signal.  We use the Bernoulli log-likelihood of the kept/dropped mask,
  ``Σ_kept log σ(z_i) + Σ_dropped log σ(-z_i)``, times an advantage.  Rewards are discounted as in the
  reference (layer ``l``'s reward times ``γ^l``; actions of different layers do not interact, so this is
  a per-layer weight rather than a return), and a per-layer moving-average baseline is subtracted
  (the reference has none).  The baseline is what makes learning work: rewards are all positive and
  differ little between samples, so without it every sampled mask is reinforced and a synthetic
  problem a baselined run solves is not learnt at all in the same budget.
* **Updates.**  As in the reference: one rollout over all layers per episode with the current policy,
  then one AdamW step per layer.  Gradients are clipped **before** ``optimizer.step()``; the reference
  calls ``clip_grad_norm_`` after the step and after ``zero_grad``, which clips nothing.
* **Reward guard.**  The reference returns 99999 when KS = 0, which would swamp every other reward in
  the REINFORCE sum.  We floor KS at half its resolution (``0.5 / max(n1, n2)``), so the largest reward
  is of the order of the best non-zero one.  Singular values equal to 1e-9 of the largest are snapped
  together first: otherwise two spectra equal up to SVD rounding interleave and score KS = 1/n.
* **Precision and determinism.**  No fp16 autocast; SVDs in float64.  One seed fixes the initial
  weights and every sample, so two trainings give bit-identical policies.  The reference keeps the
  best-scoring episode on disk but prunes with the last one; we return the last one and log every
  episode's rewards.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slicekit.errors import SlicekitError

POLICY_FORMAT = "slicekit-prunenet-policy"
POLICY_FORMAT_VERSION = "1"
ROW_STATS = ("norm", "leverage")
#: singular values closer than this (relative to the largest) count as equal in the KS test
_KS_RESOLUTION = 1e-9


def _check_matrix(W: torch.Tensor, what: str = "weight") -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise SlicekitError(f"{what} must be a non-empty 2-D matrix (rows × hidden), got {shape}")


def row_statistics(W: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Scale-free per-row statistics of ``W`` (``F × len(names)``), each standardised over the rows.

    ``norm``: the log of the row's L2 norm, what magnitude pruning looks at.
    ``leverage``: the log of the row's statistical leverage ``‖U_i‖²`` (``U`` the left singular
    vectors) — how much of the row space only this row spans, which decides how much dropping it
    moves the singular values.
    Logs spread the low end, where the rows to drop are; the z-score (mean 0, std 1 within the matrix)
    puts every statistic on the scale of the network's other inputs, so a learning rate of 1e-3 can
    move the logits by several units within a few hundred steps (a raw norm ratio varies by ~0.1
    across rows and would need weights ~30× larger to matter).  Zero rows get a finite floor
    (1e-6 of the mean), far below every real row.
    """
    cols = []
    Wd = W.detach().to("cpu", torch.float64)
    for name in names:
        if name == "norm":
            value = Wd.norm(dim=1)
        elif name == "leverage":
            # QR is cheaper than an SVD and gives the same leverage for a full-column-rank W
            q = torch.linalg.qr(Wd)[0] if Wd.shape[0] >= Wd.shape[1] else torch.linalg.svd(Wd, full_matrices=False)[0]
            value = q.pow(2).sum(dim=1)
        else:
            raise SlicekitError(f"unknown PruneNet row statistic {name!r}; choose from {', '.join(ROW_STATS)}")
        value = value.clamp_min(1e-6 * float(value.mean()) + 1e-300).log()
        std = value.std(unbiased=False) if value.numel() > 1 else value.new_zeros(())
        cols.append((value - value.mean()) / std.clamp_min(1e-12))
    if not cols:
        return torch.zeros((W.shape[0], 0), dtype=torch.float32)
    return torch.stack(cols, dim=1).to(device=W.device, dtype=torch.float32)


class PolicyNetwork(nn.Module):
    """Row scorer shared by every layer: ``F × D`` matrix → ``F`` keep logits.

    ``logit_i = v·x_i / √D + MLP(stats_i)`` where ``x_i`` is row ``i`` over the matrix RMS (a layer's
    overall scale says nothing about which of its rows matter), ``v`` a learned ``D``-vector — the
    reference's score, whose ``W Pᵀ r`` collapses to exactly such a linear function of the row — and
    ``MLP = Linear(s, width) → tanh → Linear(width, 1)`` over the ``s`` standardised ``row_stats``.
    Rows are scored independently, so the network works for any ``F``; ``v`` ties it to ``D``
    (``hidden_size``), so a policy is reused on models of the same width.

    Why the split instead of one MLP over ``[x_i, stats_i]`` (which did not learn on SmolLM2-135M):
    our reading is that REINFORCE gradients on the ``D`` raw-row inputs are mostly noise and Adam
    moves every coordinate by about ``lr`` whatever its signal, so a hidden layer over the raw row
    (``D × width`` weights) turns that noise into random logits that drown the row-statistics
    signal; a single linear ``v`` keeps the reference's dependence on the row with ``width×`` fewer
    noisy weights.  ``row_score=False`` drops ``v``.
    """

    def __init__(self, hidden_size: int, width: int = 16, row_stats: Sequence[str] = ("norm", "leverage"),
                 row_score: bool = True, seed: int = 0) -> None:
        super().__init__()
        if hidden_size < 1 or width < 1:
            raise SlicekitError(f"PolicyNetwork needs hidden_size ≥ 1 and width ≥ 1, got {hidden_size}, {width}")
        for name in row_stats:
            if name not in ROW_STATS:
                raise SlicekitError(f"unknown PruneNet row statistic {name!r}; choose from {', '.join(ROW_STATS)}")
        if not row_stats and not row_score:
            raise SlicekitError("a PruneNet policy needs row statistics, the row score, or both")
        self.hidden_size = int(hidden_size)
        self.width = int(width)
        self.row_stats = tuple(row_stats)
        self.row_score = bool(row_score)
        self.score = nn.Linear(self.hidden_size, 1, bias=False) if self.row_score else None
        self.inp = nn.Linear(len(self.row_stats), self.width) if self.row_stats else None
        self.out = nn.Linear(self.width, 1) if self.row_stats else None
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int = 0) -> None:
        """Seeded init: PyTorch's default ``nn.Linear`` bounds (``±1/√fan_in``) for the hidden layer
        of the statistics MLP, zeros for its output layer and for the row score.

        The untrained policy therefore scores every row alike (sampling is uniform, like random rows):
        a neutral start.  With a random output layer some seeds start out preferring the *weakest*
        rows, and lr 1e-3 × 20 episodes does not undo that (SmolLM2-135M, 10 layers: greedy 1/KS
        5.9 for one seed against 8.8 for another); from zero, four seeds reach 8.2–8.8.
        """
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            if self.score is not None:
                self.score.weight.zero_()
            if self.inp is not None and self.out is not None:
                b_in = 1.0 / math.sqrt(self.inp.in_features)
                self.inp.weight.uniform_(-b_in, b_in, generator=g)
                self.inp.bias.uniform_(-b_in, b_in, generator=g)
                self.out.weight.zero_()
                self.out.bias.zero_()

    def hyperparameters(self) -> dict[str, object]:
        return {"hidden_size": self.hidden_size, "width": self.width, "row_stats": list(self.row_stats),
                "row_score": self.row_score}

    def check_input(self, W: torch.Tensor) -> None:
        _check_matrix(W)
        if W.shape[1] != self.hidden_size:
            raise SlicekitError(
                f"this PruneNet policy was trained for hidden size {self.hidden_size} but the matrix has "
                f"{W.shape[1]} columns; use a policy trained on a model of the same width or train a new one")

    def features(self, W: torch.Tensor) -> torch.Tensor:
        """The network's input for ``W`` (``F × (D + s)``): rows over the matrix RMS, then the row
        statistics."""
        self.check_input(W)
        x = W.detach().to(torch.float32)
        x = x / x.pow(2).mean().sqrt().clamp_min(1e-30)
        return torch.cat([x, row_statistics(W, self.row_stats)], dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from precomputed ``features(W)`` (training reuses them: the states never change)."""
        D = self.hidden_size
        out = features.new_zeros(features.shape[0])
        if self.score is not None:
            out = out + self.score(features[:, :D]).squeeze(-1) / math.sqrt(D)
        if self.inp is not None and self.out is not None:
            out = out + self.out(torch.tanh(self.inp(features[:, D:]))).squeeze(-1)
        return out

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(W))


# ----------------------------------------------------------------------------------------------
# Sampling and selection
# ----------------------------------------------------------------------------------------------

def _check_k(k: int, rows: int) -> int:
    try:
        ok = not isinstance(k, bool) and int(k) == k and 1 <= int(k) <= rows
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SlicekitError(f"number of rows to keep must be an integer in [1, {rows}], got {k!r}")
    return int(k)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order; ties go to the lower index
    (a stable sort), so the choice never depends on the sort kernel."""
    k = _check_k(k, scores.shape[0])
    order = torch.argsort(scores.detach(), descending=True, stable=True)[:k]
    return order.sort().values


def relaxed_bernoulli_scores(logits: torch.Tensor, temperature: float = 1.0,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``RelaxedBernoulli(temperature, logits=logits)`` sample drawn from ``generator``.

    Same formula as ``torch.distributions.RelaxedBernoulli.rsample`` (``sigmoid((z + log u −
    log(1 − u)) / t)`` with ``u`` clamped like ``clamp_probs``), which cannot take a generator; using
    ``logits`` directly instead of going through ``probs`` also avoids saturating large logits.
    """
    if temperature <= 0:
        raise SlicekitError(f"relaxed-Bernoulli temperature must be positive, got {temperature}")
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(eps, 1 - eps)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)


def sample_rows(logits: torch.Tensor, k: int, generator: torch.Generator | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """Training-time action: the ``k`` rows with the largest relaxed-Bernoulli scores (sorted)."""
    return top_k_sorted(relaxed_bernoulli_scores(logits.detach(), temperature, generator), k)


@torch.no_grad()
def select_rows(policy: PolicyNetwork, W: torch.Tensor, keep: int) -> torch.Tensor:
    """Compression-time action: the ``keep`` rows of ``W`` with the largest policy logits (= keep
    probabilities, the sigmoid being monotone), as a sorted ``LongTensor``.  Deterministic, and valid for any ``keep``, so a policy learned at one ratio is
    applied at another without retraining."""
    policy.check_input(W)
    keep = _check_k(keep, W.shape[0])
    was_training = policy.training
    policy.eval()
    try:
        logits = policy(W)
    finally:
        policy.train(was_training)
    return top_k_sorted(logits, keep)


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------

def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values of ``W`` in float64 on the CPU (a KS test on float32 spectra of nearly equal
    matrices would compare rounding noise)."""
    return torch.linalg.svdvals(W.detach().to(device="cpu", dtype=torch.float64))


def _check_kept(kept: torch.Tensor, rows: int) -> torch.Tensor:
    kept = torch.as_tensor(kept).detach().to("cpu")
    if kept.ndim != 1 or kept.numel() < 1 or kept.dtype == torch.bool or kept.dtype.is_floating_point \
            or kept.dtype.is_complex:
        raise SlicekitError("kept rows must be a non-empty 1-D tensor of integer row indices")
    kept = kept.long()
    if int(kept.min()) < 0 or int(kept.max()) >= rows:
        raise SlicekitError(f"kept row indices must lie in [0, {rows}), got [{int(kept.min())}, {int(kept.max())}]")
    if torch.unique(kept).numel() != kept.numel():
        raise SlicekitError("kept row indices contain duplicates")
    return kept


def ks_statistic(W: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """Two-sample KS statistic between the singular values of ``W`` and of ``W[kept]``.

    ``reference`` may carry ``singular_values(W)`` precomputed (it does not change during training).
    """
    _check_matrix(W)
    kept = _check_kept(kept, W.shape[0])
    s1 = singular_values(W) if reference is None else reference.detach().to("cpu", torch.float64)
    s2 = singular_values(W.detach().to("cpu")[kept])
    # KS compares exact values: two spectra equal up to SVD rounding (say, only zero rows dropped) would
    # interleave and score 1/n instead of 0.  Snap both to a grid far below any real difference.
    step = max(float(s1.max()) if s1.numel() else 0.0, 1e-300) * _KS_RESOLUTION
    s1, s2 = torch.round(s1 / step) * step, torch.round(s2 / step) * step
    return float(stats.ks_2samp(s1.numpy(), s2.numpy()).statistic)


def ks_reward(W: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """PruneNet's reward ``1 / KS(σ(W), σ(W[kept]))``.

    KS = 0 (the spectrum is unchanged, e.g. only zero rows were dropped) is floored at half the
    statistic's resolution, ``0.5 / max(n1, n2)``, so the reward stays finite and of the order of the
    best non-zero one instead of the reference's 99999.
    """
    _check_matrix(W)
    kept = _check_kept(kept, W.shape[0])
    n1 = min(W.shape)
    n2 = min(int(kept.numel()), W.shape[1])
    return 1.0 / max(ks_statistic(W, kept, reference), 0.5 / max(n1, n2))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainLog:
    """What happened during ``train_policy``.

    ``mean_reward``: per episode, the raw (undiscounted) ``1/KS`` of the sampled rows, averaged over
    layers (``layer_rewards`` per layer).  ``greedy_reward``: with ``eval_greedy``, the same for the
    deterministic ``select_rows`` choice after each episode (``initial_greedy_reward`` before
    training) — what compression will get.  ``episode_seconds``: rollout + updates, excluding the
    greedy evaluation; ``seconds``: everything, wall clock; ``cpu_seconds``: the process's CPU time
    over the same span (on a shared machine the wall clock measures the neighbours too).  ``grad_norms``: pre-clipping norm at every step."""

    episodes: int
    lr: float
    gamma: float
    seed: int
    keep: list[int]
    max_grad_norm: float
    baseline_momentum: float | None
    mean_reward: list[float] = field(default_factory=list)
    greedy_reward: list[float] = field(default_factory=list)
    initial_greedy_reward: float | None = None
    episode_seconds: list[float] = field(default_factory=list)
    layer_rewards: list[list[float]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean_greedy_reward(policy: PolicyNetwork, states: list[torch.Tensor], ks: list[int],
                        refs: list[torch.Tensor]) -> float:
    rewards = [ks_reward(W, select_rows(policy, W, k), ref) for W, k, ref in zip(states, ks, refs)]
    return sum(rewards) / len(rewards)


@torch.enable_grad()  # callers (the compression pipeline) often run under no_grad
def train_policy(weights: Sequence[torch.Tensor], keep: int | Sequence[int], episodes: int = 20,
                 lr: float = 1e-3, gamma: float = 0.99, seed: int = 0, progress: bool = False, *,
                 policy: PolicyNetwork | None = None, width: int = 16,
                 row_stats: Sequence[str] = ("norm", "leverage"), row_score: bool = True,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                 baseline_momentum: float | None = 0.9, temperature: float = 1.0,
                 eval_greedy: bool = False) -> tuple[PolicyNetwork, TrainLog]:
    """Learn a PruneNet policy on the first MLP matrices ``weights`` (one ``F_l × D`` per layer).

    ``keep``: rows to keep, one number for all layers or one per layer.  Each episode rolls the
    current policy out over all layers (relaxed-Bernoulli top-``k`` rows, reward ``1/KS``), weights
    layer ``l``'s reward by ``gamma**l`` as the reference does, subtracts a per-layer moving-average
    baseline (``baseline_momentum``; ``None`` = no baseline, as the reference; with a baseline the
    first episode only initialises it and takes no step), and takes one AdamW step per layer on
    ``-advantage · log p(mask)``.  Gradients are clipped to ``max_grad_norm``
    *before* each ``optimizer.step()`` — the reference clips after the step (and after ``zero_grad``),
    which has no effect.  ``policy`` continues training an existing policy; otherwise a new one is
    built from ``width``/``row_stats``/``row_score`` and ``seed``.  The same arguments give a bit-identical policy.
    """
    if not weights:
        raise SlicekitError("train_policy needs at least one weight matrix")
    if isinstance(episodes, bool) or int(episodes) != episodes or episodes < 0:
        raise SlicekitError(f"episodes must be a non-negative integer, got {episodes!r}")
    if not (lr > 0 and 0 < gamma <= 1 and max_grad_norm > 0):
        raise SlicekitError(f"need lr > 0, 0 < gamma ≤ 1 and max_grad_norm > 0; got {lr}, {gamma}, {max_grad_norm}")
    if baseline_momentum is not None and not 0 <= baseline_momentum < 1:
        raise SlicekitError(f"baseline_momentum must be in [0, 1) or None, got {baseline_momentum}")
    for i, W in enumerate(weights):
        _check_matrix(W, f"weight {i}")
    states = [W.detach().to("cpu", torch.float32) for W in weights]
    hidden = states[0].shape[1]
    if any(W.shape[1] != hidden for W in states):
        raise SlicekitError("all PruneNet weight matrices must have the same number of columns (hidden size)")
    ks_list = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(states)
    if len(ks_list) != len(states):
        raise SlicekitError(f"keep lists {len(ks_list)} row counts for {len(states)} weight matrices")
    ks_list = [_check_k(k, W.shape[0]) for k, W in zip(ks_list, states)]
    t_start, cpu_start = time.perf_counter(), time.process_time()  # the reference SVDs count too

    if policy is None:
        policy = PolicyNetwork(hidden, width=width, row_stats=row_stats, row_score=row_score, seed=seed)
    else:
        policy.check_input(states[0])
    refs = [singular_values(W) for W in states]
    log = TrainLog(episodes=int(episodes), lr=lr, gamma=gamma, seed=seed, keep=ks_list,
                   max_grad_norm=max_grad_norm, baseline_momentum=baseline_momentum)
    # one generator for the sampling noise, seeded apart from the initialisation stream
    gen = torch.Generator().manual_seed(int(seed) * 2 + 1)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    baselines: list[float | None] = [None] * len(states)
    features = [policy.features(W) for W in states]  # inputs never change: compute once
    if eval_greedy:
        log.initial_greedy_reward = _mean_greedy_reward(policy, states, ks_list, refs)

    for _ in tqdm(range(int(episodes)), desc="prunenet policy", disable=not progress, leave=False):
        t0 = time.perf_counter()
        policy.train()
        # rollout: every layer's action comes from the policy as it was at the start of the episode
        actions, rewards = [], []
        with torch.no_grad():
            for feats, W, k, ref in zip(features, states, ks_list, refs):
                logits = policy.logits(feats)
                kept = sample_rows(logits, k, gen, temperature)
                actions.append(kept)
                rewards.append(ks_reward(W, kept, ref))
        for layer, (feats, kept, reward) in enumerate(zip(features, actions, rewards)):
            discounted = gamma ** layer * reward
            if baseline_momentum is None:
                advantage = discounted
            elif baselines[layer] is None:
                baselines[layer] = discounted  # the first episode only calibrates the baseline
                continue
            else:
                base = baselines[layer]
                advantage = discounted - base
                baselines[layer] = baseline_momentum * base + (1 - baseline_momentum) * discounted
            logits = policy.logits(feats)
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask[kept] = True
            log_prob = F.logsigmoid(logits[mask]).sum() + F.logsigmoid(-logits[~mask]).sum()
            loss = -advantage * log_prob
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # before the step
            opt.step()
            log.grad_norms.append(float(norm))
        log.layer_rewards.append(rewards)
        log.mean_reward.append(sum(rewards) / len(rewards))
        log.episode_seconds.append(time.perf_counter() - t0)
        if eval_greedy:
            log.greedy_reward.append(_mean_greedy_reward(policy, states, ks_list, refs))
    log.seconds = time.perf_counter() - t_start
    log.cpu_seconds = time.process_time() - cpu_start
    policy.eval()
    return policy, log


# ----------------------------------------------------------------------------------------------
# Policy files
# ----------------------------------------------------------------------------------------------

def save_policy(policy: PolicyNetwork, path: str | os.PathLike, meta: dict[str, object] | None = None) -> None:
    """Write ``policy`` as safetensors (no pickle), atomically.

    The header's string metadata holds the format tag, the architecture (``hidden_size`` = the width
    ``D`` it is tied to, ``width``, ``row_stats``, ``row_score``) and ``meta`` as one JSON object — the caller's
    provenance: model family, ratio it was trained at, seed, episodes...  Values must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    try:
        meta_json = json.dumps(meta or {}, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise SlicekitError(f"PruneNet policy metadata must be JSON-serialisable: {err}") from err
    header = {"format": POLICY_FORMAT, "format_version": POLICY_FORMAT_VERSION,
              "hidden_size": str(policy.hidden_size), "width": str(policy.width),
              "row_stats": ",".join(policy.row_stats), "row_score": str(int(policy.row_score)),
              "meta": meta_json}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in policy.state_dict().items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SlicekitError(f"cannot save the PruneNet policy: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".policy-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_policy(path: str | os.PathLike, hidden_size: int | None = None) -> tuple[PolicyNetwork, dict[str, object]]:
    """Read a policy written by ``save_policy``; returns ``(policy, meta)``.

    ``hidden_size``: the width ``D`` of the model it is about to be applied to; a policy trained for
    another width is refused here with a clear message rather than failing inside a matmul.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SlicekitError(f"PruneNet policy file not found: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises several types for truncated/garbled files
        raise SlicekitError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                            "re-save the policy with --save-policy") from err
    if header.get("format") != POLICY_FORMAT:
        raise SlicekitError(f"{path} is a safetensors file but not a slicekit PruneNet policy "
                            f"(format tag {header.get('format')!r})")
    if header.get("format_version") != POLICY_FORMAT_VERSION:
        raise SlicekitError(f"{path} has PruneNet policy format version {header.get('format_version')!r}; "
                            f"this slicekit reads version {POLICY_FORMAT_VERSION}")
    try:
        trained_hidden = int(header["hidden_size"])
        width = int(header["width"])
        stats_names = tuple(s for s in header.get("row_stats", "").split(",") if s)
        row_score = {"1": True, "0": False}[header.get("row_score", "1")]
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, ValueError) as err:
        raise SlicekitError(f"{path} has a damaged PruneNet policy header ({err})") from err
    if hidden_size is not None and hidden_size != trained_hidden:
        raise SlicekitError(f"the PruneNet policy in {path} was trained for hidden size {trained_hidden}, but this model has "
                            f"hidden size {hidden_size}; use a policy from a model of the same width or train one")
    policy = PolicyNetwork(trained_hidden, width=width, row_stats=stats_names, row_score=row_score)
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise SlicekitError(f"{path}: PruneNet policy tensors {got} do not match its header (expected {expected})")
    policy.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    policy.eval()
    return policy, meta


# ----------------------------------------------------------------------------------------------
# Calibration-free baselines (same k, for the benchmark)
# ----------------------------------------------------------------------------------------------

def random_rows(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` rows out of ``rows`` uniformly at random (seeded), sorted."""
    if isinstance(rows, bool) or int(rows) != rows or rows < 1:
        raise SlicekitError(f"number of rows must be a positive integer, got {rows!r}")
    k = _check_k(k, int(rows))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(rows), generator=g)[:k].sort().values


def magnitude_rows(W_up: torch.Tensor | Sequence[torch.Tensor], W_down: torch.Tensor | None, k: int) -> torch.Tensor:
    """The ``k`` intermediate neurons with the largest weight magnitude, sorted.

    Neuron ``i``'s score is the product of the L2 norms of its row in every input matrix (``W_up``:
    one ``F × D`` matrix, or several for a gated MLP, e.g. ``[gate, up]``) and of its column in
    ``W_down`` (``D × F``; ``None`` = rows only).  The product is the scale of the neuron's whole path
    ``x → W_up_i·x → W_down[:, i]``: a neuron with strong inputs but a near-zero output column
    contributes nothing, which a row norm alone would miss.
    """
    ups = [W_up] if isinstance(W_up, torch.Tensor) else list(W_up)
    if not ups:
        raise SlicekitError("magnitude_rows needs at least one input matrix")
    for i, W in enumerate(ups):
        _check_matrix(W, f"input matrix {i}")
    rows = ups[0].shape[0]
    if any(W.shape[0] != rows for W in ups):
        raise SlicekitError("magnitude_rows: the input matrices have different numbers of rows")
    score = torch.ones(rows, dtype=torch.float64)
    for W in ups:
        score = score * W.detach().to("cpu", torch.float64).norm(dim=1)
    if W_down is not None:
        _check_matrix(W_down, "output matrix")
        if W_down.shape[1] != rows:
            raise SlicekitError(f"magnitude_rows: the output matrix has {W_down.shape[1]} columns, expected {rows}")
        score = score * W_down.detach().to("cpu", torch.float64).norm(dim=0)
    return top_k_sorted(score, k)
