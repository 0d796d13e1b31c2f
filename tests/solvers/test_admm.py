"""ADMM weight update (Boža 2024): on a fixed mask it reaches the damped least-squares optimum, so
it is never worse than the OBS sweep on the same mask; zeros exactly on the mask; stacked layers
equal their separate updates; the config reaches the solver."""

import pytest
import torch
from synthetic import correlated

from obsdiff.solvers import Factors, Pattern, layer_solver, obs_solve
from obsdiff.solvers.admm import admm_factorize_for, admm_update, admm_update_stacked, rho_schedule
from obsdiff.solvers.magnitude import magnitude_mask

PATTERNS = [Pattern("unstructured", 0.5), Pattern("unstructured", 0.7), Pattern("nm", n=2, m=4)]
IDS = ["u50", "u70", "2:4"]


def damped(H: torch.Tensor, damp_frac: float = 0.01) -> torch.Tensor:
    """obs.py's convention, written out: dead inputs get H_jj = 1, then λ · mean(diag) on the diagonal."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return H + damp_frac * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64."""
    delta = (W - W_hat).double()
    return float(torch.sum((delta @ H.double()) * delta))


def least_squares(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, on the kept set S: Ŵ_S = (W H_d)_S (H_d,SS)⁻¹ (dead inputs zeroed first), float64."""
    Hd = damped(H)
    W = W.double().clone()
    W[:, torch.diag(H) == 0] = 0
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = ~mask[r]
        out[r, S] = torch.linalg.solve(Hd[S][:, S], (W[r] @ Hd)[S])  # H_d,SS is symmetric
    return out


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admm_is_never_worse_than_the_obs_sweep_on_the_same_mask(pattern, seed):
    W, H, _ = correlated(24, 64, tokens=256, seed=seed)
    Hd = damped(H)
    for mask in (obs_solve(W, H, pattern, 0.01, 32).mask, magnitude_mask(W, pattern)):
        obs = obs_solve(W, H, pattern, 0.01, 32, mask=mask)
        admm = admm_update(W, H, mask, iterations=300)
        e_obs, e_admm = error(W, obs.weight, Hd), error(W, admm.weight, Hd)
        assert e_admm <= e_obs * (1 + 1e-6), (e_admm, e_obs)
        assert e_admm < 0.99 * e_obs  # the OBS sweep never revisits earlier columns: ADMM is strictly better
        # both report the same quantity, ½ tr(ΔW H_d ΔWᵀ)
        assert admm.obs_loss == pytest.approx(e_admm / 2, rel=1e-4)
        assert obs.obs_loss == pytest.approx(e_obs / 2, rel=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
@pytest.mark.parametrize("dead", [(), (3, 17)], ids=["live", "dead"])
def test_admm_converges_to_the_closed_form_least_squares_solution(pattern, dead):
    W, _, X = correlated(6, 24, tokens=200, seed=4)
    X[:, list(dead)] = 0
    H = 2 * X.T @ X
    mask = magnitude_mask(W, pattern)
    expected = least_squares(W, H, mask)
    result = admm_update(W, H, mask, iterations=1000)
    torch.testing.assert_close(result.weight.double(), expected, rtol=1e-4, atol=1e-5)
    assert error(W, result.weight, damped(H)) == pytest.approx(error(W, expected, damped(H)), rel=1e-6)
    if dead:
        assert torch.all(result.weight[:, list(dead)] == 0)
    # the ρ schedule (dual rescaled on every change) and the gradual growth reach the same optimum
    for options in ({"rho_factor": 2.0, "rho_every": 100, "rho": 0.25}, {"growth": 15}):
        other = admm_update(W, H, mask, iterations=1000, **options)
        torch.testing.assert_close(other.weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_the_papers_twenty_iterations_are_already_close_to_the_optimum():
    W, H, _ = correlated(32, 128, tokens=512, seed=5)
    for pattern in PATTERNS:
        mask = obs_solve(W, H, pattern).mask
        best = error(W, least_squares(W, H, mask), damped(H))
        assert error(W, admm_update(W, H, mask).weight, damped(H)) <= best * 1.01


@pytest.mark.parametrize("growth", [0, 15])
@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_the_mask_is_respected_exactly_and_nothing_else_is_zeroed(pattern, growth):
    W, H, _ = correlated(16, 64, seed=6)
    mask = magnitude_mask(W, pattern)
    before = W.clone()
    result = admm_update(W.half(), H, mask, growth=growth)
    assert result.weight.dtype == torch.float16 and torch.equal(result.mask, mask)
    assert torch.equal(result.weight == 0, mask)  # zeros exactly where the mask is, nowhere else
    assert torch.equal(W, before)
    if pattern.kind == "nm":
        assert torch.all((result.weight == 0).reshape(16, -1, 4).sum(-1) == 2)


def test_scaling_H_changes_nothing():
    W, H, _ = correlated(8, 32, seed=7)
    mask = magnitude_mask(W, Pattern("unstructured", 0.5))
    a, b = admm_update(W, H, mask), admm_update(W, 7 * H, mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)
    assert b.obs_loss == pytest.approx(7 * a.obs_loss, rel=1e-4)


@pytest.mark.parametrize("growth", [0, 15])
def test_stacked_layers_equal_their_separate_updates(growth):
    _, H, _ = correlated(1, 48, tokens=256, seed=8)
    g = torch.Generator().manual_seed(9)
    Ws = [torch.randn(r, 48, generator=g) for r in (5, 16, 11)]
    masks = [magnitude_mask(W, Pattern("unstructured", 0.6)) for W in Ws]
    factor = admm_factorize_for(H, growth=growth)
    separate = [admm_update(W, H, M, growth=growth, factor=factor) for W, M in zip(Ws, masks, strict=True)]
    stacked = admm_update_stacked(Ws, H, masks, growth=growth)  # factorised inside
    for a, b in zip(stacked, separate, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.mask, b.mask) and (a.damp, a.damp_frac) == (b.damp, b.damp_frac)
        assert a.obs_loss == pytest.approx(b.obs_loss, rel=1e-5)


@pytest.mark.parametrize("mask", ["obs", "magnitude", "wanda"])
def test_layer_solver_admm_shares_one_factorisation_and_stacks(mask):
    _, H, _ = correlated(1, 48, tokens=256, seed=10)
    g = torch.Generator().manual_seed(11)
    Ws = [torch.randn(r, 48, generator=g) for r in (8, 8, 12)]
    solve = layer_solver(mask, "admm", block_size=16, admm={"iterations": 30})
    factor = solve.factorize(H)
    assert isinstance(factor, Factors) and (factor.obs is None) == (mask != "obs")
    pattern = Pattern("nm", n=2, m=4)
    separate = [solve(W, H, pattern, layer=n, factor=factor) for W, n in zip(Ws, "qkv", strict=True)]
    for a, b in zip(solve.stacked(Ws, H, pattern, layers=list("qkv"), factor=factor), separate, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.mask, b.mask)
    chosen = layer_solver(mask, "none")(Ws[0], H, pattern).mask  # the same mask choice
    direct = admm_update(Ws[0], H, chosen, iterations=30)
    assert torch.equal(separate[0].mask, chosen)
    torch.testing.assert_close(separate[0].weight, direct.weight)
    without = layer_solver(mask, "admm", block_size=16, admm={"iterations": 30})(Ws[0], H, pattern)
    torch.testing.assert_close(without.weight, direct.weight)  # factorised inside


def test_bad_input_is_refused():
    W, H, _ = correlated(4, 16, seed=12)
    mask = magnitude_mask(W, Pattern("unstructured", 0.5))
    with pytest.raises(ValueError, match="do not match"):
        admm_update(W, H, mask[:, :8])
    with pytest.raises(ValueError, match="growth"):
        admm_update(W, H, mask, iterations=10, growth=11)
    with pytest.raises(ValueError, match="rho > 0"):
        admm_update(W, H, mask, rho=0.0)
    with pytest.raises(ValueError, match="leaves fp32"):
        rho_schedule(1.0, 1000, 2.0, 1)
    assert rho_schedule(1.0, 7, 2.0, 3) == [1, 1, 1, 2, 2, 2, 4]


def test_the_obs_admm_preset_validates_and_reaches_the_solver(compose_cfg):
    from obsdiff.config import validate
    from obsdiff.config.resolve import resolve
    from obsdiff.run import _strategy

    cfg = compose_cfg("pruner=obs_admm", "pruner.admm.iterations=7", "logger=none")
    validate(cfg)
    spec = resolve(cfg)
    assert (spec.mask, spec.update, spec.admm["iterations"], spec.admm["rho"]) == ("obs", "admm", 7, 1.0)
    solver = _strategy(spec, spec.pattern()).solver
    W, H, _ = correlated(8, 32, seed=13)
    expected = admm_update(W, H, obs_solve(W, H, spec.pattern()).mask, iterations=7)
    torch.testing.assert_close(solver(W, H, spec.pattern()).weight, expected.weight)
    assert compose_cfg().pruner["update"] == "obs"  # the default preset is unchanged


@pytest.mark.slow  # an end-to-end run of the embedded tiny model (~15 s on an idle CPU)
def test_a_tiny_run_with_the_admm_update_prunes_to_the_target(compose_cfg, run_dir):
    import csv

    from obsdiff.run import run

    metrics = run(compose_cfg("pruner=obs_admm", "eval=none", "logger=none"), run_dir)
    assert (metrics["prune/method"], metrics["prune/update"]) == ("obs_admm", "admm")
    assert metrics["prune/sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    rows = list(csv.DictReader((run_dir / "layers.csv").open()))
    assert len(rows) == metrics["prune/num_layers"] and all(0 <= float(r["loss"]) < 1 for r in rows)


def test_a_change_of_rho_keeps_a_converged_iterate_in_place():
    """The scaled dual is rescaled by ρ_old / ρ_new: a fixed point of ρ = 1 stays one for ρ = 4
    (without the rescale the first ρ = 4 step jumps away from the optimum)."""
    W, H, _ = correlated(6, 24, tokens=200, seed=14)
    mask = magnitude_mask(W, Pattern("unstructured", 0.5))
    converged = admm_update(W, H, mask, iterations=600)
    switched = admm_update(W, H, mask, iterations=601, rho_factor=4.0, rho_every=600)
    torch.testing.assert_close(switched.weight, converged.weight, rtol=1e-5, atol=1e-6)
