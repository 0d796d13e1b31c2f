"""Every config group and experiment composes; bad input fails before any model loads."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import obsdiff.models.sd3 as sd3
from obsdiff.cli import CONF_DIR
from obsdiff.config import ConfigError, validate
from obsdiff.run import run

GROUPS = ["model", "calibration", "schedule", "sparsity", "pruner", "eval", "logger"]
REQUIRED = {"calibration=file": ["calibration.path=prompts.txt"], "calibration=hf": ["calibration.dataset=x"],
            "eval=coco": ["eval.path=c.json", "eval.reference_dir=imgs"]}  # fmt: skip


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(compose_cfg, group):
    for option in options(group):
        override = f"{group}={option}"
        cfg = compose_cfg(override, *REQUIRED.get(override, []))
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(compose_cfg, experiment):
    cfg = compose_cfg(f"+experiment={experiment}")
    assert cfg.model.family == "sd3"


def test_slurm_launcher_composes(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.timeout_min) == (1, 240)


def test_paper_experiments_carry_the_paper_settings(compose_cfg):
    cfg = compose_cfg("+experiment=paper_sd3_medium_unstructured50")
    assert (cfg.model.name, cfg.sparsity.ratio, cfg.calibration.num_prompts) == ("sd3_medium", 0.5, 100)
    assert (cfg.calibration.num_steps, cfg.calibration.guidance_scale, cfg.calibration.resolution) == (
        25,
        7.0,
        512,
    )
    assert (cfg.schedule.name, cfg.pruner.num_packages) == ("log_decrease", 4)
    cfg = compose_cfg("+experiment=paper_sd35_large_2of4")
    assert (cfg.model.name, cfg.sparsity.kind, cfg.sparsity.n, cfg.sparsity.m) == ("sd35_large", "nm", 2, 4)


def test_defaults_are_the_method(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.pruner.name, cfg.sparsity.kind, cfg.sparsity.ratio) == (
        "tiny_digits",
        "obs_diff",
        "unstructured",
        0.5,
    )
    assert (cfg.schedule.name, cfg.schedule.alpha_min, cfg.schedule.alpha_max) == ("log_decrease", 0.8, 1.2)
    assert (cfg.pruner.num_packages, cfg.pruner.damp_frac, cfg.pruner.block_size) == (4, 0.01, 128)
    assert (cfg.eval.kind, cfg.logger.kind, cfg.logger.mode) == ("tiny", "wandb", "offline")


BAD = [
    (["sparsity.ratio=1.0"], "sparsity.ratio"),
    (["sparsity.ratio=-0.1"], "sparsity.ratio"),
    (["sparsity=nm", "sparsity.n=4", "sparsity.m=4"], "sparsity.n/sparsity.m"),
    (["sparsity=nm", "sparsity.n=0"], "sparsity.n/sparsity.m"),
    (["sparsity=nm", "sparsity.n=2", "sparsity.m=128"], "not divisible"),
    (["sparsity=nm", "sparsity.n=2", "sparsity.m=24"], "pruner.block_size"),
    (["schedule.name=cosine_up"], "schedule.name"),
    (["pruner.mask=l1"], "pruner.mask"),
    (["sparsity=structured", "pruner=wanda"], "pruner.mask"),
    (["pruner.update=sometimes"], "pruner.update"),
    (["pruner.num_packages=0"], "pruner.num_packages"),
    (["schedule.alpha_min=1.5"], "alpha_min"),
    (["schedule.alpha_min=-1"], "alpha_min"),
    (["calibration=file", "calibration.path=/nonexistent/prompts.txt"], "calibration.path"),
    (["calibration.num_prompts=1001"], "calibration.num_prompts"),
    (["calibration.split=test"], "calibration.split"),
    (["pruner.blocks=[7]"], "pruner.blocks"),
    (["pruner.targets=[attn.to_x]"], "pruner.targets"),
    (["model.family=flux"], "flux"),
    (["eval.reference_dir=/nonexistent/images"], "eval.reference_dir"),
    (["eval.feature_net=vgg"], "eval.feature_net"),
    (["eval=tiny", "eval.num_prompts=501"], "eval.num_prompts"),
    (["eval.prompt_judge=gpt"], "eval.prompt_judge"),
    (["eval.source=tiny"], "eval.prompt_judge"),
    (["eval.real_images=imagenet"], "eval.real_images"),
    (["eval.real_images=null", "eval.reference_seed=null"], "eval.reference_seed"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_bad_input_fails_before_any_model_loads(compose_cfg, run_dir, monkeypatch, overrides, field):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(sd3.SD3Adapter, "load", no_load)
    cfg = compose_cfg("logger=none", *overrides)
    with pytest.raises((ConfigError, ValueError, KeyError)) as err:
        run(cfg, run_dir)
    assert field in str(err.value)
    with pytest.raises((ConfigError, ValueError, KeyError)):
        validate(cfg)


def test_nm_prompt_file_count_uses_the_file(compose_cfg, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    with pytest.raises(ValueError, match="has only 2 prompts"):
        validate(compose_cfg("calibration=file", f"calibration.path={prompts}", "calibration.num_prompts=3"))
    validate(compose_cfg("calibration=file", f"calibration.path={prompts}", "calibration.num_prompts=2"))


@pytest.mark.parametrize(
    "override,message",
    [("sparsity.ratio=1.5", "sparsity.ratio"), ("schedule=cosine", "schedule"), ("model=sdxl", "model"),
     ("pruner=foo", "pruner"), ("sparsity.raito=0.3", "raito")],
)  # fmt: skip
def test_cli_exits_nonzero_quickly_naming_the_field(tmp_path, override, message):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "obsdiff.cli", f"hydra.run.dir={tmp_path}", "logger=none", override],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "layers.csv").exists()
