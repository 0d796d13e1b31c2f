"""Baseline solvers (magnitude, Wanda, DSnoT, L1-norm) and obs_solve with a fixed mask."""

import pytest
import torch

from obsdiff.solvers.dsnot import dsnot_solve
from obsdiff.solvers.l1 import l1_ffn_columns, l1_heads
from obsdiff.solvers.magnitude import lowest_score_mask, magnitude_mask, magnitude_solve
from obsdiff.solvers.obs import Pattern, obs_solve, reconstruction_error
from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_mask, wanda_solve, wanda_solve_from_norms

HALF = Pattern("unstructured", ratio=0.5)
TWO_FOUR = Pattern("nm", n=2, m=4)


def correlated(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``W``, ``H = 2 XᵀX`` and the per-column mean and variance of the same correlated ``X``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    offset = 0.5 * torch.randn(cols, generator=g)  # nonzero input means
    X = (torch.randn(tokens, cols, generator=g) + offset) @ mix  # (tokens, cols)
    return W, 2 * X.T @ X, X.mean(0), X.var(0, unbiased=False)


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1, m).sum(-1)


def row_eps(W: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """DSnoT's objective per row: |ε_q| = |Σ_j (W − Ŵ)_qj μ_j|."""
    return (W * mean * mask).sum(1).abs()


def row_quad(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The exact error per row: ΔW_q H ΔW_qᵀ."""
    D = W * mask
    return ((D @ H) * D).sum(1)


# --- magnitude -------------------------------------------------------------------------------


def test_magnitude_exact_count_and_deterministic_ties():
    W = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for ratio in (0.0, 0.3, 0.5, 0.77, 1.0):
        mask = magnitude_mask(W, Pattern("unstructured", ratio=ratio))
        assert int(mask.sum()) == int(60 * ratio)
        if 0 < ratio < 1:
            assert W.abs()[mask].max() <= W.abs()[~mask].min()
    ties = magnitude_mask(torch.ones(4, 4), HALF)
    assert ties.flatten().tolist() == [True] * 8 + [False] * 8  # equal |W|: lower flat index first


def test_magnitude_nm_pattern():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = magnitude_mask(W, Pattern("nm", n=n, m=m))
        assert torch.all(group_counts(mask, m) == n)
        groups = W.abs().reshape(8, -1, m)
        removed = mask.reshape(8, -1, m)
        largest_removed = groups.masked_fill(~removed, -1).amax(-1)
        assert torch.all(largest_removed <= groups.masked_fill(removed, 99).amin(-1))
    with pytest.raises(ValueError, match="divisible by M=4"):
        magnitude_mask(torch.randn(2, 6), TWO_FOUR)


def test_magnitude_solve_zeroes_without_update_and_keeps_dtype():
    W, H, _, _ = correlated(4, 8)
    W16 = W.half()
    res = magnitude_solve(W16, H, HALF)
    assert res.weight.dtype == torch.float16
    assert torch.equal(res.weight[~res.mask], W16[~res.mask])
    assert torch.all(res.weight[res.mask] == 0)
    assert res.damp == 0.0 and res.damp_frac == 0.0 and res.obs_loss != res.obs_loss  # nan


# --- Wanda -----------------------------------------------------------------------------------


def test_wanda_differs_from_magnitude_when_column_norms_differ():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # S = [10, 2, 3, 4]
    assert magnitude_mask(W, HALF).tolist() == [[True, True, False, False]]
    assert wanda_mask(W, norms, HALF).tolist() == [[False, True, True, False]]
    H = torch.diag(norms**2)  # sqrt(diag H) = norms
    assert torch.equal(wanda_solve(W, H, HALF).mask, wanda_mask(W, norms, HALF))


def test_wanda_equals_per_row_magnitude_with_equal_column_norms():
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    norms = torch.full((16,), 3.0)
    per_row_magnitude = lowest_score_mask(W.abs(), HALF, per_row=True)
    assert torch.equal(wanda_mask(W, norms, HALF), per_row_magnitude)
    assert torch.all(per_row_magnitude.sum(1) == 8)  # every row loses floor(cols · ratio)
    assert torch.equal(wanda_mask(W, norms, TWO_FOUR), magnitude_mask(W, TWO_FOUR))


def test_wanda_nm_pattern_exact_and_scale_free():
    W, H, _, _ = correlated(8, 32, seed=3)
    res = wanda_solve(W, H, TWO_FOUR)
    assert torch.all(group_counts(res.mask, 4) == 2)
    assert torch.equal(res.mask, res.weight == 0)
    assert torch.equal(wanda_solve(W, 7 * H, TWO_FOUR).mask, res.mask)
    assert torch.equal(wanda_solve(W, 7 * H, HALF).mask, wanda_solve(W, H, HALF).mask)
    norms = col_norms_from_hessian(H)
    assert torch.equal(wanda_solve_from_norms(W, norms, TWO_FOUR).mask, res.mask)


# --- DSnoT -----------------------------------------------------------------------------------


def test_dsnot_hand_computed_swaps():
    # One row, equal column norms: the Wanda start removes columns 0, 1; ε = 1·1 + 2·1 = 3.
    W = torch.tensor([[1.0, 2.0, -3.0, 4.0]])
    H = torch.eye(4)
    mean = torch.tensor([1.0, 1.0, 0.2, 1.0])  # contributions W μ = [1, 2, -0.6, 4]
    var = torch.ones(4)
    # Grow col 1 (largest W μ / v), prune col 2 (the only negative one): ε = 3 - 2 - 0.6 = 0.4 > 0.
    # Then no kept weight has a negative contribution left: the row stops.
    res = dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=0.0)
    assert res.mask.tolist() == [[True, False, True, False]]
    # A small input variance on col 0 makes it the grow choice: ε = 3 - 1 - 0.6 = 1.4.
    res = dsnot_solve(W, H, HALF, mean=mean, var=torch.tensor([0.1, 1, 1, 1]), update_threshold=0.0)
    assert res.mask.tolist() == [[False, True, True, False]]
    # |ε| = 3 is below the threshold: nothing moves; a swap that flips the sign of ε is refused.
    assert dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=5.0).mask.tolist() == [
        [True, True, False, False]
    ]
    flip = torch.tensor([1.0, 1.0, 1.0, 1.0])  # ε = 3 - 2 - 3 = -2 would flip the sign
    assert dsnot_solve(W, H, HALF, mean=flip, var=var, update_threshold=0.0).mask.tolist() == [
        [True, True, False, False]
    ]
    no_sign_check = dsnot_solve(W, H, HALF, mean=flip, var=var, update_threshold=0.0, keep_error_sign=False)
    assert no_sign_check.mask.tolist() == [[True, False, True, False]]  # reference's unstructured default


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("init", ["wanda", "magnitude"])
def test_dsnot_keeps_pattern_never_increases_its_objective_and_is_deterministic(pattern, init):
    for seed in range(4):
        W, H, mean, var = correlated(16, 32, seed=seed)
        norms = col_norms_from_hessian(H)
        start = wanda_mask(W, norms, pattern) if init == "wanda" else magnitude_mask(W, pattern)
        res = dsnot_solve(W, H, pattern, mean=mean, var=var, init=init, update_threshold=0.0)
        assert torch.equal(res.mask.sum(1), start.sum(1))  # same count per row
        if pattern.kind == "nm":
            assert torch.all(group_counts(res.mask, 4) == 2)
        assert torch.equal(res.mask, res.weight == 0)
        assert torch.all(row_eps(W, res.mask, mean) <= row_eps(W, start, mean) + 1e-5)
        again = dsnot_solve(W, H, pattern, mean=mean, var=var, init=init, update_threshold=0.0)
        assert torch.equal(again.mask, res.mask)


def test_dsnot_objective_is_not_the_quadratic_error_but_the_guard_is():
    grew = 0
    for seed in range(4):
        W, H, mean, var = correlated(16, 32, seed=seed)
        start = wanda_mask(W, col_norms_from_hessian(H), HALF)
        plain = dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=0.0)
        grew += int((row_quad(W, plain.mask, H) > row_quad(W, start, H) * (1 + 1e-6)).sum())
        guarded = dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=0.0, exact_guard=True)
        assert torch.all(row_quad(W, guarded.mask, H) <= row_quad(W, start, H) * (1 + 1e-5))
        assert torch.all(row_eps(W, guarded.mask, mean) <= row_eps(W, start, mean) + 1e-5)
    assert grew > 0  # DSnoT only sees the means: some rows' exact error tr(ΔW H ΔWᵀ) does grow


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["unstructured", "2:4"])
def test_dsnot_rows_are_independent_and_hessian_scale_free(pattern):
    W, H, mean, var = correlated(6, 16, seed=7)
    res = dsnot_solve(W, H, pattern, mean=mean, var=var, update_threshold=0.0)
    one_by_one = [
        dsnot_solve(W[q : q + 1], H, pattern, mean=mean, var=var, update_threshold=0.0).mask for q in range(6)
    ]
    assert torch.equal(res.mask, torch.cat(one_by_one))
    scaled = dsnot_solve(W, 7 * H, pattern, mean=mean, var=var, update_threshold=0.0)
    assert torch.equal(scaled.mask, res.mask)


def test_dsnot_refines_and_rejects_bad_inputs():
    W, H, mean, var = correlated(16, 32, seed=5)
    start = wanda_mask(W, col_norms_from_hessian(H), HALF)
    res = dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=0.0)
    assert not torch.equal(res.mask, start)  # swaps happen on this data
    assert row_eps(W, res.mask, mean).sum() < row_eps(W, start, mean).sum()
    assert torch.equal(dsnot_solve(W, H, HALF, mean=mean, var=var, max_cycles=0).mask, start)
    with pytest.raises(ValueError, match="known"):
        dsnot_solve(W, H, HALF, mean=mean, var=var, init="sparsegpt")
    with pytest.raises(ValueError, match="shape"):
        dsnot_solve(W, H, HALF, mean=mean[:4], var=var)


# --- L1-norm structured ----------------------------------------------------------------------


def test_l1_ffn_columns_smallest_norm_sorted():
    # column L1 norms 2, .2, 10, .4, .6
    W_down = torch.tensor([[1.0, -0.1, 5.0, 0.2, 0.3], [-1.0, 0.1, 5.0, -0.2, 0.3]])
    assert l1_ffn_columns(W_down, 3).tolist() == [1, 3, 4]
    assert l1_ffn_columns(W_down, 0).tolist() == []
    assert l1_ffn_columns(torch.ones(2, 4), 2).tolist() == [0, 1]  # ties: lower index
    with pytest.raises(ValueError):
        l1_ffn_columns(W_down, 6)


def test_l1_heads_sum_over_projections_and_tie_break():
    head_dim = 2
    img = torch.tensor([[1.0, 1.0, 0.1, 0.1, 3.0, 3.0, 1.0, 1.0]])  # per head 2, .2, 6, 2
    txt = torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]])  # per head 0, 10, 0, 0
    assert l1_heads([img], head_dim, 2) == [1, 0]  # head 0 and 3 tie at 2: lower index first
    assert l1_heads([img, txt], head_dim, 3) == [0, 3, 2]  # totals 2, 10.2, 6, 2
    with pytest.raises(ValueError):
        l1_heads([img, torch.ones(1, 6)], head_dim, 1)


# --- OBS with a fixed mask, and OBS against the baselines -------------------------------------


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["unstructured", "2:4"])
def test_obs_with_its_own_mask_reproduces_itself(pattern):
    W, H, _, _ = correlated(8, 32, seed=6)
    ref = obs_solve(W, H, pattern, block_size=16)
    res = obs_solve(W, H, pattern, block_size=16, mask=ref.mask)
    assert torch.equal(res.mask, ref.mask)
    torch.testing.assert_close(res.weight, ref.weight, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_obs_update_on_a_baseline_mask_beats_plain_masking(seed):
    W, H, _, _ = correlated(16, 32, seed=seed)
    for pattern in (HALF, TWO_FOUR):
        for plain in (magnitude_solve(W, H, pattern), wanda_solve(W, H, pattern)):
            res = obs_solve(W, H, pattern, mask=plain.mask)
            assert torch.equal(res.mask, plain.mask)
            assert reconstruction_error(W, res.weight, H) < reconstruction_error(W, plain.weight, H)


@pytest.mark.parametrize("seed", range(3))
def test_obs_beats_magnitude_and_wanda(seed):
    W, H, _, _ = correlated(16, 32, seed=seed)
    for pattern in (HALF, TWO_FOUR):
        obs = reconstruction_error(W, obs_solve(W, H, pattern).weight, H)
        assert obs < reconstruction_error(W, magnitude_solve(W, H, pattern).weight, H)
        assert obs < reconstruction_error(W, wanda_solve(W, H, pattern).weight, H)


def test_unknown_options_raise_type_error():
    W, H, mean, var = correlated(4, 8)
    with pytest.raises(TypeError):
        magnitude_solve(W, H, HALF, damp_frac=0.01)
    with pytest.raises(TypeError):
        wanda_solve(W, H, HALF, block_size=128)
    with pytest.raises(TypeError):
        wanda_solve_from_norms(W, torch.ones(8), HALF, damp_frac=0.01)
    with pytest.raises(TypeError):
        dsnot_solve(W, H, HALF, mean=mean, var=var, damp_frac=0.01)
    with pytest.raises(TypeError):
        dsnot_solve(W, H, HALF)  # mean and var are required
    with pytest.raises(TypeError):
        obs_solve(W, H, HALF, update_threshold=0.1)
    with pytest.raises(ValueError, match="mask shape"):
        obs_solve(W, H, HALF, mask=torch.zeros(4, 4, dtype=torch.bool))
