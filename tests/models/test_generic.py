"""The generic adapter: input groups from its probe, agreement with SD3's units, refusals before loading."""

import re

import pytest
from omegaconf import OmegaConf

from obsdiff.config import ConfigError, resolve
from obsdiff.evaluation.cost import denoiser_cost
from obsdiff.models import ModelConfigError, get_adapter
from obsdiff.models.generic import STRUCTURED_REFUSAL, GenericAdapter
from obsdiff.models.sd3 import SD3_TARGETS

TINY_GENERIC = OmegaConf.load("conf/model/tiny_generic.yaml")
SD3_OPTIONS = {"pipeline": "StableDiffusion3Pipeline", "call_kwargs": {"max_sequence_length": 1}}
IMAGE_STREAM = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")


@pytest.fixture(scope="module")
def tiny_sana():
    adapter = get_adapter("generic", OmegaConf.to_container(TINY_GENERIC.options))
    return adapter, adapter.load(TINY_GENERIC)


def test_probe_groups_layers_that_read_one_tensor(tiny_sana):
    adapter, pipe = tiny_sana
    units = adapter.units(adapter.denoiser(pipe), None, adapter.default_targets)
    assert all(len(unit) == 1 for unit in units)  # one input group per unit
    groups = [unit[0] for unit in units]
    assert groups[0] == tuple(f"transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k", "to_v"))
    # the cross-attention K/V of every block read the one projected caption: one group, one Hessian
    kv = tuple(f"transformer_blocks.{b}.attn2.{n}" for b in range(4) for n in ("to_k", "to_v"))
    assert kv in groups
    assert ("transformer_blocks.2.attn2.to_q",) in groups  # the query reads the image stream
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)) == 4 * 8  # every Linear of the 4 blocks, once
    assert [g[0] for g in adapter.units(adapter.denoiser(pipe), [2], ["attn2.to_[kv]"])[0]] == [
        "transformer_blocks.2.attn2.to_k"
    ]  # a block subset keeps the group's layers of those blocks


def test_cost_counts_a_meta_forward_from_the_probed_inputs(tiny_sana):
    adapter, pipe = tiny_sana
    config = dict(adapter.denoiser(pipe).config)
    one, two = (denoiser_cost(adapter, config, {}, [rows], 16, adapter.text_tokens(pipe)) for rows in (1, 2))
    assert adapter.text_tokens(pipe) == 16 and one["tflops"] > 0
    assert two["tflops"] == pytest.approx(2 * one["tflops"])


def test_input_groups_equal_the_sd3_adapters_on_tiny_sd3(tiny_pipe):
    sd3, pipe = tiny_pipe
    generic = GenericAdapter({**SD3_OPTIONS, "targets": [re.escape(t) for t in SD3_TARGETS]})
    generic.probe(pipe, resolution=32, guidance_scale=5.0)
    denoiser = sd3.denoiser(pipe)
    sd3_groups = {g for unit in sd3.units(denoiser, None, SD3_TARGETS) for g in unit}
    generic_groups = {g for unit in generic.units(denoiser, None, generic.default_targets) for g in unit}
    assert generic_groups == sd3_groups
    assert (
        "transformer_blocks.1.attn.to_q",
        "transformer_blocks.1.attn.to_k",
        "transformer_blocks.1.attn.to_v",
    ) in generic_groups
    # where SD3's units hold one group each, the unit lists are equal, order included
    assert generic.units(denoiser, [1, 3], IMAGE_STREAM) == sd3.units(denoiser, [1, 3], IMAGE_STREAM)


def test_structured_is_refused_before_the_model_loads(compose_cfg, monkeypatch):
    monkeypatch.setattr(GenericAdapter, "load", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(GenericAdapter, "denoiser_config", lambda *a: pytest.fail("read the model config"))
    with pytest.raises(ConfigError, match=re.escape(STRUCTURED_REFUSAL)):
        resolve(compose_cfg("model=tiny_generic", "sparsity=structured"))
    with pytest.raises(ModelConfigError, match="needs a family adapter"):
        GenericAdapter().structure_units(None, [1])


@pytest.mark.parametrize(
    "options, field",
    [
        ({"cfg": "double"}, "model.options.cfg"),
        ({"targets": ["attn1.to_q", "("]}, "model.options.targets"),
        ({"targets": []}, "model.options.blocks and model.options.targets"),
        ({"blocks": ["transformer blocks"]}, "model.options.blocks"),
        ({"call_kwargs": {"prompt": "x"}}, "model.options.call_kwargs"),
        ({"pipeline": 3}, "model.options.pipeline"),
        ({"drop_components": "vae"}, "model.options.drop_components"),
        ({"target": [".*"]}, "unknown ['target']"),
    ],
)
def test_bad_options_are_refused(options, field):
    with pytest.raises(ModelConfigError, match=re.escape(field)):
        GenericAdapter(options)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruner.targets=[attn9.to_q]", "'attn9.to_q' matches no nn.Linear"),
        ("model.options.blocks=blocks", "'blocks' is not a module list of SanaTransformer2DModel"),
        ("+model.options.call_kwargs.clip_skip=2", "takes no ['clip_skip']"),
        ("+model.options.denoiser_class=UNet9", "'UNet9' is not a diffusers model class"),
        ("pruner.blocks=[4]", "out of range for a model with 4 blocks"),
        ("sparsity=nm sparsity.m=64", "sparsity.m=64 must divide"),
    ],
)
def test_config_checks_refuse_what_cannot_run(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(compose_cfg("model=tiny_generic", *override.split()))


def test_the_probe_checks_the_cfg_rule():
    options = {**OmegaConf.to_container(TINY_GENERIC.options), "cfg": "none"}
    with pytest.raises(ModelConfigError, match="probe saw 1 of 2"):
        GenericAdapter(options).load(TINY_GENERIC)  # guidance 4.5: Sana doubles the batch
