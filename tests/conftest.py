"""Shared fixtures: the embedded tiny SD3 pipeline and composed configs (offline, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from obsdiff.cli import CONF_DIR
from obsdiff.config import register_configs
from obsdiff.models import get_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
register_configs()

TINY_MODEL = {
    "family": "sd3", "name": "tiny_sd3", "path": "tiny", "torch_dtype": "float32", "device": "cpu",
    "options": {"text_encoder_3": None, "max_sequence_length": 1},
}  # fmt: skip


def pytest_collection_modifyitems(items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline (tests prune it in place)."""
    adapter = get_adapter("sd3", TINY_MODEL["options"])
    return adapter, adapter.load(OmegaConf.create(TINY_MODEL))


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """Compose the project's config with overrides, caching dense results under tmp_path."""
    monkeypatch.setenv("OBSDIFF_CACHE", str(tmp_path / "cache"))

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def cli(tmp_path):
    """Run ``obsdiff`` in a subprocess (offline, silent W&B, dense cache under tmp_path)."""
    env = {
        **os.environ,
        "OBSDIFF_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_SILENT": "true",
    }

    def _cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "obsdiff.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)

    return _cli


@pytest.fixture
def make_coco_captions(tmp_path):
    """Writes a fake ``captions_val2014.json`` of N images into tmp_path and returns its path:
    image ids 7, 14, … in shuffled file order, two captions each (the later annotation id listed
    first), and COCO's ``images`` entries with their file names."""

    def _make(num_images: int, name: str = "captions_val2014.json") -> Path:
        ids = [7 * (i + 1) for i in range(num_images)]
        order = ids[::2] + ids[1::2]  # not ascending: the rule must sort
        annotations = [
            ann
            for image_id in order
            for ann in (
                {
                    "id": 2 * image_id + 1,
                    "image_id": image_id,
                    "caption": f"second caption of image {image_id}",
                },
                {
                    "id": 2 * image_id,
                    "image_id": image_id,
                    "caption": f"  first caption of image {image_id}\n",
                },
            )
        ]
        images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in order]
        path = tmp_path / name
        path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
        return path

    return _make
