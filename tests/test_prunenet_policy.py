"""PruneNet's policy core: network shapes, sampling, KS reward, REINFORCE training, policy files,
calibration-free baselines.  Pure tensor tests on small synthetic matrices (fast, offline)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from scipy import stats
from torch.optim.optimizer import register_optimizer_step_pre_hook

from slicekit.errors import SlicekitError
from slicekit.methods.prunenet.policy import (
    PolicyNetwork,
    TrainLog,
    ks_reward,
    ks_statistic,
    load_policy,
    magnitude_rows,
    random_rows,
    relaxed_bernoulli_scores,
    row_statistics,
    sample_rows,
    save_policy,
    select_rows,
    singular_values,
    top_k_sorted,
    train_policy,
)


def _gauss(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _zero_row_problem(layers: int = 6, rows: int = 48, cols: int = 16, zeros: int = 12, seed: int = 0):
    """Matrices whose ``zeros`` zero rows are the only ones that can be dropped without changing the
    spectrum: the ideal policy drops exactly them (KS = 0)."""
    g = torch.Generator().manual_seed(seed)
    mats, zero_sets = [], []
    for _ in range(layers):
        W = torch.randn(rows, cols, generator=g)
        z = torch.randperm(rows, generator=g)[:zeros]
        W[z] = 0
        mats.append(W)
        zero_sets.append(set(z.tolist()))
    return mats, zero_sets


def _random_policy(hidden: int, seed: int, **kwargs) -> PolicyNetwork:
    """A policy with every weight random (a fresh one scores all rows alike)."""
    policy = PolicyNetwork(hidden, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(generator=g)
    return policy


def _assert_sorted_unique(idx: torch.Tensor, k: int, rows: int) -> None:
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert torch.all(idx[1:] > idx[:-1]), "indices must be strictly increasing"
    assert int(idx.min()) >= 0 and int(idx.max()) < rows


# ----------------------------------------------------------------------------- network

def test_policy_shapes_are_width_agnostic_and_tied_to_hidden_size():
    policy = PolicyNetwork(16, width=8, row_stats=("norm", "leverage"), seed=3)
    for rows in (5, 48, 100):
        logits = policy(_gauss(rows, 16, rows))
        assert logits.shape == (rows,) and torch.isfinite(logits).all()
    assert policy.features(_gauss(30, 16, 0)).shape == (30, 18)
    with pytest.raises(SlicekitError, match="hidden size 16"):
        policy(_gauss(30, 12, 0))
    with pytest.raises(SlicekitError, match="2-D"):
        policy(torch.zeros(16))


def test_policy_is_row_permutation_equivariant_and_scale_free():
    """Rows are scored as a set (reordering rows reorders logits) and the layer's overall scale is
    ignored: the policy must transfer across layers of different magnitude and row order."""
    W = _gauss(20, 16, 1)
    assert torch.equal(PolicyNetwork(16, seed=5)(W), torch.zeros(20))  # untrained: no preference
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    for net in (_random_policy(16, 0, row_stats=()), _random_policy(16, 1, width=8)):
        full = net(W).detach()
        assert full.std() > 0.05
        assert torch.allclose(net(W[perm]).detach(), full[perm], atol=1e-5)
        assert torch.allclose(net(3.7 * W).detach(), full, atol=1e-5)
        assert torch.allclose(net(1e-3 * W).detach(), full, atol=1e-4)
    with pytest.raises(SlicekitError, match="needs row statistics, the row score, or both"):
        PolicyNetwork(16, row_stats=(), row_score=False)


def test_row_statistics_are_standardised_and_rank_rows():
    W = _gauss(40, 8, 2)
    W[5] *= 10
    W[6] = 0
    s = row_statistics(W, ("norm", "leverage"))
    assert s.shape == (40, 2)
    assert torch.allclose(s.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(s.std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert int(s[:, 0].argmax()) == 5 and int(s[:, 0].argmin()) == 6
    assert int(s[:, 1].argmin()) == 6  # a zero row spans nothing
    with pytest.raises(SlicekitError, match="unknown PruneNet row statistic"):
        row_statistics(W, ("bogus",))


def test_policy_init_is_seeded():
    a, b, c = PolicyNetwork(16, seed=1), PolicyNetwork(16, seed=1), PolicyNetwork(16, seed=2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


# ----------------------------------------------------------------------------- sampling

def test_relaxed_bernoulli_scores_match_torch_distribution():
    logits = torch.linspace(-4, 4, 50, dtype=torch.float64)
    torch.manual_seed(123)
    expected = torch.distributions.RelaxedBernoulli(torch.tensor(0.7, dtype=torch.float64), logits=logits).rsample()
    torch.manual_seed(123)
    got = relaxed_bernoulli_scores(logits, 0.7, generator=torch.default_generator)
    assert torch.allclose(got, expected, atol=1e-10)
    with pytest.raises(SlicekitError, match="temperature"):
        relaxed_bernoulli_scores(logits, 0.0)


def test_sample_rows_is_seeded_top_k_and_follows_logits():
    logits = torch.zeros(60)
    logits[:20] = 8.0  # these rows should almost always win
    a = sample_rows(logits, 20, torch.Generator().manual_seed(0))
    b = sample_rows(logits, 20, torch.Generator().manual_seed(0))
    c = sample_rows(torch.zeros(60), 20, torch.Generator().manual_seed(1))
    _assert_sorted_unique(a, 20, 60)
    assert torch.equal(a, b)
    assert len(set(a.tolist()) & set(range(20))) >= 18
    assert not torch.equal(c, torch.arange(20))  # no logits preference: a random subset


def test_top_k_sorted_breaks_ties_by_index():
    assert top_k_sorted(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]
    with pytest.raises(SlicekitError, match=r"\[1, 5\]"):
        top_k_sorted(torch.zeros(5), 6)


def test_select_rows_returns_sorted_unique_top_k_of_policy():
    policy = _random_policy(16, 4, width=8)
    W = _gauss(48, 16, 5)
    logits = policy(W).detach()
    for k in (1, 17, 36, 48):
        idx = select_rows(policy, W, k)
        _assert_sorted_unique(idx, k, 48)
        dropped = sorted(set(range(48)) - set(idx.tolist()))
        if dropped:
            assert float(logits[idx].min()) >= float(logits[dropped].max())
    assert torch.equal(select_rows(policy, W, 30), select_rows(policy, W, 30))
    with pytest.raises(SlicekitError):
        select_rows(policy, W, 0)
    with pytest.raises(SlicekitError, match="hidden size"):
        select_rows(policy, _gauss(48, 8, 0), 10)


# ----------------------------------------------------------------------------- reward

def test_ks_statistic_matches_scipy_on_numpy_svd():
    W = _gauss(40, 12, 6)
    kept = torch.arange(0, 40, 2)
    s1 = np.linalg.svd(W.double().numpy(), compute_uv=False)
    s2 = np.linalg.svd(W.double().numpy()[kept.numpy()], compute_uv=False)
    expected = stats.ks_2samp(s1, s2).statistic
    assert ks_statistic(W, kept) == pytest.approx(expected, abs=1e-12)
    assert ks_statistic(W, kept, reference=singular_values(W)) == pytest.approx(expected, abs=1e-12)
    assert ks_reward(W, kept) == pytest.approx(1 / expected)


def test_reward_prefers_keeping_more_rows_and_is_finite_at_zero_ks():
    W = _gauss(64, 16, 7)
    all_but_one = ks_reward(W, torch.arange(63))
    few = ks_reward(W, torch.arange(20))
    assert all_but_one > few
    assert ks_reward(W, torch.arange(64)) == pytest.approx(2 * 16)  # KS = 0 → floored, finite
    W[40:] = 0
    assert ks_reward(W, torch.arange(40)) == pytest.approx(2 * 16)  # dropping zero rows is free
    assert ks_reward(W, torch.arange(40)) > ks_reward(W, torch.arange(24, 64))


def test_reward_rejects_bad_indices():
    W = _gauss(10, 4, 0)
    for bad in (torch.tensor([0, 10]), torch.tensor([1, 1]), torch.tensor([], dtype=torch.long),
                torch.tensor([0.0, 1.0]), torch.tensor([-1, 2])):
        with pytest.raises(SlicekitError):
            ks_reward(W, bad)


# ----------------------------------------------------------------------------- training

def test_training_is_bitwise_deterministic_per_seed():
    mats, _ = _zero_row_problem(layers=3, rows=24, cols=8, zeros=6)
    p1, log1 = train_policy(mats, 18, episodes=3, lr=1e-2, seed=11)
    p2, log2 = train_policy(mats, 18, episodes=3, lr=1e-2, seed=11)
    p3, _ = train_policy(mats, 18, episodes=3, lr=1e-2, seed=12)
    for (k, v1), v2 in zip(p1.state_dict().items(), p2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert log1.layer_rewards == log2.layer_rewards
    assert not all(torch.equal(v1, v3) for v1, v3 in zip(p1.state_dict().values(), p3.state_dict().values()))
    fresh = PolicyNetwork(8, seed=11)
    assert not all(torch.equal(v1, v0) for v1, v0 in zip(p1.state_dict().values(), fresh.state_dict().values()))


def test_training_learns_to_drop_zero_rows():
    mats, zero_sets = _zero_row_problem()
    # start from a policy that prefers the *weakest* rows (keeps the zero rows), so that success
    # cannot come from a lucky random initialisation
    policy = PolicyNetwork(16, width=1, row_stats=("norm",), row_score=False)
    with torch.no_grad():
        policy.inp.weight.fill_(1.0)
        policy.inp.bias.zero_()
        policy.out.weight.fill_(-0.5)
    start = [len(z - set(select_rows(policy, W, 36).tolist())) for W, z in zip(mats, zero_sets)]
    assert sum(start) == 0
    greedy_before = np.mean([ks_reward(W, select_rows(policy, W, 36)) for W in mats])
    policy, log = train_policy(mats, 36, episodes=40, lr=3e-2, seed=0, policy=policy)
    assert isinstance(log, TrainLog) and len(log.mean_reward) == 40 and len(log.episode_seconds) == 40
    assert all(t > 0 for t in log.episode_seconds)
    first, last = np.mean(log.mean_reward[:5]), np.mean(log.mean_reward[-5:])
    assert last > 1.3 * first, (first, last)
    assert np.mean([ks_reward(W, select_rows(policy, W, 36)) for W in mats]) > 2 * greedy_before
    dropped_zero = [len(z - set(select_rows(policy, W, 36).tolist())) for W, z in zip(mats, zero_sets)]
    assert sum(dropped_zero) >= 0.8 * 12 * len(mats), dropped_zero


def test_gradients_are_clipped_before_each_optimizer_step():
    """The reference clips after ``optimizer.step()`` (a no-op); here every step must see clipped
    gradients.  A tiny ``max_norm`` makes sure clipping actually bites."""
    seen: list[float] = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        mats, _ = _zero_row_problem(layers=3, rows=24, cols=8, zeros=6)
        _, log = train_policy(mats, 18, episodes=2, seed=0, max_grad_norm=1e-3, baseline_momentum=None)
    finally:
        handle.remove()
    assert len(seen) == 6 == len(log.grad_norms)
    assert max(log.grad_norms) > 1e-3 * 10  # the raw gradients were much larger …
    assert max(seen) <= 1e-3 * (1 + 1e-4)  # … and the optimizer only ever saw clipped ones


def test_training_handles_per_layer_keep_and_row_counts_and_continues_a_policy():
    mats = [_gauss(30, 8, 1), _gauss(50, 8, 2), _gauss(20, 8, 3)]
    policy, log = train_policy(mats, [20, 25, 10], episodes=2, seed=0, eval_greedy=True)
    assert log.keep == [20, 25, 10] and len(log.layer_rewards[0]) == 3
    assert log.initial_greedy_reward is not None and len(log.greedy_reward) == 2
    assert json.loads(json.dumps(log.to_dict()))["keep"] == [20, 25, 10]
    assert len(log.grad_norms) == 3  # with a baseline the first episode only calibrates it: no steps
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    same, _ = train_policy(mats, 10, episodes=2, seed=1, policy=policy)
    assert same is policy
    assert not all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    with pytest.raises(SlicekitError, match=r"\[1, 20\], got 21"):  # the 20-row layer
        train_policy(mats, 21, episodes=1)
    for bad in (0, 2.5, "ten", True):
        with pytest.raises(SlicekitError, match="number of rows to keep must be an integer"):
            train_policy(mats, bad, episodes=1)
    with torch.no_grad():  # as the compression pipeline calls it
        _, log = train_policy(mats, np.int64(10), episodes=2)
    assert log.keep == [10, 10, 10] and len(log.grad_norms) == 3
    with pytest.raises(SlicekitError, match="3 weight matrices"):
        train_policy(mats, [5, 5], episodes=1)
    with pytest.raises(SlicekitError, match="same number of columns"):
        train_policy([_gauss(10, 8, 0), _gauss(10, 9, 0)], 5, episodes=1)
    with pytest.raises(SlicekitError, match="hidden size 8"):
        train_policy([_gauss(10, 6, 0)], 5, episodes=1, policy=policy)
    with pytest.raises(SlicekitError, match="at least one"):
        train_policy([], 5)


# ----------------------------------------------------------------------------- policy files

def test_save_load_round_trip_gives_identical_selections(tmp_path):
    mats, _ = _zero_row_problem(layers=2, rows=24, cols=8, zeros=6)
    policy = _random_policy(8, 0, width=12, row_stats=("norm", "leverage"))
    meta = {"family": "llama", "hidden_size": 8, "keep_fraction": 0.75, "seed": 0, "episodes": 2}
    path = tmp_path / "policy.safetensors"
    save_policy(policy, path, meta)
    assert sorted(os.listdir(tmp_path)) == ["policy.safetensors"]  # no temp file left behind
    loaded, got_meta = load_policy(path, hidden_size=8)
    assert got_meta == meta
    assert loaded.hyperparameters() == {"hidden_size": 8, "width": 12, "row_stats": ["norm", "leverage"],
                                        "row_score": True}
    for W in [*mats, _gauss(40, 8, 9)]:
        for k in (5, 18, 23):
            assert torch.equal(select_rows(loaded, W, k), select_rows(policy, W, k))
    linear_only = _random_policy(8, 1, row_stats=())
    save_policy(linear_only, tmp_path / "linear.safetensors")
    again, empty_meta = load_policy(tmp_path / "linear.safetensors")
    assert empty_meta == {} and again.hyperparameters()["row_stats"] == []
    assert torch.equal(again(mats[0]), linear_only(mats[0]))
    # a safetensors file, not a pickle: 8-byte little-endian header length, then a JSON header
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == "slicekit-prunenet-policy"
    assert header["__metadata__"]["hidden_size"] == "8"


def test_load_policy_refuses_other_width_and_damaged_files(tmp_path):
    path = tmp_path / "p.safetensors"
    save_policy(PolicyNetwork(8, width=4), path, {"family": "llama"})
    with pytest.raises(SlicekitError, match=r"trained for hidden size 8.*hidden size 576"):
        load_policy(path, hidden_size=576)
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    for bad in (truncated, garbage):
        with pytest.raises(SlicekitError, match="not a readable safetensors"):
            load_policy(bad)
    with pytest.raises(SlicekitError, match="not found"):
        load_policy(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(SlicekitError, match="not a slicekit PruneNet policy"):
        load_policy(other)
    with pytest.raises(SlicekitError, match="JSON-serialisable"):
        save_policy(PolicyNetwork(8), tmp_path / "q.safetensors", {"bad": object()})
    with pytest.raises(SlicekitError, match="does not exist"):
        save_policy(PolicyNetwork(8), tmp_path / "no" / "p.safetensors")


# ----------------------------------------------------------------------------- baselines

def test_random_rows_is_seeded_sorted_and_unique():
    a, b, c = random_rows(100, 75, seed=3), random_rows(100, 75, seed=3), random_rows(100, 75, seed=4)
    _assert_sorted_unique(a, 75, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(SlicekitError):
        random_rows(10, 11)


def test_magnitude_rows_scores_the_whole_neuron_path():
    up = torch.ones(6, 4)
    up[[1, 4]] *= 3  # strong inputs ...
    assert magnitude_rows(up, None, 2).tolist() == [1, 4]
    down = torch.ones(4, 6)
    down[:, 4] = 0  # ... but neuron 4 writes nothing
    assert magnitude_rows(up, down, 2).tolist() == [0, 1]  # tie among the rest → lowest index
    gate = torch.ones(6, 4)
    gate[5] *= 10
    assert magnitude_rows([gate, up], down, 2).tolist() == [1, 5]
    with pytest.raises(SlicekitError, match="columns"):
        magnitude_rows(up, torch.ones(4, 5), 2)
    with pytest.raises(SlicekitError, match="different numbers of rows"):
        magnitude_rows([up, torch.ones(5, 4)], None, 2)
