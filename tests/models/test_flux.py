"""Flux.1 adapter on the tiny random Flux pipeline: units, shared Hessians, guidance modes, structure."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.timesteps import StepTracker
from obsdiff.models import get_adapter
from obsdiff.models.base import KNOWN_CONFIGS
from obsdiff.models.structure import HeadGroup, NeuronGroup
from obsdiff.prune import Calibration, calibrate, prune_groupwise
from obsdiff.pruners.structured import StructuredStrategy
from obsdiff.solvers.structured import StructuredPattern

TINY_FLUX = {"family": "flux", "name": "tiny_flux", "path": "tiny", "torch_dtype": "float32", "device": "cpu",
             "options": {"max_sequence_length": 16}}  # fmt: skip
PROMPTS = ["a red 7 on blue", "a green 3", "the digit one", "a white 9 on black"]


def tiny_flux(**options):
    adapter = get_adapter("flux", {**TINY_FLUX["options"], **options})
    return adapter, adapter.load(OmegaConf.create(TINY_FLUX))


def calibration(adapter, pipe, guidance: float, steps: int = 3, prompts=PROMPTS) -> Calibration:
    return Calibration(
        embeds=adapter.encode(pipe, prompts, guidance, len(prompts)),
        seeds=list(range(len(prompts))),
        num_steps=steps,
        guidance_scale=guidance,
        resolution=32,
        batch_size=2,
        timestep_weights=[1.0] * steps,
    )


def test_blocks_targets_and_units_follow_the_two_block_kinds():
    adapter, pipe = tiny_flux()
    den = pipe.transformer
    assert adapter.num_blocks(den.config) == 4  # 2 double + 2 single
    units = adapter.units(den, None, adapter.default_targets)
    assert len(units) == 2 * 4 + 2 * 2
    single_inputs = units[8]  # first single block: one input group of four layers
    assert single_inputs == [tuple(f"single_transformer_blocks.0.{n}" for n in
                                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))]  # fmt: skip
    assert units[9] == [("single_transformer_blocks.0.proj_out",)]
    widths = adapter.target_widths(den.config, ["single.proj_out", "ff.net.2", "attn.to_q"])
    assert widths == {"single.proj_out": 32 + 128, "ff.net.2": 128, "attn.to_q": 32}
    assert widths["single.proj_out"] == den.single_transformer_blocks[0].proj_out.in_features
    assert adapter.units(den, [3], ["single.proj_mlp"]) == [[("single_transformer_blocks.1.proj_mlp",)]]


def test_one_accumulator_serves_the_four_single_block_layers():
    adapter, pipe = tiny_flux()
    calib = calibration(adapter, pipe, guidance=3.5, steps=2, prompts=PROMPTS[:2])
    group = adapter.units(pipe.transformer, [2], adapter.default_targets)[0][0]
    seen = []
    layer = pipe.transformer.get_submodule(group[-1])  # proj_mlp: record what it reads
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    tracker = StepTracker(calib.timestep_weights)
    with capture_hessians(pipe.transformer, [group], tracker) as hessians:
        calibrate(adapter, pipe, calib, tracker, progress=_NoBar())
    handle.remove()
    assert len({id(hessians[name]) for name in group}) == 1 and len(group) == 4
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    rows = sum(x.shape[0] for x in seen)  # the running mean is weighted by α × batch (α = 1 here)
    torch.testing.assert_close(hessians[group[0]].H, 2 * X.T @ X / rows, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options, guidance, calls_per_step",
    [({}, 3.5, 1), ({"true_cfg_scale": 2.0}, 3.5, 2)],
    ids=["guidance-distilled", "true-cfg"],
)
def test_hessian_samples_count_sampler_steps_not_denoiser_calls(options, guidance, calls_per_step):
    adapter, pipe = tiny_flux(**options)
    steps = 3
    assert adapter.denoiser_calls(guidance, pipe.transformer.config) == [1] * calls_per_step
    calib = calibration(adapter, pipe, guidance, steps=steps, prompts=PROMPTS[:2])
    name = "transformer_blocks.0.attn.to_out.0"
    tracker = StepTracker([1.0, 2.0, 3.0])
    with capture_hessians(pipe.transformer, [(name,)], tracker) as hessians:
        calibrate(adapter, pipe, calib, tracker, progress=_NoBar())  # raises unless steps == 3
    acc = hessians[name]
    assert tracker.step == steps
    assert acc.num_calls == steps * calls_per_step  # one sampler call (batch 2): T or 2T denoiser calls
    assert acc.weight_sum == pytest.approx(calls_per_step * 2 * (1.0 + 2.0 + 3.0))  # α_i × rows per call


def test_without_guidance_embedding_cfg_means_two_calls():
    adapter = get_adapter("flux")
    schnell = json.loads((KNOWN_CONFIGS / "flux_schnell.json").read_text())
    dev = json.loads((KNOWN_CONFIGS / "flux_dev.json").read_text())
    assert adapter.denoiser_calls(0.0, schnell) == [1] and adapter.denoiser_calls(5.0, schnell) == [1, 1]
    assert adapter.denoiser_calls(3.5, dev) == [1]
    assert get_adapter("sd3").denoiser_calls(7.0, {}) == [2]


def test_flux_dev_structure_from_its_config_head_dim_128():
    adapter = get_adapter("flux")
    config = adapter.denoiser_config(OmegaConf.create({"path": "black-forest-labs/FLUX.1-dev"}))
    model = adapter.empty_denoiser(config)  # meta: no memory
    assert adapter.num_blocks(config) == 57 and adapter.default_blocks(config, structured=True) == list(
        range(1, 56)
    )
    (double_heads,), ffns, single = (
        *adapter.structure_units(model, [0]),
        *adapter.structure_units(model, [19]),
    )
    assert double_heads.head_dim == 128 and double_heads.cols == (0, 3072) and double_heads.num_heads == 24
    assert [g.name for g in ffns] == ["ff", "ff_context"] and ffns[0].width == 12288
    heads, mlp = single
    assert isinstance(heads, HeadGroup) and isinstance(mlp, NeuronGroup)
    assert heads.outputs == mlp.outputs == ("single_transformer_blocks.0.proj_out",)
    assert heads.cols == (0, 3072) and mlp.cols == (3072, 15360) and heads.head_dim == 128


def _masked(pipe, unit, removed):
    """The same removal as zero output-projection columns (the model keeps its shapes)."""
    for group in unit:
        for name in group.outputs:
            pipe.transformer.get_submodule(name).weight.data[:, group.columns(removed[group.key])] = 0


@pytest.mark.parametrize("block", [1, 3], ids=["double", "single"])
def test_slicing_is_lossless(block):
    adapter, pipe = tiny_flux()
    masked = copy.deepcopy(pipe)
    (*units,) = adapter.structure_units(pipe.transformer, [block])
    for unit in units:
        removed = {g.key: [1] if isinstance(g, HeadGroup) else [0, 5, 77, 127] for g in unit}
        _masked(masked, unit, removed)
        adapter.remove_structure(pipe.transformer, unit, removed)
    arch = adapter.architecture(pipe.transformer)
    shape = {"attn": 1, "ff": 124, "ff_context": 124} if block == 1 else {"attn": 1, "mlp": 124}
    assert arch == {str(block): shape}
    inputs = adapter.example_inputs(masked.transformer, 2, 16, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = masked.transformer(**inputs).sample, pipe.transformer(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a dense model given the architecture has the same shapes (load_pruned's path)
    _, fresh = tiny_flux()
    adapter.reshape(fresh.transformer, arch)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh.transformer) == shapes(pipe.transformer)


def test_structured_prune_removes_heads_and_mlp_of_a_single_block_jointly():
    adapter, pipe = tiny_flux()
    strategy = StructuredStrategy("obs", StructuredPattern(0.5, 0.5, 0.25), blocks=[3])
    records = prune_groupwise(
        adapter, pipe, calibration(adapter, pipe, 3.5, steps=2), strategy, num_packages=1
    )
    (record,) = records  # one OBS layer (proj_out) for both groups
    assert record.name == "single_transformer_blocks.1.proj_out"
    assert record.sparsity == (16 + 32) / 160  # one head of 16 columns + 32 of 128 MLP columns
    assert sorted(strategy.removed) == ["3.attn", "3.mlp"] and len(strategy.removed["3.mlp"]) == 32
    block = pipe.transformer.single_transformer_blocks[1]
    assert block.proj_out.in_features == 16 + 96 and block.attn.heads == 1 and block.mlp_hidden_dim == 96


class _NoBar:
    def update(self, n):
        pass
