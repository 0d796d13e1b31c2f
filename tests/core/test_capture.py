"""Hessian capture on the tiny SD3 pipeline: shared inputs, CFG, steps, packages (docs/METHOD.md §2-3)."""

import math

import pytest
import torch
from diffusers import SD3Transformer2DModel

import obsdiff.prune as prune_mod
from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.prompts import tiny_prompts
from obsdiff.calibration.timesteps import StepTracker, timestep_weights
from obsdiff.models.sd3 import SD3_TARGETS, SD3Adapter
from obsdiff.packages import split_packages
from obsdiff.prune import Calibration, calibrate, prune_groupwise
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.solvers import Pattern, layer_solver

QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")


def make_calib(adapter, pipe, num_prompts=2, batch_size=2, steps=3, guidance=7.0, schedule="log_decrease"):
    embeds = adapter.encode(pipe, tiny_prompts()[:num_prompts], guidance, batch_size)
    return Calibration(embeds, list(range(num_prompts)), steps, guidance, 32, batch_size,
                       timestep_weights(schedule, steps))  # fmt: skip


def obs_strategy(pattern, targets, blocks=None):
    """OBS mask and update (``obs_solve``) on every target layer."""
    return LayerwiseStrategy(layer_solver("obs", "obs"), pattern, targets, blocks)


class NoProgress:
    def update(self, n):
        pass


def run_capture(adapter, pipe, calib, groups):
    tracker = StepTracker(calib.timestep_weights)
    with capture_hessians(pipe.transformer, groups, tracker) as hessians:
        calibrate(adapter, pipe, calib, tracker, NoProgress())
    return hessians


def test_layers_with_identical_inputs_share_one_hessian(tiny_pipe):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe)
    shared = run_capture(adapter, pipe, calib, [QKV])
    separate = run_capture(adapter, pipe, calib, [(n,) for n in QKV])
    assert shared[QKV[0]] is shared[QKV[1]] is shared[QKV[2]]
    for name in QKV:
        torch.testing.assert_close(shared[name].H, separate[name].H)
    assert separate[QKV[0]] is not separate[QKV[1]]


def test_hooks_are_removed_even_after_an_error(tiny_pipe):
    _, pipe = tiny_pipe
    layer = pipe.transformer.get_submodule(QKV[0])
    with pytest.raises(RuntimeError, match="boom"):
        with capture_hessians(pipe.transformer, [QKV], StepTracker([1.0])):
            assert len(layer._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_pre_hooks) == 0


@pytest.mark.parametrize("guidance,factor", [(7.0, 2), (1.0, 1)])
def test_every_step_counts_and_cfg_doubles_the_batch(tiny_pipe, guidance, factor):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe, num_prompts=3, batch_size=2, steps=4, guidance=guidance)
    acc = run_capture(adapter, pipe, calib, [QKV])[QKV[0]]
    assert acc.num_calls == 4 * 2  # every step of both sampler calls
    # running-mean weight = Σ_i α_i × batch, with the CFG-doubled batch
    assert acc.weight_sum == pytest.approx(sum(calib.timestep_weights) * factor * 3)


def test_hessian_does_not_depend_on_batch_size(tiny_pipe):
    adapter, pipe = tiny_pipe
    one = run_capture(adapter, pipe, make_calib(adapter, pipe, num_prompts=4, batch_size=1), [QKV])
    four = run_capture(adapter, pipe, make_calib(adapter, pipe, num_prompts=4, batch_size=4), [QKV])
    torch.testing.assert_close(one[QKV[0]].H, four[QKV[0]].H, rtol=1e-4, atol=1e-5)


def test_schedule_changes_the_hessian(tiny_pipe):
    adapter, pipe = tiny_pipe
    a = run_capture(adapter, pipe, make_calib(adapter, pipe, schedule="uniform"), [QKV])[QKV[0]].H
    b = run_capture(adapter, pipe, make_calib(adapter, pipe, schedule="log_decrease"), [QKV])[QKV[0]].H
    assert not torch.allclose(a / a.trace(), b / b.trace(), rtol=1e-4)


def test_sd3_medium_units_split_into_4_packages_of_24():
    with torch.device("meta"):
        model = SD3Transformer2DModel(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                      joint_attention_dim=4096, caption_projection_dim=1536,
                                      pooled_projection_dim=2048, in_channels=16, out_channels=16,
                                      sample_size=128, pos_embed_max_size=192)  # fmt: skip
    units = SD3Adapter().units(model, None, list(SD3_TARGETS))
    assert len(units) == 96
    assert [len(p) for p in split_packages(units, 4)] == [24] * 4
    add_qkv = tuple(f"transformer_blocks.0.attn.add_{c}_proj" for c in "qkv")
    assert units[0] == [QKV, add_qkv]
    last = [g for unit in units[-4:] for g in unit]  # context_pre_only block: no to_add_out, no ff_context
    assert ("transformer_blocks.23.attn.to_out.0",) in last
    assert not any("to_add_out" in n or "ff_context" in n for g in last for n in g)


@pytest.mark.slow  # seconds on an idle CPU, tens under load
def test_package_k_is_calibrated_on_the_partially_pruned_model(tiny_pipe, monkeypatch):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe, num_prompts=1, batch_size=1, steps=2)
    units = adapter.units(pipe.transformer, None, list(adapter.default_targets))
    packages = split_packages(units, 3)
    layers = [[n for unit in p for g in unit for n in g] for p in packages]
    seen = []
    real_calibrate = prune_mod.calibrate

    def spy(*args, **kwargs):
        zero = [[float((pipe.transformer.get_submodule(n).weight == 0).float().mean()) for n in names]
                for names in layers]  # fmt: skip
        seen.append([sum(z) / len(z) for z in zero])
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "calibrate", spy)
    strategy = obs_strategy(Pattern("unstructured", ratio=0.5), list(adapter.default_targets))
    records = prune_groupwise(adapter, pipe, calib, strategy, 3)
    assert len(seen) == 3
    for k, fractions in enumerate(seen):
        for j, frac in enumerate(fractions):
            assert (frac > 0.45) if j < k else (frac < 0.01), (k, j, frac)
    assert {r.package for r in records} == {0, 1, 2}
    assert all(math.isfinite(r.loss) and 0 <= r.loss < 1 for r in records)


@pytest.mark.slow  # sampler-heavy: full tier only
def test_nm_run_gives_exact_pattern_on_every_target(tiny_pipe):
    adapter, pipe = tiny_pipe
    calib = make_calib(adapter, pipe, num_prompts=1, batch_size=1, steps=2)
    strategy = obs_strategy(Pattern("nm", n=2, m=4), list(adapter.default_targets))
    records = prune_groupwise(adapter, pipe, calib, strategy, 2)
    for r in records:
        W = pipe.transformer.get_submodule(r.name).weight
        assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2), r.name


def test_a_nan_in_the_model_stops_pruning_naming_the_layer(tiny_pipe):
    adapter, pipe = tiny_pipe
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].ff.net[2].weight[0, 0] = float("nan")  # poisons block 1
    before = pipe.transformer.transformer_blocks[1].attn.to_q.weight.clone()
    strategy = obs_strategy(Pattern("unstructured", ratio=0.5), SD3_TARGETS, blocks=[1])
    message = r"Hessian of layer transformer_blocks\.1\.\S+ holds NaN"
    with pytest.raises(prune_mod.NonFiniteError, match=message):
        prune_groupwise(adapter, pipe, make_calib(adapter, pipe), strategy, 1)
    assert torch.equal(pipe.transformer.transformer_blocks[1].attn.to_q.weight, before)  # nothing solved


def test_pruning_runs_at_full_fp32_precision_and_restores_the_setting(tiny_pipe, monkeypatch):
    adapter, pipe = tiny_pipe
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a: seen.append(torch.get_float32_matmul_precision())
    )
    torch.set_float32_matmul_precision("medium")  # e.g. a user's TF32 setting
    try:
        calib = make_calib(adapter, pipe, steps=2)
        prune_groupwise(
            adapter, pipe, calib, obs_strategy(Pattern("unstructured", 0.5), ["attn.to_q"], [0]), 1
        )
        assert seen and set(seen) == {"highest"}  # calibration (and the solves) without TF32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
        hook.remove()
