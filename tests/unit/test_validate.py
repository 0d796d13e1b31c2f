"""Config checks: every field rule refuses its bad value by name, in process, before any model loads."""

import sys

import pytest

from obsdiff.config import ConfigError, check_fields, validate

DEBUG = ["+experiment=debug"]

# overrides -> the field the error must name. Each is refused by the field checks alone (no model).
BAD_FIELDS = [
    (["sparsity.ratio=1.0"], "sparsity.ratio"),
    (["sparsity.ratio=-0.1"], "sparsity.ratio"),
    (["sparsity.ratio=nan"], "sparsity.ratio"),
    (["sparsity.kind=blocky"], "sparsity.kind"),
    (["sparsity=nm", "sparsity.n=4", "sparsity.m=4"], "sparsity.n/sparsity.m"),
    (["sparsity=nm", "sparsity.n=0"], "sparsity.n/sparsity.m"),
    (["sparsity=nm", "sparsity.n=2", "sparsity.m=24"], "pruner.block_size"),
    (["sparsity=structured", "sparsity.ffn_ratio=1.0"], "sparsity.ffn_ratio"),
    (["sparsity=structured", "sparsity.head_ratio=inf"], "sparsity.head_ratio"),
    (["schedule.name=cosine_up"], "schedule.name"),
    (["schedule.alpha_min=1.5"], "alpha_min"),
    (["schedule.alpha_min=-1"], "alpha_min"),
    (["schedule.alpha_min=nan"], "alpha_min"),
    (["schedule.alpha_max=inf"], "alpha_max"),
    (["pruner.mask=l1"], "pruner.mask"),
    (["sparsity=structured", "pruner=wanda"], "pruner.mask"),
    (["pruner=l1_norm", "sparsity=unstructured"], "pruner.mask"),
    (["pruner.update=sometimes"], "pruner.update"),
    (["pruner.num_packages=0"], "pruner.num_packages"),
    (["pruner.damp_frac=0"], "pruner.damp_frac"),
    (["pruner.damp_frac=nan"], "pruner.damp_frac"),
    (["pruner.damp_frac=inf"], "pruner.damp_frac"),
    (["pruner.block_size=0"], "pruner.block_size"),
    (["pruner.compensate=false"], "pruner.compensate"),
    (["pruner.targets=[]"], "pruner.targets"),
    (["pruner.targets=[attn.to_q,attn.to_q]"], "pruner.targets"),
    (["pruner.blocks=[1,2,1]"], "pruner.blocks"),
    (["pruner.blocks=[]"], "pruner.blocks"),
    (["pruner.blocks=[-1]"], "pruner.blocks"),
    (["pruner.blocks=[a]"], "pruner.blocks"),
    (["pruner.blocks='1:x'"], "pruner.blocks"),
    (["pruner.dsnot.init=random"], "pruner.dsnot.init"),
    (["pruner.dsnot.max_cycles=-1"], "pruner.dsnot.max_cycles"),
    (["pruner.dsnot.update_threshold=nan"], "pruner.dsnot.update_threshold"),
    (["pruner.dsnot.update_threshold=-0.1"], "pruner.dsnot.update_threshold"),
    (["pruner.dsnot.pow_of_var_regrowing=inf"], "pruner.dsnot.pow_of_var_regrowing"),
    (["pruner=obs_admm", "pruner.admm.rho=0"], "pruner.admm.rho"),
    (["pruner=obs_admm", "pruner.admm.rho_factor=nan"], "pruner.admm.rho_factor"),
    (["pruner=obs_admm", "pruner.admm.iterations=-1"], "pruner.admm.iterations"),
    (["pruner=obs_admm", "pruner.admm.growth=21"], "pruner.admm.growth"),
    (["sparsity=structured", "pruner=obs_admm"], "pruner.update"),
    (["calibration.guidance_scale=nan"], "calibration.guidance_scale"),
    (["calibration.guidance_scale=inf"], "calibration.guidance_scale"),
    (["calibration.guidance_scale=-1"], "calibration.guidance_scale"),
    (["eval.guidance_scale=nan"], "eval.guidance_scale"),
    (["calibration.num_steps=0"], "calibration.num_steps"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.skip_prompts=-1"], "eval.skip_prompts"),
    (["eval.num_grid=0"], "eval.num_grid"),
    (["calibration=file", "calibration.path=/nonexistent/prompts.txt"], "calibration.path"),
    (["calibration.num_prompts=1001"], "calibration.num_prompts"),
    (["calibration.num_prompts=0"], "calibration.num_prompts"),
    (["calibration.split=test"], "calibration.split"),
    (["calibration.source=web"], "calibration.source"),
    (["eval=tiny", "eval.num_prompts=501"], "eval.num_prompts"),
    (["eval.kind=fancy"], "eval.kind"),
    (["eval.reference_dir=/nonexistent/images"], "eval.reference_dir"),
    (["eval.feature_net=vgg"], "eval.feature_net"),
    (["eval.prompt_judge=gpt"], "eval.prompt_judge"),
    (["eval.source=tiny"], "eval.prompt_judge"),
    (["eval.real_images=imagenet"], "eval.real_images"),
    (["eval.real_images=null", "eval.reference_seed=null"], "eval.reference_seed"),
    (["model.torch_dtype=float8"], "model.torch_dtype"),
    (["logger.kind=tensorboard"], "logger.kind"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["artifact=/nonexistent/pruned"], "artifact"),
]


@pytest.mark.parametrize("overrides,field", BAD_FIELDS, ids=[" ".join(o) for o, _ in BAD_FIELDS])
def test_every_field_rule_refuses_its_bad_value(compose_cfg, overrides, field):
    cfg = compose_cfg(*DEBUG, *overrides)
    with pytest.raises(ConfigError) as err:
        check_fields(cfg)
    assert field in str(err.value)
    with pytest.raises(ConfigError):
        validate(cfg)


def test_a_field_error_says_value_and_what_is_allowed(compose_cfg):
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*DEBUG, "schedule.name=cosine_up"))
    message = str(err.value)
    assert message.startswith("schedule.name='cosine_up' is invalid; allowed: ")
    for name in ("uniform", "log_decrease", "cosine_decrease"):  # read from the schedule registry
        assert name in message


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["pruner.dsnot.max_cycles=0"],
        ["calibration.guidance_scale=0"],
        ["pruner.blocks=[0,2]"],
        ["pruner.blocks=3"],
        ["pruner.blocks='1:-1'"],
        ["pruner.targets=[attn.to_q,attn.to_k]"],
        ["sparsity=structured", "pruner.compensate=false"],
        ["eval=none", "eval.num_steps=0"],  # eval=none: its sampler fields are not used
    ],
)
def test_edge_values_pass(compose_cfg, overrides):
    validate(compose_cfg(*DEBUG, *overrides))


# Refused only once the model's config is read (block range, widths, head counts).
BAD_FOR_THE_MODEL = [
    (["pruner.blocks=[99]"], "pruner.blocks"),
    (["pruner.targets=[attn.to_x]"], "pruner.targets"),
    (["sparsity=nm", "sparsity.n=2", "sparsity.m=128"], "sparsity.m=128"),
    (["sparsity=structured", "sparsity.head_ratio=0.9"], "sparsity.head_ratio"),
    (["sparsity=structured", "pruner.blocks=[3]", "pruner.targets=[attn.to_q]"], "pruner.targets"),
    (["sparsity=structured", "pruner.blocks='2:2'"], "pruner.blocks"),
    (["model.family=nope"], "nope"),
]


@pytest.mark.parametrize("overrides,field", BAD_FOR_THE_MODEL)
def test_model_dependent_rules_refuse_before_loading(compose_cfg, overrides, field):
    cfg = compose_cfg(*DEBUG, *overrides)
    check_fields(cfg)  # every field is fine on its own
    with pytest.raises((ConfigError, ValueError, KeyError)) as err:
        validate(cfg)
    assert field in str(err.value)


def test_a_missing_extra_names_the_install(compose_cfg, monkeypatch):
    validate_module = sys.modules["obsdiff.config.validate"]  # the package's `validate` is the function
    monkeypatch.setattr(validate_module, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r'pip install "obsdiff\[coco\]"'):
        check_fields(compose_cfg(*DEBUG, "eval.feature_net=inception_v3"))


def test_prompt_file_count_uses_the_file(compose_cfg, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    source = ["calibration=file", f"calibration.path={prompts}"]
    with pytest.raises(ConfigError, match="has only 2 prompts"):
        check_fields(compose_cfg(*source, "calibration.num_prompts=3"))
    check_fields(compose_cfg(*source, "calibration.num_prompts=2"))


def test_torch_free_constants_match_their_torch_modules():
    from obsdiff.calibration.prompts import DIGITS_PROMPTS
    from obsdiff.config.validate import TORCH_DTYPES
    from obsdiff.models.base import DTYPES
    from obsdiff.models.digits_data import digits_captions

    assert set(TORCH_DTYPES) == set(DTYPES)
    assert DIGITS_PROMPTS == {split: len(digits_captions(split)) for split in ("train", "heldout")}
