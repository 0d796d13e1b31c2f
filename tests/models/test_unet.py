"""SDXL / SD2.1 UNet adapters: block order, the model-wide cross-attention K/V Hessian, structure, convs."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.timesteps import StepTracker
from obsdiff.layers import columns, layer_input, matrix
from obsdiff.models import ModelConfigError, get_adapter
from obsdiff.models.basic_block import BLOCK_UNITS
from obsdiff.solvers import Pattern, obs_solve

TINY = {"sdxl": "tiny_sdxl", "sd21": "tiny_sd21"}
HUB = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd21": "stabilityai/stable-diffusion-2-1-base"}


def model_cfg(path):
    return OmegaConf.create({"path": path, "device": "cpu", "torch_dtype": "float32"})


def tiny(family):
    adapter = get_adapter(family)
    config = adapter.denoiser_config(model_cfg(TINY[family]))
    torch.manual_seed(0)
    return adapter, config, adapter.empty_denoiser(config, device="cpu").eval()


@pytest.mark.parametrize(("family", "blocks"), [("sdxl", 70), ("sd21", 16)])
def test_block_count_from_the_config_matches_the_model(family, blocks):
    adapter = get_adapter(family)
    config = adapter.denoiser_config(model_cfg(HUB[family]))  # the shipped copy: no download
    assert adapter.num_blocks(config) == blocks
    model = adapter.empty_denoiser(config)  # meta
    assert len(adapter.blocks(model)) == blocks
    order = [path for path, _ in adapter.blocks(model)]
    first_up = next(i for i, p in enumerate(order) if p.startswith("up_blocks"))
    assert all(
        p.startswith("mid_block") for p in order[first_up - (10 if family == "sdxl" else 1) : first_up]
    )


@pytest.mark.parametrize("family", ["sdxl", "sd21"])
def test_tiny_block_count_from_the_config_matches_the_model(family):
    adapter, config, model = tiny(family)
    assert (
        adapter.num_blocks(config)
        == len(adapter.blocks(model))
        == sum(
            isinstance(m, type(model.get_submodule(adapter.blocks(model)[0][0]).transformer_blocks[0]))
            for m in model.modules()
        )
    )


def test_units_put_every_cross_kv_in_one_first_group_then_the_block_table():
    adapter, config, model = tiny("sdxl")
    units = adapter.units(model, None, adapter.default_targets)
    (kv,) = units[0]
    prefixes = [f"{p}.transformer_blocks.{j}" for p, j in adapter.blocks(model)]
    assert kv == tuple(f"{p}.attn2.to_{n}" for p in prefixes for n in "kv")
    assert len(units) == 1 + len(prefixes) * len(BLOCK_UNITS)
    assert units[1] == [tuple(f"{prefixes[0]}.attn1.to_{n}" for n in "qkv")]
    sub = adapter.units(model, [3, 5], ["attn2.to_k", "attn2.to_v", "ff.net.2"])
    assert sub == [
        [tuple(f"{prefixes[b]}.attn2.to_{n}" for b in (3, 5) for n in "kv")],
        [(f"{prefixes[3]}.ff.net.2",)],
        [(f"{prefixes[5]}.ff.net.2",)],
    ]


@pytest.mark.parametrize("family", ["sdxl", "sd21"])
def test_cross_kv_read_the_same_tensor_in_every_block(family):
    adapter = get_adapter(family)
    pipe = adapter.load(model_cfg(TINY[family]))
    denoiser = adapter.denoiser(pipe)
    (kv,) = adapter.units(denoiser, None, adapter.default_targets)[0]
    seen = []
    handles = [
        denoiser.get_submodule(n).register_forward_pre_hook(lambda m, a: seen.append(a[0].data_ptr()))
        for n in kv
    ]
    embeds = adapter.encode(pipe, ["a red digit"], 5.0, 1)
    adapter.denoise(pipe, embeds, [torch.Generator().manual_seed(0)], 1, 5.0, 32)
    for h in handles:
        h.remove()
    assert len(seen) == len(kv) and len(set(seen)) == 1


def test_model_wide_hessian_equals_every_per_block_hessian():
    adapter = get_adapter("sd21")
    pipe = adapter.load(model_cfg("tiny_sd21"))
    denoiser = adapter.denoiser(pipe)
    (kv,) = adapter.units(denoiser, None, adapter.default_targets)[0]
    per_block = [kv[i : i + 2] for i in range(0, len(kv), 2)]
    embeds = adapter.encode(pipe, ["a red digit", "two"], 5.0, 2)

    def capture(groups):
        tracker = StepTracker([0.5, 1.5])
        with capture_hessians(denoiser, groups, tracker) as hessians:
            adapter.denoise(pipe, embeds, [torch.Generator().manual_seed(i) for i in range(2)], 2, 5.0, 32,
                            callback=tracker.callback)  # fmt: skip
        return hessians

    shared, separate = capture([kv])[kv[0]], capture(per_block)
    assert shared.num_calls == 2  # once per denoiser call, not once per block
    for group in per_block:
        assert torch.equal(separate[group[0]].H, shared.H)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_cfg_doubles_the_rows_of_the_one_call_per_step(guidance):
    adapter = get_adapter("sdxl")
    pipe = adapter.load(model_cfg("tiny_sdxl"))
    denoiser = adapter.denoiser(pipe)
    rows = []

    def count(module, args, kwargs):
        rows.append(kwargs["encoder_hidden_states"].shape[0])

    handle = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    embeds = adapter.encode(pipe, ["a", "b", "c"], guidance, 3)
    adapter.denoise(pipe, embeds, [torch.Generator().manual_seed(i) for i in range(3)], 2, guidance, 32)
    handle.remove()
    calls = adapter.denoiser_calls(guidance, dict(denoiser.config))
    assert rows == [3 * calls[0]] * 2 and calls == ([2] if guidance > 1 else [1])


@pytest.mark.parametrize("family", ["sdxl", "sd21"])
def test_slicing_heads_and_geglu_neurons_is_lossless(family):
    adapter, config, model = tiny(family)
    masked = copy.deepcopy(model)
    b = 1
    units = adapter.structure_units(model, [b])
    assert [[g.key for g in unit] for unit in units] == [[f"{b}.attn1"], [f"{b}.attn2"], [f"{b}.ff"]]
    ff = units[2][0]
    assert ff.gated and len(ff.rows([0])) == 2 and ff.rows([0])[1] == ff.width  # value row j, gate row j + 4C
    removed = {units[0][0].key: [0], units[1][0].key: [1], ff.key: [0, 5, 7]}
    heads = units[0][0].num_heads
    for unit in units:
        (group,) = unit
        drop = removed[group.key]
        masked.get_submodule(group.outputs[0]).weight.data[:, group.columns(drop)] = 0
        for name in getattr(group, "inputs", ()) or group.up:  # masking the rows too: bias-free zeros
            layer = masked.get_submodule(name)
            layer.weight.data[group.rows(drop)] = 0
            if layer.bias is not None:
                layer.bias.data[group.rows(drop)] = 0
        adapter.remove_structure(model, unit, removed)
    path, j = adapter.blocks(model)[b]
    block = model.get_submodule(f"{path}.transformer_blocks.{j}")
    assert block.attn1.heads == block.attn2.heads == heads - 1
    arch = adapter.architecture(model)
    assert arch == {str(b): {"attn1": heads - 1, "attn2": heads - 1, "ff": ff.width - 3}}
    inputs = adapter.example_inputs(masked, 2, 8, 77, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, masked(**inputs).sample, rtol=1e-5, atol=1e-5)
    fresh = adapter.empty_denoiser(config, device="meta")
    adapter.reshape(fresh, arch)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_parameter_count_drops_by_the_analytic_count():
    from obsdiff.evaluation.cost import count_params, denoiser_cost

    adapter, config, model = tiny("sdxl")
    dense = count_params(model)
    path, j = adapter.blocks(model)[2]
    block = model.get_submodule(f"{path}.transformer_blocks.{j}")
    C, hd, ctx = (
        block.attn1.to_q.in_features,
        block.attn1.inner_dim // block.attn1.heads,
        config["cross_attention_dim"],
    )
    arch = {"2": {"attn1": block.attn1.heads - 1, "attn2": block.attn2.heads - 1, "ff": 4 * C - 10}}
    # a head: q,k,v rows (attn1: 3 C inputs, no bias) + to_out columns; attn2: q from C, k,v from ctx
    removed = hd * (3 * C + C) + hd * (C + 2 * ctx + C) + 10 * (2 * (C + 1) + C)  # GEGLU: 2 rows + bias each
    cost = denoiser_cost(adapter, config, arch, [2], 8, 77)
    assert dense - cost["params"] == removed
    assert cost["tflops"] < denoiser_cost(adapter, config, {}, [2], 8, 77)["tflops"]


def test_nm_needs_m_to_divide_every_stage_width_and_the_head_check_uses_the_fewest_heads():
    adapter = get_adapter("sd21")
    config = adapter.denoiser_config(model_cfg("tiny_sd21"))
    assert adapter.target_widths(config, ["attn1.to_q", "attn2.to_k", "ff.net.2"]) == {
        "attn1.to_q": 32,
        "attn2.to_k": 32,
        "ff.net.2": 128,
    }  # fmt: skip  (stages of 32 and 64 channels: the gcd)
    assert adapter.attention_heads(config) == {"attn1": 2, "attn2": 2}
    sdxl = get_adapter("sdxl").denoiser_config(model_cfg(HUB["sdxl"]))
    assert get_adapter("sdxl").attention_heads(sdxl) == {"attn1": 10, "attn2": 10}  # stage 0 has no attention
    with pytest.raises(ModelConfigError, match="proj_mid"):
        adapter.check(model_cfg("tiny_sd21"), None, ["proj_mid"])
    assert adapter.check(model_cfg("tiny_sd21"), None, ["proj_in"]) == {"proj_in": 32}


def test_plan_says_the_cross_kv_hessian_is_shared_model_wide():
    from obsdiff.packages import split_packages
    from obsdiff.plan import packages_table
    from obsdiff.prune import package_summaries
    from obsdiff.pruners.layerwise import LayerwiseStrategy

    adapter = get_adapter("sdxl")
    config = adapter.denoiser_config(model_cfg(HUB["sdxl"]))
    model = adapter.empty_denoiser(config)  # meta: the real SDXL shape without weights
    strategy = LayerwiseStrategy(None, Pattern("unstructured", 0.5), adapter.default_targets)
    plans = package_summaries(model, strategy, split_packages(strategy.units(adapter, model), 4))
    (shared,) = plans[0].shared
    assert shared[2] == 140  # to_k and to_v of all 70 blocks: one 2048² Hessian
    assert "one Hessian for 140 layers reading one input" in packages_table(plans)
    units = strategy.units(adapter, model)
    (kv,) = units[0]
    per_block = [[kv[i : i + 2]] for i in range(0, len(kv), 2)] + units[1:]  # one K/V Hessian per block
    unshared = package_summaries(model, strategy, split_packages(per_block, 4))
    saved = sum(p.hessian_bytes for p in unshared) - sum(p.hessian_bytes for p in plans)
    assert saved == 69 * (4 * 2048**2 + 8 * 2048)  # 1.16 GB of fp32 Hessians (and fp64 column sums)
    assert sum(p.hessians for p in unshared) - sum(p.hessians for p in plans) == 69


def test_conv_solve_equals_the_solve_of_its_unfolded_linear_form():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=1)
    x = torch.randn(4, 3, 6, 6)
    X = layer_input(conv, x)  # (B, positions, 27)
    assert columns(conv) == 27 and X.shape == (4, 36, 27)
    linear = nn.Linear(27, 5)
    linear.weight.data = matrix(conv).clone()
    linear.bias.data = conv.bias.data.clone()
    out = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(linear(X), out, rtol=1e-5, atol=1e-5)  # the unfolded form is the conv
    tracker = StepTracker([1.0])
    with capture_hessians(nn.ModuleDict({"c": conv, "l": linear}), [("c",), ("l",)], tracker) as hessians:
        conv(x), linear(X)
    assert torch.equal(hessians["c"].H, hessians["l"].H)
    pattern = Pattern("unstructured", 0.5)
    a = obs_solve(matrix(conv), hessians["c"].H, pattern, 0.01, 128)
    b = obs_solve(linear.weight.data, hessians["l"].H, pattern, 0.01, 128)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    matrix(conv).copy_(a.weight)  # a view: the conv itself is pruned
    assert float((conv.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_grouped_convs_are_refused():
    with pytest.raises(ValueError, match="groups=2"):
        columns(nn.Conv2d(4, 4, 3, groups=2))


def test_conv_proj_in_of_a_unet_without_linear_projection_is_a_target():
    adapter = get_adapter("sd21")
    config = {**adapter.denoiser_config(model_cfg("tiny_sd21")), "use_linear_projection": False}
    model = adapter.empty_denoiser(config, device="cpu")
    units = adapter.units(model, [0], ["proj_in", "proj_out"])
    assert units == [[("down_blocks.0.attentions.0.proj_in",)], [("down_blocks.0.attentions.0.proj_out",)]]
    assert isinstance(model.get_submodule(units[0][0][0]), nn.Conv2d)


def test_shipped_hub_configs_are_json():
    for family in HUB:
        adapter = get_adapter(family)
        assert json.dumps(adapter.denoiser_config(model_cfg(HUB[family])))


def test_conv_proj_in_and_proj_out_are_pruned_through_the_package_loop(tmp_path):
    """An SD1.x-style UNet (``use_linear_projection=false``): conv targets go through calibration,
    the unfolded-input Hessian and the OBS solve, and come out 50 % sparse with a finite loss."""
    from obsdiff.calibration.timesteps import timestep_weights
    from obsdiff.models.tiny_unet import TINY_SD21, build_tiny_sd21_pipeline
    from obsdiff.prune import Calibration, prune_groupwise
    from obsdiff.pruners.layerwise import LayerwiseStrategy
    from obsdiff.solvers import layer_solver

    config = json.loads(TINY_SD21.read_text())
    config["unet"]["use_linear_projection"] = False
    (tmp_path / "conv.json").write_text(json.dumps(config))
    pipe = build_tiny_sd21_pipeline(tmp_path / "conv.json")
    pipe.set_progress_bar_config(disable=True)
    adapter = get_adapter("sd21")
    calib = Calibration(
        embeds=adapter.encode(pipe, ["a red digit", "two"], 5.0, 2), seeds=[0, 1], num_steps=2,
        guidance_scale=5.0, resolution=32, batch_size=2,
        timestep_weights=timestep_weights("uniform", 2, 1, 1),
    )  # fmt: skip
    strategy = LayerwiseStrategy(
        layer_solver("obs", "obs"), Pattern("unstructured", 0.5), list(PROJ := ("proj_in", "proj_out"))
    )
    records = prune_groupwise(adapter, pipe, calib, strategy, num_packages=2)
    assert len(records) == 2 * len(adapter.transformers(pipe.unet)) and all(
        r.name.endswith(PROJ) for r in records
    )
    for r in records:
        conv = pipe.unet.get_submodule(r.name)
        assert isinstance(conv, nn.Conv2d) and r.cols == columns(conv)
        assert float((conv.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert 0 < r.loss < 1
