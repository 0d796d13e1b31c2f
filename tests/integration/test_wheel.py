"""The wheel is a working obsdiff on its own: every config group, the embedded models and data.

The wheel is built offline from a copy of the working tree (no stale ``build/`` folder, nothing
downloaded) and installed with ``--no-deps`` into a fresh venv. The venv sees this interpreter's
packages (torch, diffusers, hydra, ...) through a ``.pth`` file added after the install, after its
own site-packages, so ``obsdiff`` itself comes from the wheel: the test checks that it does.
"""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _tree(*folders: str) -> list[str]:
    """The working tree's files (tracked, or new and not ignored) under ``folders``, repo-relative."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = (f for f in out.split("\0") if f and not Path(f).name.startswith("."))  # no temp files
    return sorted(f for f in names if (REPO / f).is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in _tree():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((REPO / name).read_bytes())
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    proc = subprocess.run([*build, "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (found,) = dist.glob("obsdiff-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    create = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)]
    subprocess.run(create, check=True, timeout=300)
    python = root / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    proc = subprocess.run([*install, str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (purelib,) = (root / "lib").glob("python3*/site-packages")
    (purelib / "zz_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def _obsdiff(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the venv's console script from ``cwd`` (outside the repository), offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OBSDIFF_CACHE": str(cwd / "cache")}
    cmd = [str(venv / "bin" / "obsdiff"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_every_file_of_the_package_and_of_conf(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {n for n in _tree("obsdiff") if "__pycache__" not in n}
    expected |= {f"obsdiff/{n}" for n in _tree("conf")}  # conf/ ships as obsdiff/conf/
    assert expected <= names, sorted(expected - names)
    for name in ("obsdiff/models/tiny_digits/transformer/diffusion_pytorch_model.safetensors",
                 "obsdiff/evaluation/digits_classifier.safetensors", "obsdiff/conf/config.yaml"):  # fmt: skip
        assert name in names


def test_the_installed_console_script_lists_every_config_group(venv, tmp_path):
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import obsdiff.cli as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the checkout's
    proc = _obsdiff(venv, tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = {line.split(":")[0]: line for line in proc.stdout.splitlines() if ": " in line}
    for group in sorted({Path(n).parts[1] for n in _tree("conf") if len(Path(n).parts) == 3}):
        stems = [Path(n).stem for n in _tree(f"conf/{group}")]
        assert group in groups and all(s in groups[group] for s in stems), (group, proc.stdout[:2000])


@pytest.mark.parametrize(
    ("override", "field"),
    [("sparsity.ratio=1.5", "sparsity.ratio"), ("pruner.blocks=[99]", "pruner.blocks")],  # the 2nd reads
)  # the embedded model's config.json from the installed package
def test_the_installed_console_script_refuses_bad_input_in_one_line(venv, tmp_path, override, field):
    proc = _obsdiff(venv, tmp_path, override)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and field in errors[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
