"""PixArt-Σ adapter on the tiny random PixArt pipeline: shared cross K/V, structure, cost, CFG rows."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from obsdiff.calibration.capture import capture_hessians
from obsdiff.calibration.timesteps import StepTracker
from obsdiff.config import ConfigError, check_against_model
from obsdiff.evaluation.cost import denoiser_cost
from obsdiff.models import ModelConfigError, basic_block, get_adapter
from obsdiff.models.base import KNOWN_CONFIGS
from obsdiff.models.structure import HeadGroup, NeuronGroup
from obsdiff.prune import Calibration, calibrate

TINY = {"family": "pixart", "name": "tiny_pixart", "path": "tiny", "torch_dtype": "float32", "device": "cpu",
        "options": {"max_sequence_length": 16}}  # fmt: skip
HUB_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
PROMPTS = ["a red 7 on blue", "a green 3", "the digit one", "a white 9 on black"]
CROSS_KV = [f"transformer_blocks.{b}.attn2.to_{n}" for b in range(4) for n in "kv"]


def tiny_pixart():
    adapter = get_adapter("pixart", TINY["options"])
    return adapter, adapter.load(OmegaConf.create(TINY))


def sigma_config() -> dict:
    return json.loads((KNOWN_CONFIGS / "pixart_sigma.json").read_text())


def calibration(adapter, pipe, guidance: float, steps: int = 3, prompts=PROMPTS) -> Calibration:
    return Calibration(
        embeds=adapter.encode(pipe, prompts, guidance, len(prompts)),
        seeds=list(range(len(prompts))),
        num_steps=steps,
        guidance_scale=guidance,
        resolution=32,
        batch_size=2,
        timestep_weights=[1.0, 2.0, 3.0][:steps],
    )


class _NoBar:
    def update(self, n):
        pass


# -- config questions -----------------------------------------------------------------------------


def test_sigma_config_facts_offline():
    adapter = get_adapter("pixart")
    config = adapter.denoiser_config(OmegaConf.create({"path": HUB_ID}))  # the shipped copy (offline)
    assert config == sigma_config()
    assert adapter.num_blocks(config) == 28
    assert adapter.default_blocks(config, structured=True) == list(range(1, 27))
    assert adapter.attention_heads(config) == {"attn1": 16, "attn2": 16}
    widths = adapter.target_widths(config, ["attn1.to_q", "attn2.to_k", "ff.net.2"])
    assert widths == {"attn1.to_q": 1152, "attn2.to_k": 1152, "ff.net.2": 4608}
    assert adapter.denoiser_calls(4.5, config) == [2] and adapter.denoiser_calls(1.0, config) == [1]
    assert adapter.resolution_grid(OmegaConf.create({"path": HUB_ID}), config) == (16, None)
    tiny = get_adapter("pixart", TINY["options"])
    assert tiny.resolution_grid(OmegaConf.create(TINY), tiny.denoiser_config(OmegaConf.create(TINY))) == (
        8,
        None,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_sequence_length": 0}, "max_sequence_length=0"),
        ({"max_sequence_length": "300"}, "max_sequence_length='300'"),
        ({"max_sequence_length": 513}, "max_sequence_length=513"),
        ({"text_encoder_3": None}, "unknown ['text_encoder_3']"),
    ],
)
def test_bad_options_are_refused_with_the_allowed_values(options, message):
    with pytest.raises(ModelConfigError, match="allowed") as err:
        get_adapter("pixart", options)
    assert message in str(err.value)


def test_config_questions_import_no_torch():
    code = (
        "import sys\nfrom omegaconf import OmegaConf\nfrom obsdiff.models import get_adapter\n"
        f"a = get_adapter('pixart')\nc = a.denoiser_config(OmegaConf.create({{'path': {HUB_ID!r}}}))\n"
        "a.check(OmegaConf.create({'path': %r}), [1, 2], list(a.default_targets))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))\n"
    ) % HUB_ID
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# -- units and the shared cross-attention input ------------------------------------------------------


def test_cross_kv_of_every_block_is_the_first_unit_then_the_block_units():
    adapter, pipe = tiny_pixart()
    units = adapter.units(pipe.transformer, None, adapter.default_targets)
    assert units[0] == [tuple(CROSS_KV)]  # one input group, one Hessian for all 8 layers
    per_block = [[tuple(f"transformer_blocks.{b}.{n}" for n in g) for g in u]
                 for b in range(4) for u in basic_block.BLOCK_UNITS]  # fmt: skip
    assert units[1:] == per_block and len(units) == 1 + 4 * 6
    # a block subset keeps only its own K/V in the shared unit
    subset = adapter.units(pipe.transformer, [2, 1], ["attn2.to_v", "ff.net.2"])
    assert subset[0] == [("transformer_blocks.1.attn2.to_v", "transformer_blocks.2.attn2.to_v")]
    assert subset[1:] == [[("transformer_blocks.1.ff.net.2",)], [("transformer_blocks.2.ff.net.2",)]]


def test_cross_kv_layers_read_the_same_tensor_in_every_block():
    adapter, pipe = tiny_pixart()
    den, seen = pipe.transformer, []
    hook = lambda m, args: seen.append((args[0], args[0].data_ptr()))  # noqa: E731
    handles = [den.get_submodule(n).register_forward_pre_hook(hook) for n in CROSS_KV]
    try:
        inputs = adapter.example_inputs(den, 2, 16, 16, torch.Generator().manual_seed(0))
        with torch.no_grad():
            den(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(CROSS_KV)
    first = seen[0][0]
    assert all(x is first and ptr == first.data_ptr() for x, ptr in seen)
    assert first.shape == (2, 16, den.config.cross_attention_dim)  # the caption projection's output


@pytest.mark.parametrize("guidance, rows", [(4.5, 2), (1.0, 1)], ids=["cfg", "no-cfg"])
def test_calibration_rows_per_call_follow_cfg_and_steps_are_counted(guidance, rows):
    adapter, pipe = tiny_pixart()
    assert adapter.denoiser_calls(guidance, pipe.transformer.config) == [rows]
    steps, batch = 3, 2
    calib = calibration(adapter, pipe, guidance, steps=steps, prompts=PROMPTS[:batch])
    assert calib.embeds["prompt_embeds"].shape == (batch, 16, 32)  # T5 tokens x caption channels
    assert ("negative_prompt_embeds" in calib.embeds) == (guidance > 1)
    seen = []
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn1.to_q")
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    groups = [tuple(CROSS_KV), ("transformer_blocks.1.attn1.to_q", "transformer_blocks.1.attn1.to_k")]
    tracker = StepTracker(calib.timestep_weights)
    try:
        with capture_hessians(pipe.transformer, groups, tracker) as hessians:
            calibrate(adapter, pipe, calib, tracker, progress=_NoBar())  # raises unless 3 steps counted
    finally:
        handle.remove()
    assert tracker.step == steps  # the legacy pipeline callback advanced the tracker
    assert seen == [rows * batch] * steps  # one denoiser call per step on the (doubled) batch
    assert len({id(hessians[n]) for n in CROSS_KV}) == 1
    for acc in (hessians[CROSS_KV[0]], hessians[groups[1][0]]):
        assert acc.num_calls == steps
        assert acc.weight_sum == pytest.approx(rows * batch * (1.0 + 2.0 + 3.0))  # α_i × rows per call
    assert hessians[CROSS_KV[0]].tokens == 16 and hessians[groups[1][0]].tokens == 64


# -- structure ----------------------------------------------------------------------------------------


def test_structure_units_of_a_block_head_dim_12():
    adapter, pipe = tiny_pixart()
    attn1, attn2, ff = (g for (g,) in adapter.structure_units(pipe.transformer, [1]))
    prefix = "transformer_blocks.1"
    for group, name in ((attn1, "attn1"), (attn2, "attn2")):
        assert isinstance(group, HeadGroup) and group.key == f"1.{name}"
        assert group.head_dim == 12 and group.num_heads == 3 and group.cols == (0, 36)
        assert group.inputs == tuple(f"{prefix}.{name}.to_{n}" for n in "qkv")
        assert group.outputs == (f"{prefix}.{name}.to_out.0",)
    assert isinstance(ff, NeuronGroup) and not ff.gated and ff.width == 144
    assert ff.down == f"{prefix}.ff.net.2" and ff.up == (f"{prefix}.ff.net.0.proj",)


def _mask(model, unit, removed):
    """The removal as zeros: the heads' Q/K/V rows (and biases), the neurons' up rows and down columns."""
    for group in unit:
        drop = removed[group.key]
        for name in group.inputs if isinstance(group, HeadGroup) else group.up:
            layer = model.get_submodule(name)
            layer.weight.data[group.rows(drop)] = 0
            layer.bias.data[group.rows(drop)] = 0
        if isinstance(group, NeuronGroup):
            model.get_submodule(group.down).weight.data[:, group.columns(drop)] = 0


def test_slicing_equals_masking_and_the_architecture_rebuilds_on_meta():
    adapter, pipe = tiny_pixart()
    model = pipe.transformer
    masked = copy.deepcopy(model)
    inputs = adapter.example_inputs(model, 2, 16, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(**inputs).sample
    removed = {"1.attn1": [1], "1.attn2": [2], "1.ff": [0, 5, 77, 143], "2.attn1": [0, 2]}
    for unit in adapter.structure_units(model, [1, 2]):
        picked = {g.key: removed[g.key] for g in unit if g.key in removed}
        if picked:
            _mask(masked, unit, picked)
            adapter.remove_structure(model, unit, picked)
    block1, block2 = model.transformer_blocks[1], model.transformer_blocks[2]
    assert (block1.attn1.heads, block1.attn2.heads, block2.attn1.heads) == (2, 2, 1)  # processors read these
    assert block1.attn1.to_q.out_features == 24 and block1.attn2.to_k.out_features == 24
    assert block1.ff.net[2].in_features == 140
    arch = adapter.architecture(model)
    assert arch == {"1": {"attn1": 2, "attn2": 2, "ff": 140}, "2": {"attn1": 1}}
    with torch.no_grad():
        want, got = masked(**inputs).sample, model(**inputs).sample
    assert not torch.allclose(want, dense, atol=1e-4)  # the removal changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fresh = adapter.empty_denoiser(dict(model.config))  # meta: shapes only
    adapter.reshape(fresh, arch)
    assert adapter.architecture(fresh) == arch
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh) == shapes(model)


def test_cost_of_a_structured_shape_matches_the_analytic_count():
    """PixArt-Σ-XL at 512 px (64² latent → 1024 tokens), 300 T5 tokens, CFG rows 2."""
    adapter, config = get_adapter("pixart"), sigma_config()
    dim, hd, cross = 1152, 72, config["cross_attention_dim"]
    latent, text, rows = 64, 300, 2
    N = (latent // config["patch_size"]) ** 2  # image tokens
    arch = {"5": {"attn1": 14, "attn2": 15, "ff": 4000}, "20": {"ff": 4600}}
    dense = denoiser_cost(adapter, config, {}, [rows], latent, text)
    pruned = denoiser_cost(adapter, config, arch, [rows], latent, text)
    h1, h2, n = 2 * hd, 1 * hd, (4608 - 4000) + (4608 - 4600)  # removed head widths, removed neurons
    params = (
        h1 * (3 * (dim + 1) + dim)  # attn1: q/k/v rows + biases, to_out columns
        + h2 * ((dim + 1) + 2 * (cross + 1) + dim)  # attn2: q rows on the image, k/v rows on the text
        + n * ((dim + 1) + dim)  # ff: up rows + biases, down columns
    )
    assert dense["params"] - pruned["params"] == params
    flops = rows * (
        2 * N * dim * h1 * 4 + 4 * N * N * h1  # attn1: q, k, v, to_out; QKᵀ and AV
        + 2 * N * dim * h2 * 2 + 2 * 2 * text * cross * h2 + 4 * N * text * h2  # attn2
        + 4 * N * dim * n  # ff up and down
    )  # fmt: skip
    assert (dense["tflops"] - pruned["tflops"]) * 1e12 == pytest.approx(flops, rel=1e-9)
    assert dense["params"] == sum(p.numel() for p in adapter.empty_denoiser(config).parameters())


RUN = ["calibration=tiny", "calibration.num_prompts=8", "eval=none", "logger=none"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=pixart_sigma", "calibration.resolution=1000"], "a multiple of 16"),
        (["model=tiny_pixart", "calibration.resolution=36"], "a multiple of 8"),  # the pipeline's rule
        (["model=tiny_pixart", "model.options.max_sequence_length=0"], "max_sequence_length=0"),
    ],
)
def test_bad_runs_are_refused_before_loading(compose_cfg, overrides, message):
    with pytest.raises((ConfigError, ModelConfigError), match=message):
        check_against_model(compose_cfg(*RUN, *overrides))
    check_against_model(compose_cfg(*RUN, overrides[0]))  # the model's own sampler fits its grid
