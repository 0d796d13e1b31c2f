"""SparseSwaps mask refinement: exact error never rises, counts kept, optimal and 1-swap-optimal swaps."""

import itertools

import pytest
import torch
from synthetic import correlated

from obsdiff.solvers import REFINES, layer_solver
from obsdiff.solvers.dsnot import dsnot_solve
from obsdiff.solvers.magnitude import apply_mask, magnitude_mask
from obsdiff.solvers.obs import Pattern, obs_solve, obs_solve_stacked
from obsdiff.solvers.swaps import refine_swaps
from obsdiff.solvers.wanda import col_norms_from_hessian, wanda_mask

HALF = Pattern("unstructured", ratio=0.5)
TWO_FOUR = Pattern("nm", n=2, m=4)
PATTERNS = [HALF, Pattern("unstructured", ratio=0.3), TWO_FOUR, Pattern("nm", n=4, m=8)]
IDS = ["u50", "u30", "2:4", "4:8"]


def row_error(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The mask-only error per row, δ_q H δ_qᵀ with δ = W ⊙ M, in fp64 (independent of the solver)."""
    D = (W * mask).double()
    return ((D @ H.double()) * D).sum(1)


def adversarial(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearly duplicated and anti-correlated input columns, a few dead ones, weights of mixed scale:
    the cross terms H_ij dominate, so per-weight scores (magnitude, Wanda) are far from optimal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, cols // 2, generator=g)
    X = torch.cat([base, -base + 1e-3 * torch.randn(64, cols // 2, generator=g)], dim=1)  # (tokens, cols)
    X[:, :2] = 0  # dead inputs
    W = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols)[torch.randperm(cols, generator=g)]
    return W, 2 * X.T @ X


def start_masks(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, seed: int) -> dict[str, torch.Tensor]:
    scores = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed))
    return {
        "wanda": wanda_mask(W, col_norms_from_hessian(H), pattern),
        "magnitude": magnitude_mask(W, pattern),  # layer-wide: unequal row counts
        "random": wanda_mask(scores, torch.ones(W.shape[1]), pattern),
    }


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1, m).sum(-1)


def all_swaps(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, pattern: Pattern, q: int):
    """Brute force: the exact error change of every allowed 1-swap of row ``q``, ``{(i, j): change}``."""
    size = pattern.m if pattern.kind == "nm" else W.shape[1]
    before = row_error(W[q : q + 1], mask[q : q + 1], H)[0]
    out = {}
    for i, j in itertools.product(range(W.shape[1]), repeat=2):
        if mask[q, i] and not mask[q, j] and i // size == j // size:
            swapped = mask[q : q + 1].clone()
            swapped[0, i], swapped[0, j] = False, True
            out[(i, j)] = float(row_error(W[q : q + 1], swapped, H)[0] - before)
    return out


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
@pytest.mark.parametrize("problem", ["correlated", "adversarial"])
def test_exact_error_never_rises_and_counts_are_kept(pattern, problem):
    for seed in range(3):
        W, H = correlated(12, 32, seed=seed)[:2] if problem == "correlated" else adversarial(12, 32, seed)
        W0 = W.clone()
        for name, start in start_masks(W, H, pattern, seed).items():
            refined = refine_swaps(W, H, start, pattern)
            before, after = row_error(W, start, H), row_error(W, refined, H)
            assert torch.all(after <= before * (1 + 1e-12)), (name, seed)  # every row
            assert after.sum() < before.sum(), (name, seed)  # and it does improve
            assert refined.dtype == torch.bool and torch.equal(refined.sum(1), start.sum(1))
            if pattern.kind == "nm":
                assert torch.equal(group_counts(refined, pattern.m), group_counts(start, pattern.m))
        assert torch.equal(W, W0)


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["u50", "2:4"])
def test_error_is_monotone_after_every_iteration(pattern):
    W, H = adversarial(10, 24, seed=4)
    start = magnitude_mask(W, pattern)
    errors = [row_error(W, refine_swaps(W, H, start, pattern, max_iterations=t), H) for t in range(12)]
    assert torch.equal(refine_swaps(W, H, start, pattern, max_iterations=0), start)
    for prev, cur in itertools.pairwise(errors):
        assert torch.all(cur <= prev * (1 + 1e-12))
    strict = [int((cur < prev).sum()) for prev, cur in itertools.pairwise(errors)]
    assert strict[0] > 0 and sum(strict) > strict[0]  # rows keep improving after the first swap


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["u50", "2:4"])
def test_one_iteration_takes_the_brute_force_best_swap(pattern):
    for seed in range(4):
        W, H = correlated(3, 8, seed=seed)[:2]
        start = start_masks(W, H, pattern, seed)["random"]
        once = refine_swaps(W, H, start, pattern, max_iterations=1)
        for q in range(3):
            changes = all_swaps(W, start, H, pattern, q)
            (i, j), best = min(changes.items(), key=lambda kv: kv[1])
            done = torch.nonzero(once[q] != start[q]).flatten().tolist()
            if best < 0:  # the optimal pair, cross term included, is swapped
                assert sorted(done) == sorted([i, j]) and not once[q, i] and once[q, j]
            else:
                assert done == []


@pytest.mark.parametrize(
    "pattern", [HALF, TWO_FOUR, Pattern("unstructured", ratio=0.25)], ids=["u50", "2:4", "u25"]
)
def test_converges_to_a_one_swap_optimal_mask(pattern):
    W, H = adversarial(6, 12, seed=2)
    start = magnitude_mask(W, pattern)
    refined = refine_swaps(W, H, start, pattern, max_iterations=1000)
    errors = row_error(W, refined, H)
    for q in range(6):
        changes = all_swaps(W, refined, H, pattern, q)
        assert changes and min(changes.values()) >= -1e-9 * float(errors[q])  # no improving swap left


def test_cross_term_matters_a_diagonal_rule_would_pick_another_pair():
    # Inputs 0 and 1 are duplicates (H_01 = 1): growing w_0 back while pruning its twin w_1 leaves
    # almost no error, which only the cross term -2 w_i w_j H_ij sees.
    W = torch.tensor([[1.0, 0.2, 0.5]])
    H = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    start = torch.tensor([[True, False, False]])
    changes = all_swaps(W, start, H, HALF, 0)
    assert changes == pytest.approx({(0, 1): 0.04 - 1, (0, 2): 0.25 - 1})
    c = (W * start) @ H  # without the cross term (0, 1) would look worse than (0, 2):
    diagonal = {(i, j): float(-2 * W[0, i] * c[0, i] + W[0, i] ** 2 * H[i, i] + 2 * W[0, j] * c[0, j]
                              + W[0, j] ** 2 * H[j, j]) for i, j in changes}  # fmt: skip
    assert min(diagonal, key=diagonal.get) == (0, 2)
    refined = refine_swaps(W, H, start, HALF, max_iterations=1)
    assert refined.tolist() == [[False, True, False]]
    assert float(row_error(W, refined, H)[0]) == pytest.approx(0.04)


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["u50", "2:4"])
def test_refined_mask_beats_wanda_magnitude_and_obs_masks(pattern):
    W, H, _ = correlated(32, 64, seed=11)
    obs_mask = obs_solve(W, H, pattern).mask
    for start in (wanda_mask(W, col_norms_from_hessian(H), pattern), magnitude_mask(W, pattern), obs_mask):
        refined = refine_swaps(W, H, start, pattern)
        assert row_error(W, refined, H).sum() < 0.9 * row_error(W, start, H).sum()  # > 10% lower


def dsnot_problem(seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs with nonzero means (DSnoT's statistic) and correlated columns."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(16, 32, generator=g)
    mix = torch.randn(32, 32, generator=g) / 32**0.5 + torch.eye(32)
    X = (torch.randn(256, 32, generator=g) + 0.5 * torch.randn(32, generator=g)) @ mix  # (tokens, cols)
    return W, 2 * X.T @ X, X.mean(0), X.var(0, unbiased=False)


def test_dsnot_proxy_can_raise_the_exact_error_swaps_never_do():
    raised = 0
    for seed in range(4):
        W, H, mean, var = dsnot_problem(seed)
        start = wanda_mask(W, col_norms_from_hessian(H), HALF)  # DSnoT's own start mask
        dsnot = dsnot_solve(W, H, HALF, mean=mean, var=var, update_threshold=0.0).mask
        raised += int((row_error(W, dsnot, H) > row_error(W, start, H) * (1 + 1e-6)).sum())
        swaps = refine_swaps(W, H, start, HALF)
        assert torch.all(row_error(W, swaps, H) <= row_error(W, start, H) * (1 + 1e-12))
        assert row_error(W, swaps, H).sum() < row_error(W, dsnot, H).sum()
    assert raised > 0  # DSnoT only sees the input means: some rows' exact error grows


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR], ids=["u50", "2:4"])
def test_chunks_rows_and_hessian_scale_change_nothing(pattern):
    W, H = correlated(9, 40, seed=6)[:2]
    start = magnitude_mask(W, pattern)
    refined = refine_swaps(W, H, start, pattern)
    for chunk_elements in (1, 7, 500):  # one row and one removed weight at a time, ..., several rows
        assert torch.equal(refine_swaps(W, H, start, pattern, chunk_elements=chunk_elements), refined)
    one_by_one = [refine_swaps(W[q : q + 1], H, start[q : q + 1], pattern) for q in range(9)]
    assert torch.equal(torch.cat(one_by_one), refined)
    assert torch.equal(refine_swaps(W, 4 * H, start, pattern), refined)  # a power of two: exact


def test_bad_inputs_are_refused():
    W, H = correlated(4, 8)[:2]
    start = magnitude_mask(W, HALF)
    with pytest.raises(ValueError, match="H has shape"):
        refine_swaps(W, H[:4, :4], start, HALF)
    with pytest.raises(ValueError, match="mask shape"):
        refine_swaps(W, H, start[:2], HALF)
    with pytest.raises(ValueError, match="max_iterations"):
        refine_swaps(W, H, start, HALF, max_iterations=-1)
    with pytest.raises(ValueError, match="divisible"):
        refine_swaps(W, H, start, Pattern("nm", n=2, m=3))
    nothing = torch.zeros_like(start)  # nothing removed, or everything: no swap exists
    assert torch.equal(refine_swaps(W, H, nothing, HALF), nothing)
    assert torch.equal(refine_swaps(W, H, ~nothing, HALF), ~nothing)


# --- layer_solver wiring --------------------------------------------------------------------------


def test_layer_solver_refines_the_chosen_mask_before_the_update():
    W, H, _ = correlated(8, 32, seed=2)
    wanda = wanda_mask(W, col_norms_from_hessian(H), HALF)
    refined = refine_swaps(W, H, wanda, HALF, max_iterations=5)
    plain = layer_solver("wanda", "none", refine="swaps", swaps={"max_iterations": 5})(W, H, HALF)
    assert torch.equal(plain.mask, refined) and torch.equal(plain.weight, apply_mask(W, refined).weight)
    obs = layer_solver("wanda", "obs", refine="swaps", swaps={"max_iterations": 5})(W, H, HALF)
    expected = obs_solve(W, H, HALF, mask=refined)
    assert torch.equal(obs.mask, refined) and torch.equal(obs.weight, expected.weight)
    obs_mask = obs_solve(W, H, HALF).mask
    both = layer_solver("obs", "obs", refine="swaps")(W, H, HALF)  # OBS mask, refined, compensated
    assert torch.equal(both.mask, refine_swaps(W, H, obs_mask, HALF))
    unrefined = layer_solver("wanda", "none")(W, H, HALF)  # refine=none: the mask as chosen
    assert torch.equal(unrefined.mask, wanda)
    assert list(REFINES) == ["none", "swaps"]
    with pytest.raises(KeyError, match="swaps"):
        layer_solver("wanda", "none", refine="swap")


@pytest.mark.parametrize("mask", ["obs", "magnitude"])
def test_stacked_obs_refines_every_layer_then_compensates_in_one_sweep(mask):
    _, H, X = correlated(1, 32, seed=3)
    g = torch.Generator().manual_seed(5)
    Ws = [torch.randn(r, 32, generator=g) for r in (5, 9)]
    solve = layer_solver(mask, "obs", refine="swaps")
    stacked = solve.stacked(Ws, H, TWO_FOUR, layers=["a", "b"], factor=solve.factorize(H))
    separate = [solve(W, H, TWO_FOUR, layer=n) for W, n in zip(Ws, ["a", "b"], strict=True)]
    for s, p in zip(stacked, separate, strict=True):
        assert torch.equal(s.mask, p.mask) and torch.equal(s.weight, p.weight)
    start = [obs_solve(W, H, TWO_FOUR).mask if mask == "obs" else magnitude_mask(W, TWO_FOUR) for W in Ws]
    expected = obs_solve_stacked(
        Ws, H, TWO_FOUR, masks=[refine_swaps(W, H, m, TWO_FOUR) for W, m in zip(Ws, start, strict=True)]
    )
    assert all(torch.equal(s.weight, e.weight) for s, e in zip(stacked, expected, strict=True))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["pruner.refine=swap"], "pruner.refine"),
        (["sparsity=structured", "pruner.refine=swaps"], "pruner.refine"),
        (["pruner.swaps.max_iterations=-1"], "pruner.swaps.max_iterations"),
        (["pruner.swaps.chunk_elements=0"], "pruner.swaps.chunk_elements"),
    ],
)
def test_config_refuses_bad_refine_fields(compose_cfg, overrides, field):
    from obsdiff.config import ConfigError, check_fields

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_fields(compose_cfg("+experiment=debug", *overrides))


def test_config_defaults_leave_refinement_off(compose_cfg):
    cfg = compose_cfg()
    assert cfg.pruner.refine == "none" and cfg.pruner.swaps.max_iterations == 100
    paper = compose_cfg("pruner=sparseswaps")
    assert (paper.pruner.mask, paper.pruner.refine, paper.pruner["update"]) == ("wanda", "swaps", "none")


def test_the_obs_swaps_admm_preset_refines_the_obs_mask_then_refits_by_admm(compose_cfg):
    from obsdiff.config import validate
    from obsdiff.config.resolve import resolve
    from obsdiff.run import _strategy
    from obsdiff.solvers.admm import admm_update

    cfg = compose_cfg("pruner=obs_swaps_admm", "pruner.swaps.max_iterations=4", "logger=none")
    validate(cfg)
    spec = resolve(cfg)
    assert (spec.mask, spec.refine, spec.update) == ("obs", "swaps", "admm")
    W, H, _ = correlated(8, 32, seed=21)
    refined = refine_swaps(W, H, obs_solve(W, H, HALF).mask, HALF, max_iterations=4)
    expected = admm_update(W, H, refined, iterations=20)
    got = _strategy(spec, HALF).solver(W, H, HALF)
    assert torch.equal(got.mask, refined)
    torch.testing.assert_close(got.weight, expected.weight)
