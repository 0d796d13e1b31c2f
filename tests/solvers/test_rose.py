"""ROSE column order (``pruner.order=rose``): natural is today's sweep bit for bit; the reordered
sweep keeps the pattern in the original column order, round-trips exactly, is gated on columnar
layers and shares one permutation across a stacked group; the config reaches the solver."""

import csv
import logging

import pytest
import torch
from synthetic import correlated

from obsdiff.config import ConfigError
from obsdiff.config.validate import check_fields
from obsdiff.run import run
from obsdiff.solvers import Pattern, layer_solver, obs_solve, reconstruction_error
from obsdiff.solvers.obs import factorize
from obsdiff.solvers.rose import relative_range, rose_order

B = 32  # block size of these tests: 4 full blocks of 128 columns, or 3 and a partial one of 100
PATTERNS = {
    "u50": Pattern("unstructured", 0.5),
    "u70": Pattern("unstructured", 0.7),
    "u50exact": Pattern("unstructured", 0.5, exact_count=True),
    "2:4": Pattern("nm", n=2, m=4),
}


def columnar(rows=48, cols=128, seed=0, hot=(96, 128)):
    """A correlated layer whose block ``hot`` of columns carries 4x the weights (a columnar layer)."""
    W, H, X = correlated(rows, cols, tokens=512, seed=seed)
    W[:, hot[0] : hot[1]] *= 4
    return W, H, X


def same(a, b) -> bool:
    """Two results are the same bit for bit (``update=none`` reports no OBS loss: nan)."""
    loss = a.obs_loss == b.obs_loss or (a.obs_loss != a.obs_loss and b.obs_loss != b.obs_loss)
    return torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and loss


def independent_loss(W, H, pattern, block=B):
    """Column loss of the pre-pruning, written out loop by loop (rows of one layer)."""
    S = W.abs() * torch.diag(H).sqrt()
    loss = torch.zeros(W.shape[1])
    for i1 in range(0, W.shape[1], block):
        tmp = S[:, i1 : i1 + block]
        if pattern.kind == "nm":
            for r in range(tmp.shape[0]):
                for g in range(0, tmp.shape[1], pattern.m):
                    vals = sorted(tmp[r, g : g + pattern.m].tolist())
                    for j in range(g, g + pattern.m):
                        if tmp[r, j] <= vals[pattern.n - 1]:
                            loss[i1 + j] += tmp[r, j]
        else:
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * pattern.ratio)]
            loss[i1 : i1 + block] += (tmp * (tmp <= thresh)).sum(0)
    return loss


@pytest.mark.parametrize("name", list(PATTERNS))
def test_natural_order_is_todays_obs_solve_bit_for_bit(name):
    pattern = PATTERNS[name]
    W, H, _ = columnar()
    for mask, update in [("obs", "obs"), ("wanda", "obs"), ("obs", "none")]:
        natural = layer_solver(mask, update, block_size=B, order="natural")
        today = layer_solver(mask, update, block_size=B)
        factor = natural.factorize(H)
        a, b = natural(W, H, pattern, factor=factor), today(W, H, pattern, factor=today.factorize(H))
        assert same(a, b)
    assert same(
        layer_solver("obs", "obs", block_size=B, order="natural")(W, H, pattern),
        obs_solve(W, H, pattern, 0.01, B),
    )


@pytest.mark.parametrize("name", list(PATTERNS))
def test_rose_keeps_the_pattern_in_the_original_column_order(name):
    pattern = PATTERNS[name]
    W, H, _ = columnar(cols=128)
    perm = rose_order([W], H, pattern, B)
    assert perm is not None and not torch.equal(perm, torch.arange(128))  # it did reorder
    result = layer_solver("obs", "obs", block_size=B, order="rose")(W, H, pattern)
    assert torch.equal(result.weight == 0, result.mask)
    if pattern.kind == "nm":  # exactly n zeros in every aligned group of m original columns
        per_group = result.mask.reshape(W.shape[0], -1, pattern.m).sum(-1)
        assert torch.all(per_group == pattern.n)
    else:  # the natural sweep's count per block: k = floor(rows · B · ratio), k + 1 with its `<=`
        per_block = int(W.shape[0] * B * pattern.ratio) + (0 if pattern.exact_count else 1)  # no ties
        assert int(result.mask.sum()) == int(obs_solve(W, H, pattern, 0.01, B).mask.sum()) == 4 * per_block


@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_permutation_round_trips_exactly(name):
    pattern = PATTERNS[name]
    W, H, X = columnar(cols=100, hot=(64, 96))  # a partial last block of 4 columns
    perm = rose_order([W], H, pattern, B)
    assert perm is not None and sorted(perm.tolist()) == list(range(100))
    assert sorted(perm[96:].tolist()) == [96, 97, 98, 99]  # the partial block stays last
    Hp = H[perm][:, perm]
    inside = obs_solve(W[:, perm], Hp, pattern, 0.01, B)  # the sweep in permuted space, by hand
    result = layer_solver("obs", "obs", block_size=B, order="rose")(W, H, pattern)
    assert torch.equal(result.weight[:, perm], inside.weight) and result.obs_loss == inside.obs_loss
    assert torch.equal(result.mask[:, perm], inside.mask)
    original = reconstruction_error(W, result.weight, H)
    assert original == pytest.approx(reconstruction_error(W[:, perm], inside.weight, Hp), rel=1e-6)
    delta = (W - result.weight) @ X.T  # independent: the output error on the inputs themselves
    assert original == pytest.approx(float((delta**2).sum() / ((W @ X.T) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("name", ["u50", "2:4"])
def test_the_order_is_columns_by_loss_in_blocks_by_block_loss(name):
    pattern = PATTERNS[name]
    W, H, _ = columnar(cols=128)
    perm = rose_order([W], H, pattern, B).tolist()
    loss = independent_loss(W, H, pattern)
    block_loss = loss.reshape(4, B).sum(1)
    order = sorted(range(4), key=lambda b: -float(block_loss[b]))
    assert order[0] == 3  # the hot block first
    unit = pattern.m if pattern.kind == "nm" else 1
    for slot, b in enumerate(order):
        chunk = perm[slot * B : (slot + 1) * B]
        assert sorted(chunk) == list(range(b * B, (b + 1) * B))  # a block moves whole
        units = [chunk[i : i + unit] for i in range(0, B, unit)]
        assert all(u == list(range(u[0], u[0] + unit)) and u[0] % unit == 0 for u in units)
        unit_loss = [float(loss[u].sum()) for u in units]
        assert all(a >= b - 1e-4 * abs(a) for a, b in zip(unit_loss, unit_loss[1:], strict=False))


def test_a_layer_that_is_not_columnar_is_left_in_natural_order():
    W, H, _ = correlated(48, 128, tokens=512, seed=0)  # no hot block
    pattern = PATTERNS["u50"]
    S = independent_loss(W, H, pattern).reshape(4, B).sum(1)
    spread = float((S.max() - S.min()) / S.max())
    assert spread < 0.5 and relative_range(S) == pytest.approx(spread, rel=1e-5)
    assert rose_order([W], H, pattern, B) is None
    rose, natural = layer_solver("obs", "obs", block_size=B, order="rose"), obs_solve(W, H, pattern, 0.01, B)
    assert torch.equal(rose(W, H, pattern).weight, natural.weight)
    assert rose_order([W], H, pattern, B, threshold=spread * 0.9) is not None  # the cut is the gate
    Wc, Hc, _ = columnar()
    assert rose_order([Wc], Hc, pattern, B, threshold=0.99) is None
    assert rose_order([Wc], Hc, pattern, 128) is None  # one block: nothing to compare


def test_a_stacked_group_shares_one_permutation_factor_and_sweep():
    W, H, _ = columnar(rows=60)
    Ws = [W[:16], W[16:40], W[40:]]  # q, k, v on one input
    solve = layer_solver("obs", "obs", block_size=B, order="rose")
    assert solve.factorize(H) is None  # the factor belongs to the permuted H: made inside
    for pattern in PATTERNS.values():
        perm = rose_order(Ws, H, pattern, B)
        assert perm is not None
        Hp, factor = H[perm][:, perm], factorize(H[perm][:, perm], 0.01)
        stacked = solve.stacked(Ws, H, pattern, layers=list("qkv"))
        for W_i, r in zip(Ws, stacked, strict=True):
            alone = obs_solve(W_i[:, perm], Hp, pattern, 0.01, B, factor=factor)
            assert torch.equal(r.weight[:, perm], alone.weight) and torch.equal(r.mask[:, perm], alone.mask)
            assert r.obs_loss == alone.obs_loss
        one = solve.stacked(Ws[:1], H, pattern, layers=["q"])[0]  # a group of one == the plain solve
        plain = solve(Ws[0], H, pattern, layer="q")
        assert torch.equal(one.weight, plain.weight) and torch.equal(one.mask, plain.mask)
    assert not hasattr(layer_solver("obs", "none", order="rose"), "stacked")


def test_fixed_mask_methods_keep_their_mask_and_only_the_compensation_is_reordered():
    W, H, _ = columnar()
    for pattern in (PATTERNS["u50"], PATTERNS["2:4"]):
        natural = layer_solver("wanda", "obs", block_size=B)(W, H, pattern)
        rose = layer_solver("wanda", "obs", block_size=B, order="rose")(W, H, pattern)
        assert torch.equal(rose.mask, natural.mask) and not torch.equal(rose.weight, natural.weight)
    g = torch.Generator().manual_seed(1)
    moments = (torch.rand(128, generator=g), torch.rand(128, generator=g) + 0.1)
    dsnot = layer_solver("dsnot", "obs", block_size=B, order="rose")(W, H, PATTERNS["2:4"], moments=moments)
    assert torch.all(dsnot.mask.reshape(48, -1, 4).sum(-1) == 2)


def test_error_of_rose_against_natural_on_synthetic_layers():
    """The measured ratio (printed; ROSE promises no win per layer, so only the gating is asserted)."""
    plain, ratios = correlated(256, 1024, tokens=2048, seed=0)[:2], {}
    hot = correlated(256, 1024, tokens=2048, seed=0)[:2]
    hot[0][:, 896:] *= 4  # one hot block of 128 columns, the last one
    for label, (W, H) in {"plain": plain, "hot": hot}.items():
        for name in ("u50", "u70", "2:4"):
            pattern = PATTERNS[name]
            natural = reconstruction_error(W, obs_solve(W, H, pattern).weight, H)
            for cut in (0.5, 0.0):  # the authors' gate, and reordering every layer
                rose = layer_solver("obs", "obs", order="rose", rose_threshold=cut)(W, H, pattern)
                ratios[label, name, cut] = reconstruction_error(W, rose.weight, H) / natural
    print("\nrose/natural error:", {k: round(v, 4) for k, v in ratios.items()})
    assert all(ratios["plain", name, 0.5] == 1.0 for name in ("u50", "u70", "2:4"))  # gated off


def test_order_fields_are_validated(compose_cfg):
    debug = ["+experiment=debug"]
    check_fields(compose_cfg(*debug, "pruner.order=rose"))
    check_fields(compose_cfg(*debug, "pruner.order=rose", "pruner=magnitude", "pruner.update=obs"))
    bad = {
        "pruner.order=rosy": "natural, rose",
        "pruner.rose_threshold=1.5": "pruner.rose_threshold",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            check_fields(compose_cfg(*debug, override))
    for method in (["pruner=wanda"], ["sparsity=structured"]):  # nothing to order: refused
        with pytest.raises(ConfigError, match="pruner.order"):
            check_fields(compose_cfg(*debug, "pruner.order=rose", *method))


def test_pruner_order_rose_runs_end_to_end(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(
        "+experiment=debug", "eval=none", "logger=none", "calibration.num_prompts=2",
        "calibration.num_steps=2", "calibration.batch_size=2", "pruner.block_size=16",
        "pruner.order=rose", "pruner.rose_threshold=0",  # every layer of 2+ blocks is reordered
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="obsdiff.solvers.rose"):
        run(cfg, tmp_path)
    rows = list(csv.DictReader((tmp_path / "layers.csv").open()))
    assert rows and all(abs(float(r["sparsity"]) - 0.5) < 0.01 for r in rows)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().endswith("ROSE order")]
    reordered = [name for m in messages for name in m.split(":")[0].split("+")]  # q+k+v: one order
    assert sorted(reordered) == sorted(r["name"] for r in rows)  # widths 96 and 384: 6+ blocks each
    assert len(messages) < len(rows) and all(0 < float(r["loss"]) < 1 for r in rows)
