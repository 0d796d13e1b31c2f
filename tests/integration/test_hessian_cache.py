"""pruner.hessian_cache: package 1's Hessians are reused across runs and change nothing."""

import pytest
from safetensors.torch import load_file

from obsdiff.run import run

pytestmark = pytest.mark.slow
SMALL = [
    "model=tiny_sd3", "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4",
    "eval=none", "logger=none",
]  # fmt: skip
WEIGHTS = "pruned/diffusion_pytorch_model.safetensors"


def outputs(run_dir):
    return (run_dir / "layers.csv").read_text().splitlines(), load_file(str(run_dir / WEIGHTS))


def same(a, b):
    (rows_a, w_a), (rows_b, w_b) = a, b
    assert [r.rsplit(",", 1)[0] for r in rows_a] == [r.rsplit(",", 1)[0] for r in rows_b]  # not seconds
    assert w_a.keys() == w_b.keys() and all(w_a[k].equal(w_b[k]) for k in w_a)


def test_a_cached_run_equals_an_uncached_one_bit_for_bit(compose_cfg, tmp_path, caplog):
    cache = tmp_path / "hessians"
    dirs = {name: tmp_path / name for name in ("plain50", "fill50", "plain60", "hit60", "seed")}
    for d in dirs.values():
        d.mkdir()
    run(compose_cfg(*SMALL), dirs["plain50"])
    run(compose_cfg(*SMALL, f"pruner.hessian_cache={cache}"), dirs["fill50"])
    assert len(list(cache.glob("*.safetensors"))) == 1
    same(outputs(dirs["plain50"]), outputs(dirs["fill50"]))
    run(compose_cfg(*SMALL, "sparsity.ratio=0.6"), dirs["plain60"])
    with caplog.at_level("INFO"):
        run(compose_cfg(*SMALL, "sparsity.ratio=0.6", f"pruner.hessian_cache={cache}"), dirs["hit60"])
    assert "package 1 Hessians: cache hit" in caplog.text
    same(outputs(dirs["plain60"]), outputs(dirs["hit60"]))
    run(compose_cfg(*SMALL, "calibration.seed=7", f"pruner.hessian_cache={cache}"), dirs["seed"])
    assert len(list(cache.glob("*.safetensors"))) == 2  # other seeds: another entry


def test_the_cache_folder_does_not_change_the_run_hash(compose_cfg, tmp_path):
    from obsdiff.provenance import run_hash

    assert run_hash(compose_cfg(*SMALL)) == run_hash(compose_cfg(*SMALL, f"pruner.hessian_cache={tmp_path}"))
    assert run_hash(compose_cfg(*SMALL)) != run_hash(compose_cfg(*SMALL, "pruner.num_packages=2"))
