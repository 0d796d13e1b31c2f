"""Timestep-weighted Hessian (docs/METHOD.md §2) and its schedules."""

import pytest
import torch

from obsdiff.calibration.timesteps import SCHEDULES, StepTracker, timestep_weights
from obsdiff.hessian import HessianAccumulator


def test_sqrt_alpha_scaling_equals_explicit_weighted_sum():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 5, 6, generator=g), a) for a in (1.2, 1.1, 0.9, 0.8)]  # (batch, tokens, cols)
    acc = HessianAccumulator(6)
    for x, a in batches:
        acc.add(x, a)
    explicit = sum(a * x.reshape(-1, 6).T @ x.reshape(-1, 6) for x, a in batches)
    norm = sum(a * x.shape[0] for x, a in batches)
    torch.testing.assert_close(acc.H, 2 * explicit / norm, rtol=1e-5, atol=1e-5)


def test_only_relative_weights_matter():
    x = torch.randn(2, 4, 3)
    y = torch.randn(2, 4, 3)
    a, b = HessianAccumulator(3), HessianAccumulator(3)
    a.add(x, 1.0), a.add(y, 2.0)
    b.add(x, 0.5), b.add(y, 1.0)
    torch.testing.assert_close(a.H, b.H)


def test_log_decrease_matches_method_values():
    w = timestep_weights("log_decrease", 25)
    assert [round(v, 4) for v in w[:3]] == [1.2, 1.1949, 1.1896]
    assert [round(v, 4) for v in w[-4:]] == [0.9723, 0.9365, 0.8861, 0.8]


@pytest.mark.parametrize(
    "name,first,last",
    [("uniform", 1, 1), ("linear_increase", 0.8, 1.2), ("linear_decrease", 1.2, 0.8),
     ("log_increase", 0.8, 1.2), ("log_decrease", 1.2, 0.8)],
)  # fmt: skip
def test_paper_schedules_endpoints(name, first, last):
    w = timestep_weights(name, 25)
    assert len(w) == 25
    assert w[0] == pytest.approx(first) and w[-1] == pytest.approx(last)


def test_log_increase_formula():
    w = timestep_weights("log_increase", 10, 0.5, 1.5)
    assert w[3] == pytest.approx(
        0.5 + torch.log(torch.tensor(4.0)).item() / torch.log(torch.tensor(10.0)).item()
    )


def test_unknown_schedule_lists_known():
    with pytest.raises(KeyError, match="log_decrease"):
        timestep_weights("cosine_up", 10)
    assert {"uniform", "linear_increase", "linear_decrease", "log_increase", "log_decrease"} <= set(SCHEDULES)


def test_tracker_advances_per_step_and_resets():
    tracker = StepTracker([3.0, 2.0, 1.0])
    assert tracker.alpha == 3.0
    tracker.callback(None, 0, None, {})
    tracker.callback(None, 1, None, {})
    assert tracker.alpha == 1.0
    tracker.callback(None, 2, None, {})
    with pytest.raises(RuntimeError, match="reset"):
        _ = tracker.alpha
    tracker.reset()
    assert tracker.alpha == 3.0


def test_moments_are_the_weighted_token_statistics():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 5, 3, generator=g) + 2.0, a) for a in (1.2, 0.8, 1.0)]  # (batch, tokens, cols)
    acc = HessianAccumulator(3)
    for x, a in batches:
        acc.add(x, a)
    mean, var = acc.moments()
    norm = sum(a * x.shape[0] for x, a in batches)
    sample_sum = sum(a * x.sum(dim=(0, 1)) for x, a in batches) / norm  # E_sample[Σ_t x_t]
    token_mean = sample_sum / 5
    token_sq = sum(a * (x**2).sum(dim=(0, 1)) for x, a in batches) / norm / 5
    torch.testing.assert_close(mean, sample_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, token_sq - token_mean**2, rtol=1e-4, atol=1e-5)
