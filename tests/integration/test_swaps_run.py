"""pruner.refine=swaps end to end on the embedded tiny model: Wanda masks refined, errors lower."""

import csv

import pytest

from obsdiff.run import run

pytestmark = pytest.mark.slow


def package_one_losses(run_dir) -> dict[str, float]:
    """``layers.csv``'s relative error of the layers pruned first (calibrated on the dense model)."""
    rows = csv.DictReader((run_dir / "layers.csv").open())
    return {r["name"]: float(r["loss"]) for r in rows if r["package"] == "0"}


def test_sparseswaps_lowers_every_first_package_error_of_its_wanda_start(compose_cfg, tmp_path):
    dirs = {name: tmp_path / name for name in ("wanda", "sparseswaps")}
    metrics = {}
    for name, path in dirs.items():
        path.mkdir()
        metrics[name] = run(compose_cfg(f"pruner={name}", "eval=none", "logger=none"), path)
    assert (
        metrics["sparseswaps"]["prune/sparsity_achieved"]
        == metrics["wanda"]["prune/sparsity_achieved"]
        == 0.5
    )
    wanda, swaps = package_one_losses(dirs["wanda"]), package_one_losses(dirs["sparseswaps"])
    assert wanda and wanda.keys() == swaps.keys()
    assert all(swaps[n] <= wanda[n] for n in wanda)  # same Hessians: the refinement never hurts
    assert sum(swaps.values()) < 0.8 * sum(wanda.values())  # and helps (about half on this model)
