"""Every field of every group is checked before anything heavy: each bad value is refused by name,
with its value and what is allowed, by ``check_fields`` (no model) or ``check_against_model``
(the model's config only), and the CLI exits 2 with one line, importing no torch (so no weights)."""

import json
import re
import subprocess
import sys

import pytest

import obsdiff.models.sd3 as sd3
from obsdiff.config import ConfigError, check_against_model, check_fields

DEBUG = ["+experiment=debug"]
GENERAL = ["model=sd3_medium", "calibration=tiny", "calibration.num_prompts=8", "eval=none"]

# The bad values issue 12 names: overrides -> (field, value), as the message must spell them.
ISSUE_NAMED = [
    (["calibration.guidance_scale=-1"], ("calibration.guidance_scale", "-1.0")),
    (["calibration.guidance_scale=nan"], ("calibration.guidance_scale", "nan")),
    (["eval.guidance_scale=-1"], ("eval.guidance_scale", "-1.0")),
    (["eval.guidance_scale=nan"], ("eval.guidance_scale", "nan")),
    (["schedule.alpha_min=nan"], ("schedule.alpha_min", "nan")),
    (["pruner.damp_frac=nan"], ("pruner.damp_frac", "nan")),
    (["pruner.damp_frac=inf"], ("pruner.damp_frac", "inf")),
    (["pruner=dsnot", "pruner.dsnot.max_cycles=-1"], ("pruner.dsnot.max_cycles", "-1")),
    (["pruner.blocks=[1,2,1]"], ("pruner.blocks", "[1, 2, 1]")),
    (["pruner.targets=[]"], ("pruner.targets", "[]")),
    (["pruner.targets=[attn.to_q,attn.to_q]"], ("pruner.targets", "'attn.to_q', 'attn.to_q'")),
]

# Field rules that need no model: overrides -> (field, value).
BAD_FIELDS = [
    (["model.name=a/b"], ("model.name", "'a/b'")),
    (["model.name=''"], ("model.name", "''")),
    (["model.path=''"], ("model.path", "''")),
    (["model.device=gpu"], ("model.device", "'gpu'")),
    (["model.prompt_domain=cats"], ("model.prompt_domain", "'cats'")),
    (["model.prompt_domain=???"], ("model.prompt_domain", "'???'")),
    (["model.sampler.resolution=???"], ("model.sampler.resolution", "'???'")),
    (["model.sampler.resolution=0"], ("model.sampler.resolution", "0")),
    (["model.sampler.guidance_scale=nan"], ("model.sampler.guidance_scale", "nan")),
    (["model.sampler.guidance_scale=-2"], ("model.sampler.guidance_scale", "-2.0")),
    (["model.sampler.calibration.num_prompts=0"], ("model.sampler.calibration.num_prompts", "0")),
    (["model.sampler.calibration.batch_size=0"], ("model.sampler.calibration.batch_size", "0")),
    (["model.sampler.eval.num_steps=0"], ("model.sampler.eval.num_steps", "0")),
    (["sparsity=nm", "sparsity.ratio=nan"], ("sparsity.ratio", "nan")),
    (["sparsity=nm", "sparsity.exact_count=true"], ("sparsity.exact_count", "True")),
    (["sparsity=structured", "sparsity.exact_count=true"], ("sparsity.exact_count", "True")),
    (["sparsity.head_ratio=0.3"], ("sparsity.head_ratio", "0.3")),
    (["sparsity=nm", "sparsity.ffn_ratio=0.3"], ("sparsity.ffn_ratio", "0.3")),
    (["sparsity=structured", "sparsity.ffn_ratio=nan"], ("sparsity.ffn_ratio", "nan")),
    (["schedule.alpha_max=-inf"], ("schedule.alpha_max", "-inf")),
    (["schedule.alpha_min=1.3", "schedule.alpha_max=1.2"], ("schedule.alpha_min/alpha_max", "1.3/1.2")),
    (["pruner.name='my method'"], ("pruner.name", "'my method'")),
    (["pruner.dsnot.update_threshold=inf"], ("pruner.dsnot.update_threshold", "inf")),
    (["pruner.dsnot.pow_of_var_pruning=nan"], ("pruner.dsnot.pow_of_var_pruning", "nan")),
    (["pruner.blocks=[-2]"], ("pruner.blocks", "[-2]")),
    (["calibration.seed=-1"], ("calibration.seed", "-1")),
    (["eval.seed=-1"], ("eval.seed", "-1")),
    (["eval.reference_seed=-5"], ("eval.reference_seed", "-5")),
    (["eval.reference_seed=1007"], ("eval.reference_seed", "1007")),  # eval seeds 1000..1007
    (["eval.reference_seed=993"], ("eval.reference_seed", "993")),
    (["eval.feature_weights=/nonexistent/lite0.pt"], ("eval.feature_weights", "'/nonexistent/lite0.pt'")),
    (["eval.clip_model=''"], ("eval.clip_model", "''")),
    (["logger.project=''"], ("logger.project", "''")),
    (["logger.entity=''"], ("logger.entity", "''")),
    (["logger.group=' '"], ("logger.group", "' '")),
    (["logger.tags=[a,a]"], ("logger.tags", "['a', 'a']")),
    (["logger.tags=['']"], ("logger.tags", "['']")),
    (["cache_dir=''"], ("cache_dir", "''")),
    (["optimized_metric=fid"], ("optimized_metric", "'fid'")),
    (["optimized_metric=prune/"], ("optimized_metric", "'prune/'")),
    (["eval=none", "optimized_metric=eval/fid_real"], ("optimized_metric", "'eval/fid_real'")),
]

# Refused once the model's config is read (still no weights): overrides -> (field, value).
BAD_FOR_THE_MODEL = [
    (["calibration.resolution=36"], ("calibration.resolution", "36")),  # > 8 patches x 2 x VAE 2
    (["calibration.resolution=30"], ("calibration.resolution", "30")),  # not a multiple of 4
    (["eval.resolution=64"], ("eval.resolution", "64")),
    (["model.sampler.resolution=34"], ("model.sampler.resolution", "34")),
    (["model=tiny_sd3", "calibration.resolution=68"], ("calibration.resolution", "68")),  # > 64
    (["model=tiny_flux", "calibration.resolution=34"], ("calibration.resolution", "34")),  # 2x2 packing
    ([*GENERAL, "calibration.resolution=3088"], ("calibration.resolution", "3088")),  # > 192 x 16
    ([*GENERAL, "calibration.resolution=520"], ("calibration.resolution", "520")),  # not x 16
    ([*GENERAL, "model=flux_dev", "calibration.resolution=520"], ("calibration.resolution", "520")),
    (["model.options.max_sequence_length=-1"], ("model.options.max_sequence_length", "-1")),
    (["model.options.max_sequence_length=0"], ("model.options.max_sequence_length", "0")),
    (
        ["model=tiny_flux", "model.options.max_sequence_length=-1"],
        ("model.options.max_sequence_length", "-1"),
    ),
    (["model=tiny_flux", "model.options.true_cfg_scale=nan"], ("model.options.true_cfg_scale", "nan")),
]


def _ids(cases):
    return [" ".join(overrides) for overrides, _ in cases]


def _assert_names(err: pytest.ExceptionInfo, fld: str, value: str) -> None:
    message = str(err.value)
    assert fld in message and value in message and "allowed" in message, message


@pytest.mark.parametrize("overrides,named", ISSUE_NAMED + BAD_FIELDS, ids=_ids(ISSUE_NAMED + BAD_FIELDS))
def test_each_field_rule_refuses_its_bad_value(compose_cfg, overrides, named):
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*DEBUG, *overrides))
    _assert_names(err, *named)


@pytest.mark.parametrize("overrides,named", BAD_FOR_THE_MODEL, ids=_ids(BAD_FOR_THE_MODEL))
def test_each_model_rule_refuses_before_loading(compose_cfg, monkeypatch, overrides, named):
    monkeypatch.setattr(sd3.SD3Adapter, "load", lambda *args: pytest.fail("a model was loaded"))
    cfg = compose_cfg(*DEBUG, *overrides)
    check_fields(cfg)  # each field is fine on its own
    with pytest.raises(ConfigError) as err:
        check_against_model(cfg)
    _assert_names(err, *named)


@pytest.mark.parametrize(
    "overrides",
    [
        ["calibration.resolution=28", "eval.resolution=16"],  # multiples of 4 up to 32
        ["model=tiny_sd3", "calibration.resolution=64"],
        ["model=tiny_flux", "calibration.resolution=1024"],  # rotary: no largest resolution
        [*GENERAL, "calibration.resolution=3072"],
        ["eval.reference_seed=1008"],  # eval seeds 1000..1007: apart
        ["eval.reference_seed=992"],
        ["pruner=dsnot", "pruner.dsnot.max_cycles=0"],
        ["calibration.guidance_scale=0", "eval.guidance_scale=0"],
        ["sparsity=structured", "sparsity.head_ratio=0.25", "sparsity.ffn_ratio=0"],
        ["optimized_metric=eval/fid_real"],
        ["eval=none", "optimized_metric=prune/seconds"],
        ["logger.tags=[a,b]"],
        ["model.device=cuda:1"],
    ],
)
def test_edge_values_pass(compose_cfg, overrides):
    cfg = compose_cfg(*DEBUG, *overrides)
    check_fields(cfg)
    check_against_model(cfg)


def test_reference_images_are_one_set(compose_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*DEBUG, f"eval.reference_dir={tmp_path}"))  # real_images is set too
    _assert_names(err, "eval.reference_dir", str(tmp_path))
    assert "eval.real_images is set" in str(err.value)


def test_cache_dir_must_be_a_folder(compose_cfg, tmp_path):
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*DEBUG, f"cache_dir={file}"))
    _assert_names(err, "cache_dir", str(file))


def test_an_artifact_of_another_family_is_refused(compose_cfg, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"family": "flux"}}))
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg(*DEBUG, f"artifact={tmp_path}"))
    _assert_names(err, "artifact", str(tmp_path))
    assert "model.family='sd3'" in str(err.value)


def test_a_model_option_outside_options_fails_at_compose(compose_cfg):
    with pytest.raises(Exception, match="model.max_sequence_length"):  # Hydra: not in the schema
        compose_cfg("model.max_sequence_length=-1")


# --- the CLI: exit status 2, one line, before torch (and so before any weights) --------------------

CLI_CASES = [
    (["calibration.guidance_scale=-1"], "calibration.guidance_scale=-1.0 is invalid; allowed: "),
    (
        ["calibration.resolution=36"],
        "calibration.resolution=36 is invalid; allowed for model.name='tiny_digits': ",
    ),
    (["model=sd3_medium"], "calibration.source='digits' is invalid; allowed: another prompt source"),
]


# About a second each (fast tier); `python bench/startup.py` times the same refusals.
@pytest.mark.parametrize("args,expected", CLI_CASES, ids=_ids(CLI_CASES))
def test_cli_refuses_in_one_line_with_status_2_and_no_weights(tmp_path, args, expected):
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "obsdiff.cli",
        f"hydra.run.dir={tmp_path}",
        "logger=none",
    ]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and expected in errors[0], errors
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, flags=re.MULTILINE)
    heavy = {"torch", "safetensors", "diffusers", "transformers"}  # weights need these
    assert "obsdiff.config" in imported and not heavy & {m.split(".")[0] for m in imported}
    assert not (tmp_path / "layers.csv").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("args", [["pruner=nope"], ["model.no_such_key=1"]], ids=["option", "key"])
def test_a_config_hydra_cannot_compose_exits_with_status_2(tmp_path, args):
    """Hydra itself exits 1 for these; a config error is status 2 like every other refusal."""
    cmd = [sys.executable, "-m", "obsdiff.cli", f"hydra.run.dir={tmp_path}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert args[0].split("=")[0].split(".")[-1] in proc.stdout + proc.stderr  # names what is wrong
