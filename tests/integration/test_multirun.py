"""Sweeps: stable job folders, the grid checked before launch, relaunching skips finished jobs, one
failing job does not end a sweep, the submitit launchers, and what a person reads in the logs."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from obsdiff.cli import CONF_DIR
from obsdiff.provenance import run_hash
from obsdiff.runstate import read_status, write_status
from obsdiff.sweeper import SweepCallback, check_grid, grid, job_dirname, objective, task_config

# The cheapest real run: calibrate two prompts for two steps, prune one block, no evaluation.
CHEAP = ["+experiment=debug", "eval=none", "calibration.num_prompts=2", "calibration.num_steps=2",
         "calibration.batch_size=2", "pruner.num_packages=1"]  # fmt: skip


def test_job_folders_are_named_after_their_overrides_never_their_number():
    assert job_dirname("schedule=uniform,sparsity.ratio=0.5") == "schedule=uniform,sparsity.ratio=0.5"
    assert job_dirname("") == "defaults"
    path = job_dirname("calibration.path=/data/prompts.txt,sparsity.ratio=0.5")
    assert path.startswith("path=_data_prompts.txt,ratio=0.5-")  # keys shortened, no "/"
    listed = job_dirname("+experiment=debug,model.options.max_sequence_length=1,pruner.blocks=[0,1]")
    assert listed.startswith("+experiment=debug,max_sequence_length=1,blocks=_0,1_-") and len(listed) == 63
    assert job_dirname("calibration.path=/data/prompts.txt,sparsity.ratio=0.5") == path  # stable
    assert job_dirname("calibration.path=_data_prompts.txt,sparsity.ratio=0.5") != path  # no clash
    long_a, long_b = "a=" + "x" * 200 + ",b=1", "a=" + "x" * 200 + ",b=2"
    assert len(job_dirname(long_a)) == 120 and job_dirname(long_a) != job_dirname(long_b)


def test_the_objective_is_the_optimized_metric_or_none():
    metrics = {"eval/fid_dense": 12.5, "prune/method": "obs_diff", "eval/clip_score": math.nan}
    assert objective(metrics, "eval/fid_dense") == 12.5
    assert objective(metrics, None) is None  # nothing optimised
    assert objective(None, "eval/fid_dense") is None  # the run failed
    assert objective(metrics, "eval/clip_score") is None  # NaN: Optuna would end the study
    assert objective(metrics, "eval/fid_real") is None  # not measured in this run


@pytest.fixture
def multirun_config(tmp_path, monkeypatch):
    """Compose a multirun's config as ``obsdiff -m`` does; yields (config, config loader)."""
    monkeypatch.setenv("OBSDIFF_CACHE", str(tmp_path / "cache"))

    def _compose(*overrides):
        hydra = GlobalHydra.instance().hydra
        cfg = hydra.compose_config(
            "config", [*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], RunMode.MULTIRUN
        )
        return cfg, hydra.config_loader

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield _compose


def test_every_bad_job_of_a_grid_is_listed_before_any_starts(multirun_config, caplog):
    config, loader = multirun_config("sparsity.ratio=0.5,1.5", "schedule=uniform,no_such_schedule")
    assert len(grid(config, loader)) == 4
    bad, done = check_grid(config, loader)
    assert len(bad) == 3 and done == []
    assert sum("sparsity.ratio=1.5" in line for line in bad) == 2
    assert sum("no_such_schedule" in line for line in bad) == 2
    with pytest.raises(SystemExit) as exit_info:
        SweepCallback().on_multirun_start(config)
    assert exit_info.value.code == 2
    assert "3 job(s) of this sweep have a bad config" in caplog.text


def test_a_job_the_model_cannot_take_is_refused_before_launch(multirun_config):
    config, loader = multirun_config("pruner.blocks=[0],[99]")  # tiny_digits has 4 blocks
    bad, _ = check_grid(config, loader)
    assert len(bad) == 1 and "pruner.blocks=[99]" in bad[0] and "out of range" in bad[0]


def test_a_finished_job_is_found_in_its_folder_before_launch(multirun_config):
    config, loader = multirun_config("sparsity.ratio=0.3,0.5", "logger=none")
    jobs = grid(config, loader)
    job_cfg = loader.load_sweep_config(config, list(jobs[1]))
    run_dir = Path(job_cfg.hydra.sweep.dir) / job_cfg.hydra.sweep.subdir
    assert run_dir.name == "sparsity.ratio=0.5"  # logger is left out of folder names
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    write_status(run_dir, "done", run_hash(task_config(job_cfg)))
    assert check_grid(config, loader) == ([], [run_dir])
    write_status(run_dir, "done", "another-config")  # same folder, other config: not skipped
    assert check_grid(config, loader) == ([], [])


# ---- through the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def obsdiff(tmp_path_factory):
    """Run ``obsdiff`` in a subprocess; one dense cache for the module."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "OBSDIFF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}

    def _obsdiff(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
        head = ["-c", script] if script else ["-m", "obsdiff.cli"]
        cmd = [sys.executable, *head, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)

    return _obsdiff


def job_dirs(sweep: Path) -> dict[str, Path]:
    """Each job folder of a sweep, keyed by its ``pruner.blocks`` override."""
    dirs = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        blocks = [o for o in yaml.safe_load(overrides.read_text()) if o.startswith("pruner.blocks=")]
        dirs[blocks[0].partition("=")[2] if blocks else None] = overrides.parent.parent
    return dirs


def job_dir(sweep: Path, *wanted: str) -> Path:
    """The one job folder of a sweep whose overrides include every ``wanted`` override."""
    found = [
        overrides.parent.parent
        for overrides in sweep.glob("*/.hydra/overrides.yaml")
        if set(wanted) <= set(yaml.safe_load(overrides.read_text()))
    ]
    assert len(found) == 1, (wanted, found)
    return found[0]


@pytest.mark.slow
def test_a_bad_grid_exits_2_listing_every_bad_job_and_launches_none(obsdiff, tmp_path):
    sweep = tmp_path / "sweep"
    proc = obsdiff("-m", f"hydra.sweep.dir={sweep}", "sparsity.ratio=0.5,1.5", "schedule=uniform,nope")
    out = proc.stdout + proc.stderr  # Hydra logs the sweep itself to stdout
    assert proc.returncode == 2, out[-3000:]
    assert "3 job(s) of this sweep have a bad config" in out
    assert out.count("sparsity.ratio=1.5") >= 2 and out.count("nope") >= 2
    assert not [p for p in sweep.glob("*") if p.is_dir()]  # nothing launched


@pytest.mark.slow
def test_a_relaunched_sweep_redoes_only_what_is_missing_and_survives_a_failing_job(obsdiff, tmp_path):
    sweep = tmp_path / "sweep"
    # job 0 fails before it starts (a hub model that is not here: only running it can tell), job 1 runs
    paths = "model.path=nobody/no-such-model,tiny_digits"
    first = obsdiff("-m", f"hydra.sweep.dir={sweep}", *CHEAP, "pruner.blocks=[0]", paths)
    assert first.returncode == 0, first.stderr[-3000:]
    missing = job_dir(sweep, "model.path=nobody/no-such-model")
    assert read_status(missing)["state"] == "failed"
    assert "weights not found" in read_status(missing)["error"]
    assert "job failed before it started" in (missing / "cli.log").read_text()
    done = job_dir(sweep, "model.path=tiny_digits", "pruner.blocks=[0]")
    assert read_status(done)["state"] == "done"
    report = (sweep / "report.md").read_text()  # written when the sweep ends
    assert "| obs_diff |" in report and "1 run(s) not done" in report
    finished = (done / "metrics.json").stat().st_mtime_ns

    # another grid around the finished job: a different job number, the same folder, skipped
    again = obsdiff(
        "-m", f"hydra.sweep.dir={sweep}", *CHEAP, "pruner.blocks=[1],[0]", "model.path=tiny_digits"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert job_dir(sweep, "model.path=tiny_digits", "pruner.blocks=[0]") == done
    out = again.stdout + again.stderr  # Hydra logs the sweep itself to stdout
    assert "1 job(s) done already with this config, skipped" in out
    assert "skipped: " in (done / "cli.log").read_text()
    assert (done / "metrics.json").stat().st_mtime_ns == finished
    assert read_status(job_dir(sweep, "pruner.blocks=[1]"))["state"] == "done"
    assert "(2 runs)" in out and "job failed" in out  # the summary names the earlier failure


@pytest.mark.slow
def test_a_single_run_logs_its_folder_and_its_failure_into_its_log_file(obsdiff, tmp_path):
    bad = tmp_path / "bad"
    proc = obsdiff(f"hydra.run.dir={bad}", "sparsity.ratio=1.5")
    assert proc.returncode == 2  # a user error: one line, status 2
    log = (bad / "cli.log").read_text()
    assert "sparsity.ratio=1.5 is invalid" in log and f"output dir {bad}" in log
    assert read_status(bad)["state"] == "failed"

    crash = tmp_path / "crash"
    script = (
        "import sys, types\n"
        "def run(cfg, run_dir): raise RuntimeError('a bug in the run')\n"
        "sys.modules['obsdiff.run'] = types.SimpleNamespace(run=run, plan_only=run)\n"
        "from obsdiff.cli import main\n"
        "main()\n"
    )
    proc = obsdiff(f"hydra.run.dir={crash}", "logger=none", script=script)
    assert proc.returncode == 1 and "a bug in the run" in proc.stderr
    log = (crash / "cli.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: a bug in the run" in log
    assert log.count("output dir") == 2  # at the start and at the end


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job_in_its_own_process_with_its_own_wandb_run(obsdiff, tmp_path):
    sweep = tmp_path / "multirun" / "sweep-1"
    proc = obsdiff("-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", *CHEAP,
                   "logger=wandb", "logger.mode=offline", "pruner.blocks=[0],[1]")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert set(dirs) == {"[0]", "[1]"}
    pids = {read_status(d)["pid"] for d in dirs.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # one process per job
    assert all(read_status(d)["state"] == "done" for d in dirs.values())
    assert all((d / "pruned" / "manifest.json").is_file() for d in dirs.values())
    assert (sweep / "report.md").is_file() and list(sweep.glob(".submitit/*/*_log.out"))
    run_ids = {(d / "wandb" / "run_id").read_text() for d in dirs.values()}
    assert len(run_ids) == 2  # one W&B run per job (tests/unit/test_tracking.py reads the records)
    for run_dir in dirs.values():
        (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        assert b"multirun/sweep-1" in record.read_bytes()  # the sweep's group


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_into_its_folder_and_resumes(tmp_path):
    """SIGUSR2 is how SLURM (and submitit's local executor) announces preemption: the launcher's
    checkpoint() resubmits the same job, which reruns in the same folder and resumes by package."""
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "OBSDIFF_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_SILENT": "true",
    }
    cmd = [sys.executable, "-m", "obsdiff.cli", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}",
           *CHEAP, "pruner.num_packages=2", "pruner.blocks=[0,1]", "logger=wandb", "logger.mode=offline",
           "schedule=uniform,log_decrease"]  # fmt: skip
    sweep_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints := list(sweep.glob("*/checkpoints/package-000.json"))):
            assert sweep_proc.poll() is None and time.monotonic() < deadline, "no package finished"
            time.sleep(0.2)
        run_dir = checkpoints[0].parent.parent
        first_pid = read_status(run_dir)["pid"]
        os.kill(first_pid, signal.SIGUSR2)  # preempted after its first package
        out, _ = sweep_proc.communicate(timeout=600)
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
    assert sweep_proc.returncode == 0, out[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "done" and status["pid"] != first_pid  # finished by the requeued job
    log = (run_dir / "cli.log").read_text()
    assert "resuming" in log and "resumed: packages 1-1 of 2" in log
    assert any("Requeued" in p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    records = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 2 and len({p.name for p in records}) == 1  # the same W&B run, resumed
    (other,) = {p.parent for p in sweep.glob("*/status.json")} - {run_dir}
    assert read_status(other)["state"] == "done"  # the other job of the sweep was not disturbed
