"""A pruned/ folder anyone can open: the stock diffusers class loads it, its card holds the
metrics, and it names no path of the machine that pruned it."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from obsdiff import artifacts, load_pruned
from obsdiff.artifacts import (
    CARD,
    DIFFUSERS_CONFIG,
    PACKAGE_DIR,
    WEIGHTS,
    WEIGHTS_V1,
    ArtifactMismatchError,
    portable,
    save_pruned,
    write_model_card,
)
from obsdiff.models import get_adapter

REPO = Path(__file__).resolve().parents[2]


def _pruned(compose_cfg, model: str, *overrides: str):
    """The embedded random model ``model`` with every second weight of its linear layers zeroed."""
    cfg = compose_cfg(f"model={model}", "logger=none", *overrides)
    adapter = get_adapter(cfg.model.family, OmegaConf.to_container(cfg.model.options, resolve=True))
    denoiser = adapter.denoiser(adapter.load(cfg.model))
    with torch.no_grad():
        for module in denoiser.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.view(-1)[::2] = 0  # an unstructured 50% pattern
    return cfg, denoiser


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"])
def test_the_stock_class_loads_an_unstructured_artifact(compose_cfg, tmp_path, model):
    cfg, denoiser = _pruned(compose_cfg, model)
    out = save_pruned(tmp_path / "pruned", denoiser, cfg)
    loaded = type(denoiser).from_pretrained(out)
    expected, actual = denoiser.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with safe_open(str(out / WEIGHTS), "pt") as weights:  # the pinned bytes keep their metadata
        assert weights.metadata() == {"format": "obsdiff-pruned/1"}


def test_the_card_holds_the_metrics_and_is_rewritten_after_evaluation(compose_cfg, tmp_path):
    cfg, denoiser = _pruned(compose_cfg, "tiny_sd3", "sparsity=nm")
    metrics = {"prune/sparsity_achieved": 0.5, "prune/method": "obs_diff", "versions/torch": "x"}
    out = save_pruned(tmp_path / "pruned", denoiser, cfg, extra={"metrics": metrics})
    card = (out / CARD).read_text()
    for text in ("`prune/sparsity_achieved` | 0.5", "2:4", "obs_diff", "log_decrease", "SD3Transformer2D"):
        assert text in card
    assert "eval/fid" not in card
    write_model_card(out, {"eval/fid": 12.3456, "eval/clip_score": 0.25})
    card = (out / CARD).read_text()
    assert "`eval/fid` | 12.35" in card and "`eval/clip_score` | 0.25" in card
    assert "`prune/sparsity_achieved` | 0.5" in card  # the pruning-time metrics stay


def test_no_path_of_this_machine_in_the_folder(compose_cfg, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red 3\na blue 7\n")
    cfg, denoiser = _pruned(compose_cfg, "tiny_sd3", "calibration=file", f"calibration.path={prompts}")
    extra = {"metrics": {"artifact": str(tmp_path / "elsewhere" / "pruned")}}
    out = save_pruned(tmp_path / "pruned", denoiser, cfg, extra=extra)
    files = {WEIGHTS, DIFFUSERS_CONFIG, "manifest.json", "config.yaml", CARD}
    assert {p.name for p in out.iterdir()} == files
    for file in out.iterdir():
        data = file.read_bytes()
        for local in (tmp_path, REPO, PACKAGE_DIR, Path.home()):
            assert str(local).encode() not in data, (file.name, str(local))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["path"] == ".../prompts.txt"
    assert "_name_or_path" not in manifest["denoiser_config"]


def test_portable_names():
    embedded = PACKAGE_DIR / "models" / "tiny_digits"
    assert portable(str(embedded)) == "obsdiff/models/tiny_digits"
    snapshot = "/data/hf/hub/models--stabilityai--stable-diffusion-3-medium-diffusers/snapshots/abc123"
    assert portable({"path": [snapshot]}) == {"path": ["stabilityai/stable-diffusion-3-medium-diffusers"]}
    assert portable(str(Path.home() / ".cache" / "obsdiff")) == "~/.cache/obsdiff"
    assert portable("/scratch/run7/prompts.txt") == ".../prompts.txt"
    hub_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    assert portable(hub_id) == hub_id


def test_an_artifact_with_the_old_weights_name_still_loads(compose_cfg, tmp_path):
    cfg, denoiser = _pruned(compose_cfg, "tiny_sd3")
    out = save_pruned(tmp_path / "pruned", denoiser, cfg)
    (out / WEIGHTS).rename(out / WEIGHTS_V1)  # the layout before config.json and the card
    (out / DIFFUSERS_CONFIG).unlink()
    (out / CARD).unlink()
    reloaded = load_pruned(out).transformer
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in denoiser.state_dict().items())
    save_pruned(out, denoiser, cfg)  # a new save leaves one weights file, under the new name
    assert (out / WEIGHTS).is_file() and not (out / WEIGHTS_V1).exists()


def test_a_structured_artifact_has_no_stock_config(compose_cfg, tmp_path):
    cfg, denoiser = _pruned(compose_cfg, "tiny_sd3", "sparsity=structured")
    structure = {"architecture": {}, "removed": {}}
    out = save_pruned(tmp_path / "pruned", denoiser, cfg, extra={"structure": structure})
    assert not (out / DIFFUSERS_CONFIG).exists()  # no stock config describes sliced blocks
    assert "obsdiff.load_pruned" in (out / CARD).read_text()


def test_an_artifact_of_a_local_base_model_asks_for_that_model(compose_cfg, tmp_path):
    cfg, denoiser = _pruned(compose_cfg, "tiny_sd3")
    out = save_pruned(tmp_path / "pruned", denoiser, cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["path"] = portable("/data/models/sd3_medium")  # as saved on another machine
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatchError, match="pass path="):
        artifacts.load_pruned(out)
    reloaded = artifacts.load_pruned(out, path="tiny").transformer  # this machine's copy of the base
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in denoiser.state_dict().items())
