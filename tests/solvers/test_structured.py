"""Structured OBS (FFN neurons, attention heads) against docs/METHOD.md §4."""

import pytest
import torch
from synthetic import correlated

from obsdiff.solvers.obs import CholeskyError
from obsdiff.solvers.structured import (
    chunk_sizes,
    head_ranks,
    head_saliency,
    obs_remove_columns,
    pick_head,
    remove_ffn_columns,
    remove_heads,
    rrf_fuse,
)


def damped(H: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    return H.double() + frac * torch.mean(torch.diag(H.double())) * torch.eye(H.shape[0], dtype=torch.float64)


def remove_one_by_one(W: torch.Tensor, Hd: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Reference: closed-form OBS per column, re-inverting the masked Hessian in between (fp64)."""
    W, Hd = W.double().clone(), Hd.double().clone()
    for q in order:
        Hinv = torch.linalg.inv(Hd)
        W -= (W[:, q] / Hinv[q, q]).unsqueeze(1) * Hinv[q : q + 1, :]  # δ = -(w_q / [H⁻¹]_qq) · H⁻¹[q, :]
        Hd[q, :] = Hd[:, q] = 0
        Hd[q, q] = 1
    return W


@pytest.mark.parametrize(
    "num_remove, first_chunk, chunk", [(0, None, 64), (13, None, 4), (20, 7, 3), (32, 1, 1)]
)
def test_exact_count_removed_and_zeroed(num_remove, first_chunk, chunk):
    W, H, _ = correlated(8, 32)
    res = remove_ffn_columns(W, H, num_remove, first_chunk=first_chunk, chunk=chunk)
    assert res.removed.dtype == torch.long and res.removed.numel() == num_remove
    assert torch.equal(res.removed, torch.sort(res.removed)[0])
    zero_cols = (res.weight == 0).all(dim=0).nonzero().flatten()
    assert torch.equal(zero_cols, res.removed)


def test_chunk_schedule_follows_the_reference():
    assert chunk_sizes(2918) == [1024] + [64] * 29 + [38]  # (2918 - 512) // 2 = 1203 → 1024
    assert chunk_sizes(1000) == [244] + [64] * 11 + [52]
    assert chunk_sizes(600) == [64] * 9 + [24]  # (600 - 512) // 2 = 44 < chunk → chunk
    assert chunk_sizes(100) == [64, 36]  # negative → chunk
    assert chunk_sizes(10, first_chunk=3, chunk=2, max_chunk=2) == [2] * 5
    assert chunk_sizes(0) == []


def test_identity_hessian_picks_smallest_columns_and_keeps_the_rest():
    W = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    res = remove_ffn_columns(W, torch.eye(10), 4, first_chunk=2, chunk=1)
    expected = torch.sort(torch.argsort(W.norm(dim=0))[:4])[0]
    assert torch.equal(res.removed, expected)
    keep = torch.ones(10, dtype=torch.bool)
    keep[expected] = False
    assert torch.equal(res.weight[:, keep], W[:, keep])


@pytest.mark.parametrize("seed", range(4))
def test_compensation_lowers_error_and_off_switch_touches_nothing(seed):
    W, H, X = correlated(16, 48, seed=seed)
    on = remove_ffn_columns(W, H, 20, first_chunk=8, chunk=4)
    off = remove_ffn_columns(W, H, 20, first_chunk=8, chunk=4, compensate=False)
    keep = torch.ones(48, dtype=torch.bool)
    keep[off.removed] = False
    assert torch.equal(off.weight[:, keep], W[:, keep])
    assert torch.all(off.weight[:, off.removed] == 0)
    err_on = torch.sum(((W - on.weight) @ X.T) ** 2)
    err_off = torch.sum(((W - off.weight) @ X.T) ** 2)
    assert err_on < err_off
    assert on.loss < off.loss


def test_removing_one_column_matches_closed_form_obs():
    W, H, _ = correlated(5, 8, seed=2)
    W[:, 3] *= 1e-2  # the least salient column
    res = remove_ffn_columns(W, H, 1, damp_frac=0.01, first_chunk=1, chunk=1)
    assert res.removed.tolist() == [3]
    torch.testing.assert_close(
        res.weight.double(), remove_one_by_one(W, damped(H), [3]), rtol=1e-4, atol=1e-5
    )


def test_one_chunk_equals_sequential_removal_in_any_order():
    W, H, _ = correlated(6, 16, seed=5)
    Hd = damped(H)
    idx = torch.tensor([9, 2, 14, 5])
    W1 = W.double().clone()
    obs_remove_columns(W1, torch.linalg.inv(Hd), idx)
    torch.testing.assert_close(W1, remove_one_by_one(W, Hd, idx.tolist()), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(W1, remove_one_by_one(W, Hd, [5, 14, 9, 2]), rtol=1e-8, atol=1e-10)


def test_chunked_and_one_by_one_agree_when_the_same_columns_are_chosen():
    W, H, _ = correlated(8, 24, seed=6)
    W[:, [1, 7, 11, 20, 22]] *= 1e-3  # clearly least salient: any schedule picks them
    a = remove_ffn_columns(W, H, 5, first_chunk=5)
    b = remove_ffn_columns(W, H, 5, first_chunk=1, chunk=1)
    assert a.removed.tolist() == b.removed.tolist() == [1, 7, 11, 20, 22]
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_scaling_the_hessian_changes_nothing():
    W, H, _ = correlated(8, 32, seed=7)
    a = remove_ffn_columns(W, H, 12, first_chunk=4, chunk=4)
    b = remove_ffn_columns(W, 7 * H, 12, first_chunk=4, chunk=4)
    assert torch.equal(a.removed, b.removed)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_dtype_cast_back_inputs_untouched_and_dead_inputs():
    W, H, _ = correlated(4, 8)
    H[2, :] = H[:, 2] = 0
    W16, H0 = W.half(), H.clone()
    before = W16.clone()
    res = remove_ffn_columns(W16, H, 1, first_chunk=1)
    assert res.weight.dtype == torch.float16 and torch.equal(W16, before) and torch.equal(H, H0)
    assert res.removed.tolist() == [2]  # a dead input is zeroed, so it goes first


def test_cholesky_failure_raises_with_advice():
    with pytest.raises(CholeskyError, match="damp_frac"):
        remove_ffn_columns(torch.randn(2, 3), -torch.eye(3), 1, layer="blk.ff.net.2")
    with pytest.raises(CholeskyError, match="damp_frac"):
        remove_heads([torch.randn(2, 4)], [-torch.eye(4)], 2, 1, layer="blk.attn")


def test_rrf_formula_is_exact_on_a_hand_made_example():
    s1 = torch.tensor([0.3, 0.1, 0.2, 9.0])  # ranks 2, 0, 1, (3: removed)
    s2 = torch.tensor([0.1, 0.5, 0.4, 0.0])  # ranks 0, 2, 1, (3: removed, even with the lowest score)
    fused = rrf_fuse([s1, s2], removed={3})
    expected = torch.tensor(
        [1 / 63 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62 + 1 / 62, 1 / 64 + 1 / 64], dtype=torch.float64
    )
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-15)
    assert pick_head(fused, {3}) in (0, 1)
    assert rrf_fuse([s1], set(), k=0)[1] == 1.0


def test_head_least_important_in_both_projections_goes_first_and_never_twice():
    s1 = torch.tensor([5.0, 1.0, 3.0, 0.5])
    s2 = torch.tensor([2.0, 4.0, 1.0, 0.1])
    assert pick_head(rrf_fuse([s1, s2], set()), set()) == 3
    assert pick_head(rrf_fuse([s1, s2], {3}), {3}) == 2  # ranks (1, 0) beat (0, 2)
    with pytest.raises(ValueError, match="already removed"):
        pick_head(rrf_fuse([s1], {0, 1, 2, 3}), {0, 1, 2, 3})


def test_head_saliency_with_identity_hessian_is_the_frobenius_norm():
    W = torch.randn(6, 4 * 3, generator=torch.Generator().manual_seed(3))
    score = head_saliency(W, torch.eye(12), 3, removed={1})
    frob = W.reshape(6, 4, 3).pow(2).sum(dim=(0, 2))
    assert score[1] == float("inf")
    torch.testing.assert_close(score[[0, 2, 3]], frob[[0, 2, 3]])
    res = remove_heads([W], [torch.eye(12)], 3, 2)
    assert res.removed == torch.argsort(frob)[:2].tolist()


def test_removing_one_head_is_the_joint_obs_update():
    W, H, _ = correlated(5, 12, seed=8)
    res = remove_heads([W], [H], 4, 1)
    j = res.removed[0]
    P = torch.arange(4 * j, 4 * j + 4)
    K = torch.tensor([c for c in range(12) if c not in P.tolist()])
    Hinv = torch.linalg.inv(damped(H))
    Wd = W.double()
    expected = torch.zeros_like(Wd)  # W_K - W_P Hinv_PP⁻¹ Hinv_PK, W_P = 0
    expected[:, K] = Wd[:, K] - Wd[:, P] @ torch.linalg.solve(Hinv[P][:, P], Hinv[P][:, K])
    torch.testing.assert_close(res.weights[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_remove_heads_one_and_two_projections():
    W1, H1, _ = correlated(6, 16, seed=9)
    W2, H2, _ = correlated(3, 16, seed=10)
    single = remove_heads([W1], [H1], 4, 2)
    twin = remove_heads([W1, W1], [H1, H1], 4, 2)  # identical rankings fuse to the same ranking
    assert twin.removed == single.removed
    torch.testing.assert_close(twin.weights[0], single.weights[0])
    joint = remove_heads([W1, W2], [H1, H2], 4, 3)
    assert len(set(joint.removed)) == 3 and len(joint.losses) == len(joint.damp_frac_used) == 2
    for W, Wn in zip((W1, W2), joint.weights, strict=True):
        assert Wn.shape == W.shape
        zero_heads = (Wn.reshape(-1, 4, 4) == 0).all(dim=(0, 2)).nonzero().flatten().tolist()
        assert sorted(joint.removed) == zero_heads
    with pytest.raises(ValueError, match="head_dim"):
        remove_heads([W1, W2[:, :12]], [H1, H2[:12, :12]], 4, 1)


@pytest.mark.parametrize(
    "first, second, expected", [([0.1, 0.2], [0.2, 0.1], 0), ([0.2, 0.1], [0.1, 0.2], 1)]
)
def test_rrf_tie_goes_to_the_head_the_first_projection_ranks_least_important(first, second, expected):
    s1, s2 = torch.tensor(first), torch.tensor(second)  # rankings (0, 1) / (1, 0): one exact tie
    fused = rrf_fuse([s1, s2], set())
    assert fused[0] == fused[1]
    assert pick_head(fused, set(), head_ranks(s1, set())) == expected
    assert pick_head(fused, set()) == 0  # without the first projection's ranks: the lowest index


def test_remove_heads_breaks_an_rrf_tie_by_the_first_projection_not_the_lowest_index():
    # Identity Hessians: a head's score is its Frobenius norm. to_out.0 ranks head 1 least important,
    # to_add_out head 0: the fused scores tie exactly, and head 1 must go.
    g = torch.Generator().manual_seed(12)
    u, v = (x / x.norm() for x in (torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)))
    first = torch.cat([2 * u, v], dim=1)  # head norms 2, 1: head 1 ranked 0
    second = torch.cat([u, 2 * v], dim=1)  # head norms 1, 2: head 0 ranked 0
    res = remove_heads([first, second], [torch.eye(4), torch.eye(4)], 2, 1)
    assert res.removed == [1]
    swapped = remove_heads([second, first], [torch.eye(4), torch.eye(4)], 2, 1)
    assert swapped.removed == [0]


def zero_columns(W: torch.Tensor) -> list[int]:
    return (W == 0).all(dim=0).nonzero().flatten().tolist()


def test_remove_heads_on_a_column_range_removes_inside_and_compensates_outside():
    W1, H1, _ = correlated(6, 20, seed=13)
    W2, H2, _ = correlated(4, 20, seed=14)
    start, stop, d = 4, 16, 4  # 3 heads on columns 4..15 of a 20-column layer
    W1[:, :start] *= 1e-3  # the smallest columns lie outside the range: they must stay
    res = remove_heads([W1, W2], [H1, H2], d, 2, cols=(start, stop))
    assert len(set(res.removed)) == 2 and all(0 <= h < 3 for h in res.removed)
    expected = sorted(start + h * d + i for h in res.removed for i in range(d))
    outside = [c for c in range(20) if not start <= c < stop]
    for W, Wn in zip((W1, W2), res.weights, strict=True):
        assert zero_columns(Wn) == expected
        assert not torch.equal(Wn[:, outside], W[:, outside])  # compensation reaches them
    plain = remove_heads([W1, W2], [H1, H2], d, 2, compensate=False, cols=(start, stop))
    for W, Wn in zip((W1, W2), plain.weights, strict=True):
        kept = [c for c in range(20) if c not in zero_columns(Wn)]
        assert torch.equal(Wn[:, kept], W[:, kept])

    # one head: the joint OBS update over every kept column, inside the range or not
    one = remove_heads([W1], [H1], d, 1, cols=(start, stop))
    j = one.removed[0]
    P = torch.arange(start + j * d, start + (j + 1) * d)
    K = torch.tensor([c for c in range(20) if c not in P.tolist()])
    Hinv = torch.linalg.inv(damped(H1))
    ref = torch.zeros_like(W1.double())
    ref[:, K] = W1.double()[:, K] - W1.double()[:, P] @ torch.linalg.solve(Hinv[P][:, P], Hinv[P][:, K])
    torch.testing.assert_close(one.weights[0].double(), ref, rtol=1e-4, atol=1e-5)


def test_remove_heads_on_the_full_range_equals_no_range():
    W1, H1, _ = correlated(6, 16, seed=15)
    W2, H2, _ = correlated(3, 16, seed=16)
    full = remove_heads([W1, W2], [H1, H2], 4, 2, cols=(0, 16))
    default = remove_heads([W1, W2], [H1, H2], 4, 2)
    assert full.removed == default.removed
    for a, b in zip(full.weights, default.weights, strict=True):
        assert torch.equal(a, b)
    assert full.losses == default.losses and full.damp_frac_used == default.damp_frac_used


@pytest.mark.parametrize("first_chunk, chunk", [(None, 64), (3, 2)])
def test_remove_ffn_columns_on_a_column_range_removes_inside_and_compensates_outside(first_chunk, chunk):
    W, H, _ = correlated(8, 40, seed=17)
    start, stop = 10, 30
    W[:, :start] *= 1e-3  # the least salient columns lie outside the range: they must stay
    res = remove_ffn_columns(W, H, 8, first_chunk=first_chunk, chunk=chunk, cols=(start, stop))
    assert res.removed.numel() == 8 and all(start <= c < stop for c in res.removed.tolist())
    assert zero_columns(res.weight) == res.removed.tolist()  # absolute indices
    outside = [c for c in range(40) if not start <= c < stop]
    assert not torch.equal(res.weight[:, outside], W[:, outside])  # compensation reaches them
    plain = remove_ffn_columns(
        W, H, 8, compensate=False, first_chunk=first_chunk, chunk=chunk, cols=(start, stop)
    )
    assert all(start <= c < stop for c in plain.removed.tolist())
    kept = [c for c in range(40) if c not in plain.removed.tolist()]
    assert torch.equal(plain.weight[:, kept], W[:, kept])
    assert res.loss < plain.loss


def test_remove_ffn_columns_on_the_full_range_equals_no_range():
    W, H, _ = correlated(8, 32, seed=18)
    full = remove_ffn_columns(W, H, 12, first_chunk=4, chunk=4, cols=(0, 32))
    default = remove_ffn_columns(W, H, 12, first_chunk=4, chunk=4)
    assert torch.equal(full.removed, default.removed)
    assert torch.equal(full.weight, default.weight)
    assert full.loss == default.loss


def test_the_damping_factorisation_is_the_first_removal_steps_inverse_bit_for_bit():
    from obsdiff.solvers.structured import _inverse, _prepare

    W, H, _ = correlated(8, 32)
    H[:, 3] = H[3, :] = 0  # a dead input
    _, Hd, _, first = _prepare(W, H, 0.01, "down")
    assert torch.equal(first, _inverse(Hd, "down"))  # reused for the first chunk / head instead
    assert _prepare(W, H, 0.01, "down", pre_removed=torch.tensor([5, 6]))[3] is None  # H changed after it
