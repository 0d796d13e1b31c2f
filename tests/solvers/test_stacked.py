"""One row-stacked sweep for layers that read one input == their separate solves, bit for bit."""

import pytest
import torch
from synthetic import correlated

from obsdiff.hessian import HessianAccumulator
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.solvers import Pattern, layer_solver, obs_solve, obs_solve_stacked
from obsdiff.solvers.magnitude import magnitude_mask
from obsdiff.solvers.obs import factorize

ROWS = (7, 16, 33)  # different row counts, odd ones included
COLS = 100  # not a multiple of the block size (32)


def group(cols: int = COLS, dead: tuple[int, ...] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Weights of several layers on one correlated input and its Hessian (``dead`` inputs never fire)."""
    _, H, X = correlated(1, cols, tokens=512, seed=3)
    X[:, list(dead)] = 0
    g = torch.Generator().manual_seed(4)
    return [torch.randn(r, cols, generator=g) for r in ROWS], 2 * X.T @ X


def assert_identical(stacked, separate) -> None:
    assert len(stacked) == len(separate)
    for a, b in zip(stacked, separate, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
        assert (a.damp, a.damp_frac, a.obs_loss) == (b.damp, b.damp_frac, b.obs_loss)


PATTERNS = [
    Pattern("unstructured", 0.5),
    Pattern("unstructured", 0.5, exact_count=True),
    Pattern("unstructured", 0.3),
    Pattern("nm", n=2, m=4),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["ref", "exact", "ref30", "2:4"])
@pytest.mark.parametrize("dead", [(), (0, 41, 99)], ids=["live", "dead"])
def test_stacked_sweep_equals_separate_solves_bit_for_bit(pattern, dead):
    Ws, H = group(dead=dead)
    factor = factorize(H, 0.01)
    separate = [obs_solve(W, H, pattern, 0.01, 32, factor=factor) for W in Ws]
    assert_identical(obs_solve_stacked(Ws, H, pattern, 0.01, 32, factor=factor), separate)
    assert_identical(obs_solve_stacked(Ws, H, pattern, 0.01, 32), separate)  # factorised inside
    if dead:
        assert all(torch.all(r.weight[:, list(dead)] == 0) for r in separate)


@pytest.mark.parametrize("cols", [96, 100, 129])
def test_fixed_masks_are_compensated_in_one_sweep_bit_for_bit(cols):
    Ws, H = group(cols)
    masks = [magnitude_mask(W, Pattern("unstructured", 0.5)) for W in Ws]
    factor = factorize(H, 0.01)
    separate = [obs_solve(W, H, Pattern("unstructured", 0.5), 0.01, 32, mask=M, factor=factor)
                for W, M in zip(Ws, masks, strict=True)]  # fmt: skip
    stacked = obs_solve_stacked(Ws, H, Pattern("unstructured", 0.5), 0.01, 32, masks=masks, factor=factor)
    assert_identical(stacked, separate)
    assert all(torch.equal(r.mask, M) for r, M in zip(stacked, masks, strict=True))


def test_stacked_keeps_each_layers_dtype_and_leaves_inputs_alone():
    Ws, H = group()
    Ws = [Ws[0].half(), Ws[1], Ws[2].bfloat16()]
    before = [W.clone() for W in Ws]
    separate = [obs_solve(W, H, Pattern("unstructured", 0.5), 0.01, 32) for W in Ws]
    stacked = obs_solve_stacked(Ws, H, Pattern("unstructured", 0.5), 0.01, 32)
    assert_identical(stacked, separate)
    assert [r.weight.dtype for r in stacked] == [W.dtype for W in Ws]
    assert all(torch.equal(W, W0) for W, W0 in zip(Ws, before, strict=True))


def test_stacked_refuses_mismatched_columns_and_masks():
    Ws, H = group()
    with pytest.raises(ValueError, match="input columns"):
        obs_solve_stacked([Ws[0], Ws[1][:, :50]], H, Pattern("unstructured", 0.5), layers=["q", "k"])
    with pytest.raises(ValueError, match="mask shape"):
        obs_solve_stacked(Ws[:1], H, Pattern("unstructured", 0.5), masks=[torch.zeros(2, COLS, dtype=bool)])


@pytest.mark.parametrize(("mask", "update"), [("obs", "obs"), ("magnitude", "obs"), ("wanda", "obs")])
def test_layer_solver_stacked_equals_its_per_layer_solves(mask, update):
    Ws, H = group()
    solve = layer_solver(mask, update, block_size=32)
    factor = solve.factorize(H)
    for pattern in (Pattern("unstructured", 0.5), Pattern("nm", n=2, m=4)):
        separate = [solve(W, H, pattern, layer=n, factor=factor) for W, n in zip(Ws, "qkv", strict=True)]
        assert_identical(solve.stacked(Ws, H, pattern, layers=list("qkv"), factor=factor), separate)


def test_methods_without_an_obs_update_have_no_stacked_sweep():
    assert not hasattr(layer_solver("magnitude", "none"), "stacked")
    assert not hasattr(layer_solver("obs", "none"), "stacked")
    assert hasattr(layer_solver("magnitude", "obs"), "stacked")


def prune(model, unit, solve, rows_of) -> list:
    """Prune ``model``'s ``unit`` (one shared Hessian per group) with ``solve``; its records."""
    hessians = {}
    for group_ in unit:
        cols = model[group_[0]].weight[0].numel()  # a conv: in · kh · kw
        acc = HessianAccumulator(cols)
        acc.add(torch.randn(4, 40, cols, generator=torch.Generator().manual_seed(5)), 1.0)
        hessians |= dict.fromkeys(group_, acc)
    strategy = LayerwiseStrategy(solve, Pattern("unstructured", 0.5), list(rows_of))
    return strategy.prune_unit(model, unit, hessians, 0)


def test_the_strategy_solves_a_group_in_one_stacked_sweep_with_the_same_weights():
    torch.manual_seed(0)
    rows_of = {"q": 16, "k": 16, "v": 24, "o": 8}
    dense = torch.nn.ModuleDict({n: torch.nn.Linear(48, r) for n, r in rows_of.items()})
    unit = [("q", "k", "v"), ("o",)]
    solve, calls = layer_solver("obs", "obs", block_size=16), []
    stacked, single = solve.stacked, solve
    solve = lambda *a, **k: calls.append(k["layer"]) or single(*a, **k)  # noqa: E731
    solve.factorize = single.factorize
    solve.stacked = lambda Ws, *a, **k: calls.append(tuple(k["layers"])) or stacked(Ws, *a, **k)
    model = torch.nn.ModuleDict({n: torch.nn.Linear(48, r) for n, r in rows_of.items()})
    model.load_state_dict(dense.state_dict())
    records = prune(model, unit, solve, rows_of)
    assert calls == [("q", "k", "v"), "o"]  # one sweep for q/k/v, a plain solve for o alone
    assert [r.name for r in records] == ["q", "k", "v", "o"] and all(r.seconds >= 0 for r in records)

    per_layer = layer_solver("obs", "obs", block_size=16)
    del per_layer.stacked  # the per-layer path
    reference = torch.nn.ModuleDict({n: torch.nn.Linear(48, r) for n, r in rows_of.items()})
    reference.load_state_dict(dense.state_dict())
    expected = prune(reference, unit, per_layer, rows_of)
    for name in rows_of:
        assert torch.equal(model[name].weight, reference[name].weight)
    assert [(r.loss, r.damp, r.sparsity) for r in records] == [(r.loss, r.damp, r.sparsity) for r in expected]


def test_conv_layers_of_one_input_are_stacked_as_their_unfolded_matrices():
    torch.manual_seed(0)
    convs = {"a": torch.nn.Conv2d(4, 6, 3), "b": torch.nn.Conv2d(4, 10, 3)}  # (out, 4·3·3 = 36)
    model = torch.nn.ModuleDict(convs)
    reference = torch.nn.ModuleDict({n: torch.nn.Conv2d(4, c.out_channels, 3) for n, c in convs.items()})
    reference.load_state_dict(model.state_dict())
    prune(model, [("a", "b")], layer_solver("obs", "obs", block_size=16), convs)
    per_layer = layer_solver("obs", "obs", block_size=16)
    del per_layer.stacked
    prune(reference, [("a", "b")], per_layer, convs)
    for name in convs:
        assert model[name].weight.shape == (convs[name].out_channels, 4, 3, 3)
        assert torch.equal(model[name].weight, reference[name].weight)
        assert float((model[name].weight == 0).float().mean()) >= 0.5
