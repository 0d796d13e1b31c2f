"""The OBS solver against the behaviours pinned in docs/METHOD.md §1."""

import logging

import pytest
import torch
from synthetic import correlated

from obsdiff.solvers import CholeskyError, Pattern, obs_solve, reconstruction_error


def magnitude(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return W.masked_fill(mask, 0)


def test_identity_hessian_gives_magnitude_mask_and_no_compensation():
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    res = obs_solve(W, torch.eye(4), Pattern("unstructured", ratio=0.5))
    flat = W.abs().flatten()
    thresh = torch.sort(flat)[0][int(flat.numel() * 0.5)]
    assert torch.equal(res.mask, W.abs() <= thresh)
    assert torch.equal(res.weight[~res.mask], W[~res.mask])
    assert torch.all(res.weight[res.mask] == 0)


def test_reference_threshold_keeps_ties_rule_and_exact_count_option():
    W = torch.arange(1, 25, dtype=torch.float32).reshape(6, 4)
    ref = obs_solve(W, torch.eye(4), Pattern("unstructured", ratio=0.5))
    exact = obs_solve(W, torch.eye(4), Pattern("unstructured", ratio=0.5, exact_count=True))
    assert int(ref.mask.sum()) == 13  # `<=` the value at sorted position floor(24 * 0.5)
    assert int(exact.mask.sum()) == 12


def test_scaling_the_hessian_changes_nothing():
    W, H, _ = correlated(8, 16)
    for pattern in (Pattern("unstructured", ratio=0.5), Pattern("nm", n=2, m=4)):
        a = obs_solve(W, H, pattern, block_size=8)
        b = obs_solve(W, 7 * H, pattern, block_size=8)
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_nm_leaves_exactly_n_zeros_in_every_group():
    W, H, _ = correlated(16, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        res = obs_solve(W, H, Pattern("nm", n=n, m=m), block_size=16)
        zeros = (res.weight == 0).reshape(16, 32 // m, m).sum(-1)
        assert torch.all(zeros == n)
        assert torch.equal(res.mask, res.weight == 0)


def test_nm_rejects_widths_not_divisible_by_m():
    W, H, _ = correlated(4, 10)
    with pytest.raises(ValueError, match="divisible by M=4"):
        obs_solve(W, H, Pattern("nm", n=2, m=4))


def test_lazy_block_updates_are_exact():
    W, H, _ = correlated(8, 32, seed=3)
    a = obs_solve(W, H, Pattern("nm", n=2, m=4), block_size=4)
    b = obs_solve(W, H, Pattern("nm", n=2, m=4), block_size=128)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_obs_error_not_worse_than_magnitude(seed):
    W, H, X = correlated(32, 64, seed=seed)
    for pattern in (Pattern("unstructured", ratio=0.5), Pattern("nm", n=2, m=4)):
        res = obs_solve(W, H, pattern, block_size=32)
        obs_err = torch.sum(((W - res.weight) @ X.T) ** 2)
        mag_mask = torch.zeros_like(res.mask)
        if pattern.kind == "nm":
            idx = W.abs().reshape(32, 16, 4).topk(2, dim=-1, largest=False)[1]
            mag_mask = mag_mask.reshape(32, 16, 4).scatter(-1, idx, True).reshape(32, 64)
        else:
            mag_mask.view(-1)[W.abs().flatten().argsort()[: int(res.mask.sum())]] = True
        mag_err = torch.sum(((W - magnitude(W, mag_mask)) @ X.T) ** 2)
        assert obs_err < mag_err
        assert reconstruction_error(W, res.weight, H) < reconstruction_error(W, magnitude(W, mag_mask), H)


def test_removing_one_weight_matches_closed_form_obs():
    W, H, _ = correlated(1, 6, seed=4)
    W[0, 0] = 1e-3  # the least salient weight sits in the first column
    res = obs_solve(W, H, Pattern("unstructured", ratio=1 / 6, exact_count=True), damp_frac=0.01)
    assert res.mask.nonzero().tolist() == [[0, 0]]
    Hd = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(6)
    Hinv = torch.linalg.inv(Hd.double())
    expected = W.double() - W[0, 0].double() / Hinv[0, 0] * Hinv[0:1, :]  # δ = -w_q / [H⁻¹]_qq · H⁻¹[q, :]
    torch.testing.assert_close(res.weight.double(), expected, rtol=1e-4, atol=1e-6)


def test_dead_inputs_are_zeroed():
    W, H, _ = correlated(4, 8)
    H[2, :] = 0
    H[:, 2] = 0
    res = obs_solve(W, H, Pattern("unstructured", ratio=0.25))
    assert torch.all(res.weight[:, 2] == 0)
    assert torch.isfinite(res.weight).all()


def test_cholesky_retry_grows_damping_and_logs(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, -0.05]))
    W = torch.randn(2, 3)
    with caplog.at_level(logging.WARNING):
        res = obs_solve(W, H, Pattern("unstructured", ratio=0.3), damp_frac=0.01, layer="blk.to_q")
    assert res.damp_frac == pytest.approx(0.1)
    assert "blk.to_q" in caplog.text and "Cholesky failed" in caplog.text


def test_cholesky_failure_raises_with_advice():
    with pytest.raises(CholeskyError, match="damp_frac"):
        obs_solve(torch.randn(2, 3), -torch.eye(3), Pattern("unstructured", ratio=0.5), layer="blk.ff")


def test_result_is_cast_back_and_input_untouched():
    W, H, _ = correlated(4, 8)
    W16 = W.half()
    before = W16.clone()
    res = obs_solve(W16, H, Pattern("unstructured", ratio=0.5))
    assert res.weight.dtype == torch.float16
    assert torch.equal(W16, before)


def test_reconstruction_error_is_relative():
    W, H, _ = correlated(4, 8)
    assert reconstruction_error(W, W, H) == 0
    assert reconstruction_error(W, torch.zeros_like(W), H) == pytest.approx(1.0)


def test_a_shared_factor_gives_each_layer_of_a_group_its_own_solve_bit_for_bit():
    from obsdiff.solvers import layer_solver
    from obsdiff.solvers.obs import factorize

    torch.manual_seed(0)
    X = torch.randn(512, 96)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / 512
    layers = [torch.randn(64, 96) for _ in range(3)]  # q, k, v on one input
    for pattern in (Pattern("unstructured", 0.5), Pattern("nm", n=2, m=4)):
        factor = factorize(H, 0.01)
        for W in layers:
            alone, shared = (
                obs_solve(W, H, pattern, 0.01, 32),
                obs_solve(W, H, pattern, 0.01, 32, factor=factor),
            )
            assert torch.equal(alone.weight, shared.weight) and torch.equal(alone.mask, shared.mask)
            assert (alone.damp, alone.damp_frac) == (shared.damp, shared.damp_frac)
    for mask, update in [("obs", "obs"), ("wanda", "obs"), ("obs", "none")]:
        solve = layer_solver(mask, update, block_size=32)
        factor = solve.factorize(H)
        for W in layers:
            a = solve(W, H, Pattern("unstructured", 0.5))
            b = solve(W, H, Pattern("unstructured", 0.5), factor=factor)
            assert torch.equal(a.weight, b.weight)
    assert layer_solver("magnitude", "none").factorize(H) is None  # no OBS step: nothing to share


def test_the_strategy_factorises_each_input_group_once():
    from obsdiff.hessian import HessianAccumulator
    from obsdiff.pruners.layerwise import LayerwiseStrategy
    from obsdiff.solvers import layer_solver

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({n: torch.nn.Linear(32, 16) for n in ("q", "k", "v", "o")})
    solve, calls = layer_solver("obs", "obs", block_size=16), []
    factorize = solve.factorize
    solve.factorize = lambda H, layer="": calls.append(layer) or factorize(H, layer=layer)
    qkv, o = HessianAccumulator(32), HessianAccumulator(32)
    qkv.add(torch.randn(4, 10, 32), 1.0), o.add(torch.randn(4, 10, 32), 1.0)
    hessians = {"q": qkv, "k": qkv, "v": qkv, "o": o}
    strategy = LayerwiseStrategy(solve, Pattern("unstructured", 0.5), ["q", "k", "v", "o"])
    records = strategy.prune_unit(model, [("q", "k", "v"), ("o",)], hessians, 0)
    assert calls == ["q", "o"] and [r.name for r in records] == ["q", "k", "v", "o"]
