"""The config and the CLI are leaves: importing them, and checking every field, imports no torch.

Run in a fresh interpreter each (this test session has torch loaded already).
"""

import subprocess
import sys

import pytest

from obsdiff.cli import CONF_DIR

HEAVY = ("torch", "diffusers", "transformers", "torchmetrics", "wandb", "safetensors")
REPORT = f"""
import sys
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print('HEAVY', ','.join(heavy))
"""


def _heavy_modules_after(code: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", code + REPORT], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("HEAVY"))
    return [m for m in line.removeprefix("HEAVY").strip().split(",") if m]


@pytest.mark.parametrize(
    "module",
    [
        "obsdiff.config",
        "obsdiff.cli",
        "obsdiff.registry",
        "obsdiff.provenance",
        "obsdiff.solvers",
        "obsdiff.evaluation",
        "obsdiff.calibration.prompts",
        "obsdiff.calibration.timesteps",
    ],
)
def test_importing_imports_no_torch(module):
    assert _heavy_modules_after(f"import {module}") == []


def test_checking_every_field_imports_no_torch():
    code = f"""
from hydra import compose, initialize_config_dir
import obsdiff.cli  # registers the schema and the compare grid
from obsdiff.config import check_fields
with initialize_config_dir(config_dir={CONF_DIR!r}, version_base="1.3"):
    check_fields(compose(config_name="config"))
    check_fields(compose(config_name="config", overrides=["+compare=obs_diff-s30"]))
"""
    assert _heavy_modules_after(code) == []
