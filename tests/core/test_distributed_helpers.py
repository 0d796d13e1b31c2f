"""Data-parallel helpers (obsdiff.distributed): bin-packing, prompt shards, the accumulators' all-reduce."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from obsdiff import distributed
from obsdiff.hessian import HessianAccumulator


def test_assign_bin_packs_largest_first_onto_the_least_loaded_rank():
    assert distributed.assign([1, 8, 3, 4, 4], 2) == [1, 0, 0, 1, 1]  # loads 8 + 3 = 11, 4 + 4 + 1 = 9
    owners = distributed.assign([5.0, 5.0, 5.0], 2)
    assert owners == [0, 1, 0]  # equal costs: the lowest rank on ties, in item order
    assert distributed.assign([2, 3], 4) == [1, 0]  # more ranks than items: some ranks idle
    assert distributed.assign([], 3) == []


def test_one_process_changes_nothing():
    acc = HessianAccumulator(3)
    acc.add(torch.randn(2, 4, 3), 1.0)
    before = acc.H.clone()
    distributed.all_reduce_hessians({"a": acc})
    assert acc.H.equal(before) and distributed.world_size() == 1 and distributed.is_main()
    calib = object()
    assert distributed.shard(calib) is calib and distributed.broadcast_object(7) == 7


@dataclasses.dataclass
class _Calib:
    embeds: dict
    seeds: list


# Inputs per rank: (batch, tokens, cols) arrays with their α; rank 1 sees nothing for the second input.
def _inputs(rank: int) -> dict[str, list[tuple[torch.Tensor, float]]]:
    g = torch.Generator().manual_seed(0)
    shared = [(torch.randn(b, 5, 6, generator=g), a) for b, a in ((2, 1.2), (1, 1.0), (3, 0.8))]
    lone = [(torch.randn(2, 3, 4, generator=g), a) for a in (1.1, 0.9)]
    return {"shared": shared[:2] if rank == 0 else shared[2:], "lone": lone if rank == 0 else []}


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        shared, lone = HessianAccumulator(6), HessianAccumulator(4)
        for name, acc in (("shared", shared), ("lone", lone)):
            for x, a in _inputs(rank)[name]:
                acc.add(x, a)
        distributed.all_reduce_hessians({"q": shared, "k": shared, "ff": lone})  # q, k: one accumulator
        calib = distributed.shard(_Calib({"e": torch.arange(5)[:, None]}, [10, 11, 12, 13, 14]))
        torch.save({"shared": shared.state(), "lone": lone.state(), "seeds": calib.seeds,
                    "embeds": calib.embeds["e"].flatten().tolist()}, f"{out}.{rank}")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """What each of two gloo ranks holds after the all-reduce (and its prompt shard)."""
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder / "out")), nprocs=2)
    return [torch.load(folder / f"out.{r}") for r in range(2)]


@pytest.mark.parametrize("name,cols", [("shared", 6), ("lone", 4)])
def test_all_reduce_gives_every_rank_the_single_process_accumulator(reduced, name, cols):
    single = HessianAccumulator(cols)
    for rank in range(2):
        for x, a in _inputs(rank)[name]:
            single.add(x, a)
    tensors, scalars = single.state()
    for rank in range(2):
        got_tensors, got_scalars = reduced[rank][name]
        torch.testing.assert_close(got_tensors["H"], tensors["H"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_tensors["col_sum"], tensors["col_sum"], rtol=1e-12, atol=1e-12)
        assert got_scalars["num_calls"] == scalars["num_calls"] and got_scalars["tokens"] == scalars["tokens"]
        assert got_scalars["weight_sum"] == pytest.approx(scalars["weight_sum"])
    assert reduced[0][name][0]["H"].equal(reduced[1][name][0]["H"])  # bit-identical on every rank


def test_shards_are_contiguous_and_cover_every_prompt_once(reduced):
    assert [reduced[r]["seeds"] for r in range(2)] == [[10, 11], [12, 13, 14]]
    assert [reduced[r]["embeds"] for r in range(2)] == [[0, 1], [2, 3, 4]]
