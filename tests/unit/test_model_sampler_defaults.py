"""Configs that fit the model: each model declares its sampler defaults (``model.sampler``), every
prompt source of calibration and eval takes them, and what a user can still mistype against the
model (a resolution it cannot take, the digits prompts or judge on a general model) is refused
before loading, naming both fields."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from obsdiff.cli import CONF_DIR
from obsdiff.config import ConfigError, check_against_model, check_fields
from obsdiff.models import ModelNotAvailableError

SAMPLED = ("num_prompts", "num_steps", "guidance_scale", "resolution", "batch_size")
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


@pytest.fixture
def sources(tmp_path, make_coco_captions) -> dict[str, list[str]]:
    """Every calibration and eval option, with what its `???` fields need (prompts, images; a fake
    COCO captions file, so the protocol check is off)."""
    prompts, images, coco = tmp_path / "prompts.txt", tmp_path / "images", make_coco_captions(5000)
    prompts.write_text("".join(f"prompt {i}\n" for i in range(5000)))
    images.mkdir()
    return {
        "calibration=digits": [],
        "calibration=tiny": [],
        "calibration=file": [f"calibration.path={prompts}"],
        "calibration=hf": ["calibration.dataset=some/dataset"],
        "eval=tiny": [],
        "eval=coco": [f"eval.path={coco}", f"eval.reference_dir={images}", "eval.check_protocol=false"],
    }


def expected(model_sampler, use: str) -> dict:
    """What ``calibration`` / ``eval`` should hold: the model's sampler for that use."""
    return {"resolution": model_sampler.resolution, "guidance_scale": model_sampler.guidance_scale,
            **OmegaConf.to_container(model_sampler[use])}  # fmt: skip


def sampled(node) -> dict:
    return {key: node[key] for key in SAMPLED}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_declares_sampler_defaults_that_it_can_take(compose_cfg, model):
    cfg = compose_cfg(f"model={model}", "calibration=tiny", "calibration.num_prompts=8", "eval=none")
    assert not OmegaConf.missing_keys(cfg.model)
    assert cfg.model.prompt_domain in ("general", "digits", "random")
    check_fields(cfg)
    if model == "generic":  # a template: no config ships for its placeholder hub id; offline, it says so
        with pytest.raises(ModelNotAvailableError, match="weights not found"):
            check_against_model(cfg)
        return
    check_against_model(cfg)  # model.sampler.resolution is on the model's grid (hub models: shipped configs)


@pytest.mark.parametrize("model", MODELS)
def test_a_prompt_source_changes_only_the_source(compose_cfg, sources, model):
    for option, inputs in sources.items():
        cfg = compose_cfg(f"model={model}", option, *inputs)
        use = option.split("=")[0]
        locked = {"num_prompts": 5000} if option == "eval=coco" else {}  # the protocol's count
        assert sampled(cfg[use]) == expected(cfg.model.sampler, use) | locked, option


# The embedded model's sampler (conf/model/tiny_digits.yaml), as the pinned runs were made with.
DIGITS_CALIBRATION = {
    "num_prompts": 16,
    "num_steps": 10,
    "guidance_scale": 5.0,
    "resolution": 32,
    "batch_size": 8,
}
DIGITS_EVAL = {"num_prompts": 50, "num_steps": 10, "guidance_scale": 5.0, "resolution": 32, "batch_size": 25}


def test_a_file_source_on_the_embedded_model_takes_its_32px_sampler(compose_cfg, sources):
    cfg = compose_cfg("calibration=file", *sources["calibration=file"], "eval=coco", *sources["eval=coco"])
    coco_eval = DIGITS_EVAL | {"num_prompts": 5000}  # the protocol's count
    assert (sampled(cfg.calibration), sampled(cfg.eval)) == (DIGITS_CALIBRATION, coco_eval)
    check_against_model(cfg)  # the resolution fits the model (it used to carry 512 px in)


def test_the_default_run_keeps_its_sampler_values(compose_cfg):
    """The values the pinned runs were made with (tests/integration/test_byte_identity.py)."""
    cfg = compose_cfg()
    assert (cfg.calibration.source, cfg.eval.source, cfg.eval.kind) == ("digits", "digits", "tiny")
    assert (sampled(cfg.calibration), sampled(cfg.eval)) == (DIGITS_CALIBRATION, DIGITS_EVAL)
    assert (cfg.calibration.seed, cfg.eval.seed) == (0, 1000)


def test_the_run_overrides_the_model_and_the_experiments_keep_theirs(compose_cfg):
    cfg = compose_cfg("calibration.resolution=16", "model.sampler.guidance_scale=3.0")
    assert (cfg.calibration.resolution, cfg.eval.resolution) == (16, 32)
    assert (cfg.calibration.guidance_scale, cfg.eval.guidance_scale) == (3.0, 3.0)
    cfg = compose_cfg("+experiment=paper_flux_dev_2of4")
    assert (cfg.calibration.num_steps, cfg.calibration.guidance_scale, cfg.calibration.resolution) == (
        28,
        3.5,
        512,
    )
    cfg = compose_cfg("+experiment=tiny_quality")
    assert (cfg.eval.num_prompts, cfg.eval.num_steps, cfg.calibration.num_prompts) == (100, 10, 16)


# A general model with the tiny digits model's prompts, judge or images: each names both fields.
DIGITS_ON_A_GENERAL_MODEL = [
    (["model=sd3_medium"], "calibration.source='digits'"),
    (["model=sd3_medium", "calibration=tiny", "calibration.num_prompts=8"], "eval.source='digits'"),
    (["model=flux_dev", "calibration=tiny", "calibration.num_prompts=8", "eval.source=tiny",
      "eval.num_prompts=8"], "eval.real_images='digits_heldout'"),
    (["model=sd3_medium", "calibration=tiny", "calibration.num_prompts=8", "eval=coco", "eval.path=P",
      "eval.reference_dir=D", "eval.num_prompts=8", "eval.check_protocol=false",
      "eval.prompt_judge=digits_classifier"],
     "eval.prompt_judge='digits_classifier'"),
]  # fmt: skip


@pytest.mark.parametrize("overrides,named", DIGITS_ON_A_GENERAL_MODEL)
def test_digits_prompts_judge_or_images_on_a_general_model_are_refused(
    compose_cfg, sources, overrides, named
):
    paths = {"eval.path=P": sources["eval=coco"][0], "eval.reference_dir=D": sources["eval=coco"][1]}
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*(paths.get(o, o) for o in overrides)))
    message = str(err.value)
    assert message.startswith(named) and "model.name=" in message and "model.prompt_domain=general" in message


@pytest.mark.parametrize("model", ["tiny_digits", "tiny_sd3", "tiny_flux"])
def test_digits_prompts_fit_the_digits_and_the_random_models(compose_cfg, model):
    cfg = compose_cfg(f"model={model}")
    check_fields(cfg)
    check_against_model(cfg)
