"""Non-uniform sparsity allocation (OWL): the rule, the exact counts, the solvers' counts, the pre-pass."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from obsdiff.allocation import allocate, allocation_groups, column_norms, owl_allocation
from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.prompts import tiny_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.config import ConfigError, check_fields
from obsdiff.hessian import DiagonalAccumulator, HessianAccumulator
from obsdiff.models.sd3 import SD3_TARGETS
from obsdiff.prune import Calibration, calibrate, prune_groupwise
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.solvers import Pattern, layer_solver
from obsdiff.solvers.dsnot import dsnot_solve
from obsdiff.solvers.magnitude import magnitude_solve
from obsdiff.solvers.obs import obs_solve, obs_solve_stacked, split_count
from obsdiff.solvers.owl import apportion, global_count, outlier_ratio, owl_sparsities
from obsdiff.solvers.wanda import wanda_solve


def make_calib(adapter, pipe, num_prompts=2, batch_size=2, steps=3, guidance=7.0):
    embeds = adapter.encode(pipe, tiny_prompts()[:num_prompts], guidance, batch_size)
    return Calibration(embeds, list(range(num_prompts)), steps, guidance, 32, batch_size,
                       timestep_weights("log_decrease", steps))  # fmt: skip


class NoProgress:
    def update(self, n):
        pass


# --- the rule -------------------------------------------------------------------------------------


def test_outlier_ratio_uses_one_mean_over_all_scores_of_the_group():
    a, b = torch.tensor([[1.0, 1.0, 1.0, 1.0, 16.0]]), torch.tensor([[1.0, 1.0]])
    # together: mean 22/7, threshold 5 * 22/7 = 15.71 -> only the 16 -> 1/7
    assert outlier_ratio([a, b], 5.0) == pytest.approx(1 / 7)
    # alone: mean 4, threshold 20 -> none; a lower M finds it
    assert outlier_ratio([a], 5.0) == 0.0
    assert outlier_ratio([a], 3.0) == pytest.approx(1 / 5)


def test_owl_rule_matches_the_reference_rule_when_nothing_is_clipped():
    # D = 2λ (LOD − min) / (max − min) = [0, 0.16, 0.08]; S_l = S − (D_l − mean D)
    s = owl_sparsities([0.1, 0.3, 0.2], [10, 10, 10], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.42, 0.50], abs=1e-12)


def test_owl_rule_clips_to_lambda_and_keeps_the_mean():
    # one outlier-heavy block: the reference rule gives it 0.5 − 0.16 + 0.04 = 0.38 < S − λ
    s = owl_sparsities([0.0, 0.0, 0.0, 1.0], [1, 1, 1, 1], 0.5, 0.08)
    assert s[3] == pytest.approx(0.42)  # clipped to S − λ
    assert s[:3] == pytest.approx([1.58 / 3] * 3)  # the others absorb it: mean stays 0.5
    assert sum(s) / 4 == pytest.approx(0.5, abs=1e-12)


def test_owl_rule_weights_the_mean_by_parameters():
    # sizes 1 and 3: unclipped c = 0.12 would give 0.62 > 0.58; clipped, 0.58 + 3 x = 2 -> x = 1.42/3
    s = owl_sparsities([0.0, 1.0], [1, 3], 0.5, 0.08)
    assert s == pytest.approx([0.58, 1.42 / 3], abs=1e-12)
    assert (s[0] * 1 + s[1] * 3) / 4 == pytest.approx(0.5, abs=1e-12)


def test_equal_outliers_or_zero_lambda_give_the_uniform_split():
    assert owl_sparsities([0.2, 0.2, 0.2], [3, 5, 7], 0.6, 0.08) == [0.6, 0.6, 0.6]
    assert owl_sparsities([0.1, 0.5], [3, 5], 0.6, 0.0) == [0.6, 0.6]


def test_apportion_hand_case_largest_remainder_ties_to_the_first():
    assert apportion([2.5, 2.5, 1.0], [5, 5, 5], 6) == [3, 2, 1]
    with pytest.raises(ValueError, match="cannot apportion"):
        apportion([1.0, 1.0], [5, 5], 7)


@pytest.mark.parametrize("seed", range(20))
def test_counts_hit_the_global_target_exactly_within_lambda(seed):
    rng = random.Random(seed)
    num = rng.randint(2, 30)
    sizes = [rng.randint(1, 5000) for _ in range(num)]
    lod = [rng.random() * 0.05 for _ in range(num)]
    target, lam = rng.choice([0.3, 0.5, 0.7, 0.9]), rng.choice([0.02, 0.08, 0.2])
    s = owl_sparsities(lod, sizes, target, lam)
    lo, hi = max(0.0, target - lam), min(1.0, target + lam)
    assert all(lo - 1e-12 <= x <= hi + 1e-12 for x in s)
    counts = apportion([x * n for x, n in zip(s, sizes, strict=True)], sizes, global_count(target, sizes))
    total = sum(sizes)
    assert sum(counts) == math.floor(target * total + 0.5)  # exact, integer
    for k, n, x in zip(counts, sizes, s, strict=True):
        assert 0 <= k <= n and abs(k - x * n) < 1  # within one weight of the real share
        assert lo - 1 / n <= k / n <= hi + 1 / n
    assert abs(sum(counts) - target * total) <= 0.5 + 1e-9  # halves round up


# --- exact counts in the solvers ---------------------------------------------------------------


def _problem(rows=6, cols=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(64, cols, generator=g)
    return W, 2 * X.T @ X / 64


def test_split_count_partitions_add_up():
    for count in (0, 1, 7, 59, 120):
        parts = [split_count(count, 20, i, min(i + 8, 20)) for i in range(0, 20, 8)]
        assert sum(parts) == count and max(parts) - min(parts) <= math.ceil(count * 8 / 20)


@pytest.mark.parametrize("count", [0, 1, 37, 59, 119, 120])
def test_obs_removes_exactly_count_spread_over_column_blocks(count):
    W, H = _problem()
    res = obs_solve(W, H, Pattern("unstructured", ratio=count / 120, count=count), block_size=8)
    assert int(res.mask.sum()) == count
    for i1 in range(0, 20, 8):  # each column block carries its integer share
        assert int(res.mask[:, i1 : i1 + 8].sum()) == split_count(count, 20, i1, min(i1 + 8, 20))
    assert int((res.weight == 0).sum()) == count  # random W: no other zeros


@pytest.mark.parametrize("count", [0, 1, 37, 59, 119])
def test_baselines_remove_exactly_count(count):
    W, H = _problem()
    pattern = Pattern("unstructured", ratio=count / 120, count=count)
    assert int(magnitude_solve(W, H, pattern).mask.sum()) == count
    wanda = wanda_solve(W, H, pattern).mask
    assert int(wanda.sum()) == count
    assert [int(r) for r in wanda.sum(1)] == [split_count(count, 6, r, r + 1) for r in range(6)]
    mean, var = torch.randn(20).abs(), torch.rand(20) + 0.1
    dsnot = dsnot_solve(W, H, pattern, mean=mean, var=var).mask  # swaps keep every row's count
    assert [int(r) for r in dsnot.sum(1)] == [split_count(count, 6, r, r + 1) for r in range(6)]


def test_count_is_per_layer_and_refused_where_it_cannot_hold():
    W, H = _problem()
    with pytest.raises(ValueError, match="one by one"):
        obs_solve_stacked([W, W.clone()], H, Pattern("unstructured", 0.5, count=10))
    with pytest.raises(ValueError, match="pattern.count"):
        obs_solve(W, H, Pattern("unstructured", 0.5, count=121))


def test_count_none_keeps_the_ratio_rule_bit_for_bit():
    W, H = _problem()
    a = obs_solve(W, H, Pattern("unstructured", ratio=0.5), block_size=8)
    b = obs_solve(W, H, Pattern("unstructured", ratio=0.5, count=None), block_size=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


# --- the pre-pass and the allocation on the tiny pipeline ---------------------------------------


def test_diagonal_accumulator_is_the_hessian_diagonal():
    g = torch.Generator().manual_seed(0)
    full, diag = HessianAccumulator(5), DiagonalAccumulator(5)
    for alpha in (1.2, 0.9, 0.8):
        x = torch.randn(3, 7, 5, generator=g)
        full.add(x, alpha)
        diag.add(x, alpha)
    torch.testing.assert_close(diag.diag.float(), torch.diag(full.H), rtol=1e-5, atol=1e-6)


def _spec(pipe, ratio=0.5, granularity="block", blocks=None, lam=0.08):
    return SimpleNamespace(
        ratio=ratio, blocks=blocks, targets=list(SD3_TARGETS), allocation="owl",
        allocation_granularity=granularity, denoiser_config=dict(pipe.transformer.config),
        owl={"threshold_m": 5.0, "lam": lam},
    )  # fmt: skip


def test_uniform_allocation_runs_nothing():
    assert allocate(None, None, None, SimpleNamespace(allocation="uniform")) is None


def test_owl_allocation_on_the_tiny_pipeline_matches_a_hand_computation(tiny_pipe):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe)
    spec = _spec(pipe, ratio=0.6, lam=0.1)
    denoiser = pipe.transformer
    units = adapter.units(denoiser, None, spec.targets)
    groups = [g for unit in units for g in unit]
    # independent: full Hessians from the package capture, LOD from the concatenated block scores
    tracker = StepTracker(calib.timestep_weights)
    with capture_hessians(denoiser, groups, tracker) as hessians:
        calibrate(adapter, pipe, calib, tracker, NoProgress())
    norms = column_norms(adapter, pipe, calib, groups)
    for name, acc in hessians.items():
        torch.testing.assert_close(norms[name] ** 2, torch.diag(acc.H), rtol=1e-4, atol=1e-7)
    allocation = owl_allocation(adapter, pipe, calib, spec)
    blocks = allocation_groups(adapter, denoiser, spec)
    assert [label for label, _ in blocks] == [f"block {b}" for b in range(len(denoiser.transformer_blocks))]
    for (_, members), lod in zip(blocks, allocation.outlier_ratios, strict=True):
        flat = torch.cat([
            (denoiser.get_submodule(n).weight.abs() * torch.diag(hessians[n].H).sqrt()).flatten()
            for n in members
        ])  # fmt: skip
        assert lod == pytest.approx(float((flat > 5.0 * flat.mean()).float().mean()), abs=2 / flat.numel())
    sizes = [sum(allocation.sizes[n] for n in m) for _, m in blocks]
    assert allocation.sparsities == pytest.approx(owl_sparsities(allocation.outlier_ratios, sizes, 0.6, 0.1))
    total = sum(allocation.sizes.values())
    assert sum(allocation.counts.values()) == math.floor(0.6 * total + 0.5)
    assert len(set(round(s, 9) for s in allocation.sparsities)) > 1  # the blocks differ
    for (_, members), s in zip(blocks, allocation.sparsities, strict=True):  # one ratio per block
        for n in members:
            assert abs(allocation.counts[n] - s * allocation.sizes[n]) < 1


def test_layer_granularity_gives_every_target_layer_its_own_ratio(tiny_pipe):
    adapter, pipe = tiny_pipe
    allocation = owl_allocation(adapter, pipe, make_calib(adapter, pipe), _spec(pipe, granularity="layer"))
    assert allocation.groups == list(allocation.counts)  # one group per layer
    total = sum(allocation.sizes.values())
    assert sum(allocation.counts.values()) == math.floor(0.5 * total + 0.5)


def test_strategy_prunes_each_layer_to_its_allocated_count(tiny_pipe):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe)
    allocation = owl_allocation(adapter, pipe, calib, _spec(pipe, ratio=0.7, blocks=[0, 1]))
    base = Pattern("unstructured", ratio=0.7)
    strategy = LayerwiseStrategy(layer_solver("obs", "obs"), base, list(SD3_TARGETS), [0, 1],
                                 allocation.patterns(base))  # fmt: skip
    records = prune_groupwise(adapter, pipe, calib, strategy, num_packages=2)
    zeros = {n: int((pipe.transformer.get_submodule(n).weight == 0).sum()) for n in allocation.counts}
    assert zeros == allocation.counts
    assert {r.name for r in records} == set(allocation.counts)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["sparsity=nm", "sparsity.allocation=owl"], "sparsity.allocation"),
        (["sparsity=structured", "sparsity.allocation=owl"], "sparsity.allocation"),
        (["sparsity.allocation=owls"], "sparsity.allocation"),
        (["sparsity.allocation_granularity=head"], "sparsity.allocation_granularity"),
        (["sparsity.allocation=owl", "sparsity.owl.threshold_m=0"], "sparsity.owl.threshold_m"),
        (["sparsity.allocation=owl", "sparsity.owl.lam=-0.1"], "sparsity.owl.lam"),
    ],
)
def test_bad_allocation_configs_are_refused_naming_the_field(compose_cfg, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_fields(compose_cfg(*overrides))


def test_default_is_uniform_with_the_reference_owl_defaults(compose_cfg):
    cfg = compose_cfg()
    assert cfg.sparsity.allocation == "uniform" and cfg.sparsity.allocation_granularity == "block"
    assert (cfg.sparsity.owl.threshold_m, cfg.sparsity.owl.lam) == (5.0, 0.08)
    check_fields(compose_cfg("sparsity.allocation=owl"))  # unstructured: accepted
