"""The memory plan: bytes per package before any weight loads, enforced, checked against a measured peak."""

import json

import pytest
import torch

from obsdiff.config import ConfigError, resolve
from obsdiff.config.fields import parse_bytes
from obsdiff.models import get_adapter
from obsdiff.models.base import ModelAdapter
from obsdiff.packages import split_by_bytes
from obsdiff.plan import LiveBytes, PlanError, check_fits
from obsdiff.prune import prepare_calibration, prune_groupwise
from obsdiff.run import _strategy, memory_plan, plan_only, run

FAST = ["eval=none", "logger=none", "calibration.num_prompts=8", "calibration.num_steps=2"]


def test_sizes_parse_as_bytes_and_bad_ones_name_the_field():
    assert parse_bytes("f", 123) == 123
    assert parse_bytes("f", "20GB") == 20 * 10**9
    assert parse_bytes("f", "1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("f", " 512 mb ") == 512 * 10**6
    for bad in ("lots", "12 parsecs", 0, -3, "0GB", True):
        with pytest.raises(ConfigError, match="f="):
            parse_bytes("f", bad)


def test_byte_packages_are_contiguous_and_never_exceed_the_budget():
    sizes = [3, 3, 2, 5, 1, 1, 4]
    packages = split_by_bytes(list(range(7)), sizes, 6)
    assert packages == [[0, 1], [2], [3, 4], [5, 6]]
    assert all(sum(sizes[u] for u in p) <= 6 for p in packages)
    with pytest.raises(ValueError, match="raise it to at least 5"):
        split_by_bytes(list(range(7)), sizes, 4)


def test_live_bytes_counts_a_storage_once_until_it_is_freed():
    with LiveBytes() as live:
        a = torch.zeros(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        del a
        c = torch.ones(500)  # 2000 bytes more while b holds the first storage
        del b, c
        d = torch.ones(250)
    assert live.peak == 6000 and live.live == 1000
    del d


def test_plan_only_prints_and_writes_the_plan_without_loading_weights(
    compose_cfg, tmp_path, monkeypatch, capsys
):
    def no_load(self, model_cfg):
        raise AssertionError("plan_only loaded the weights")

    monkeypatch.setattr(ModelAdapter, "load", no_load)
    metrics = plan_only(compose_cfg(*FAST, "plan_only=true"), tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [p["package"] for p in plan["packages"]] == [0, 1, 2, 3]
    assert plan["peak_bytes"] == metrics["plan/peak_bytes"] == max(plan["package_peaks"])
    assert plan["packages"][0]["hessian_bytes"] > 0 and plan["activation_bytes"] > 0
    assert "peak" in capsys.readouterr().out
    assert not (tmp_path / "status.json").exists()


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux", "tiny_sdxl", "tiny_pixart", "tiny_sd35"])
def test_every_family_plans_from_its_config(compose_cfg, model):
    cfg = compose_cfg(f"model={model}", *FAST)
    spec = resolve(cfg)
    plan, sizes = memory_plan(cfg, spec, get_adapter(spec.family, spec.options))
    assert len(plan.packages) == 4 and len(sizes) == sum(p.units for p in plan.packages)
    assert plan.peak_bytes > plan.denoiser_bytes + plan.activation_bytes


def test_package_bytes_sizes_the_packages(compose_cfg):
    cfg = compose_cfg(*FAST)
    spec = resolve(cfg)
    adapter = get_adapter(spec.family, spec.options)
    plan, sizes = memory_plan(cfg, spec, adapter)
    budget = max(sizes)  # every FFN unit alone
    byte_cfg = compose_cfg(*FAST, f"pruner.package_bytes={budget}")
    byte_plan, _ = memory_plan(byte_cfg, resolve(byte_cfg), adapter)
    assert len(byte_plan.packages) == len(split_by_bytes(sizes, sizes, budget)) > 4
    assert max(p.hessian_bytes for p in byte_plan.packages) <= budget


def test_a_plan_that_does_not_fit_says_what_to_set_and_that_value_fits(compose_cfg):
    cfg = compose_cfg(*FAST, "pruner.num_packages=1")
    spec = resolve(cfg)
    adapter = get_adapter(spec.family, spec.options)
    plan, sizes = memory_plan(cfg, spec, adapter)
    tight = plan.denoiser_bytes + plan.activation_bytes + plan.largest.hook_bytes + 3 * max(sizes)
    plan.capacity_bytes = int(tight / 0.9) + 1  # room for three units' Hessians, not all sixteen
    with pytest.raises(PlanError, match=r"pruner.package_bytes=(\d+)") as err:
        check_fits(plan, sizes, cfg.calibration.batch_size)
    budget = int(err.value.args[0].split("pruner.package_bytes=")[1].split()[0])
    fixed_cfg = compose_cfg(*FAST, f"pruner.package_bytes={budget}")
    fixed, _ = memory_plan(fixed_cfg, resolve(fixed_cfg), adapter)
    fixed.capacity_bytes = plan.capacity_bytes
    check_fits(fixed, sizes, cfg.calibration.batch_size)  # the advice fits
    assert len(fixed.packages) > 1


def test_a_run_refuses_a_plan_that_does_not_fit_before_loading(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("obsdiff.run.device_capacity", lambda device: 10**6)  # a 1 MB device
    monkeypatch.setattr(ModelAdapter, "load", lambda self, cfg: pytest.fail("loaded weights"))
    with pytest.raises(PlanError, match="pruner.package_bytes=|calibration.batch_size=|model.offload"):
        run(compose_cfg(*FAST), tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["capacity_bytes"] == 10**6


@pytest.mark.parametrize("model", ["tiny_digits", "tiny_flux"])
def test_the_plan_is_within_20_percent_of_the_measured_peak(compose_cfg, model):
    """Predicted on ``meta`` from the config; measured on the real run's tensors (CPU: LiveBytes)."""
    cfg = compose_cfg(f"model={model}", *FAST, "calibration.batch_size=8")
    spec = resolve(cfg)
    adapter = get_adapter(spec.family, spec.options)
    plan, _ = memory_plan(cfg, spec, adapter)
    pipe = adapter.load(cfg.model)
    calib = prepare_calibration(adapter, pipe, cfg.calibration, cfg.schedule)
    adapter.offload_text_encoders(pipe)
    denoiser = adapter.denoiser(pipe)
    weights = sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()])
    with LiveBytes() as live:
        prune_groupwise(adapter, pipe, calib, _strategy(spec, spec.pattern()), spec.num_packages)
    measured = live.peak + weights
    print(f"{model}: plan {plan.peak_bytes} measured {measured} ratio {plan.peak_bytes / measured:.3f}")
    assert 0.8 <= plan.peak_bytes / measured <= 1.2, (plan.peak_bytes, measured)


def test_the_generic_adapter_plans_after_loading_on_a_meta_copy(compose_cfg, tmp_path):
    metrics = plan_only(compose_cfg("model=tiny_generic", *FAST), tmp_path)  # loads: it probes the pipeline
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert metrics["plan/num_packages"] == len(plan["packages"]) == 4
    assert plan["packages"][0]["shared"]  # the model-wide cross-attention K/V group, probed on meta


def test_an_offloaded_plan_holds_one_block_and_a_package_on_the_device(compose_cfg):
    plain_cfg, offload_cfg = compose_cfg(*FAST), compose_cfg(*FAST, "model.offload=group")
    spec = resolve(plain_cfg)
    adapter = get_adapter(spec.family, spec.options)
    plain, sizes = memory_plan(plain_cfg, spec, adapter)
    offloaded, _ = memory_plan(offload_cfg, resolve(offload_cfg), adapter)
    assert plain.onloaded_bytes is None and 0 < offloaded.onloaded_bytes < plain.denoiser_bytes
    assert offloaded.peak_bytes < plain.peak_bytes
    plain.capacity_bytes = int((max(sizes) + plain.denoiser_bytes) / 0.9)  # weights and one unit: no room
    with pytest.raises(PlanError, match="set model.offload=group"):
        check_fits(plain, sizes, 1)


def test_live_bytes_does_not_count_views_of_tensors_made_before_it():
    weight = torch.zeros(100, 100)
    with LiveBytes() as live:
        weight.t().detach().mul_(2)  # views and an in-place op: no new storage
        out = weight.sum(0)  # 400 bytes
    assert live.peak == 400
    del out
