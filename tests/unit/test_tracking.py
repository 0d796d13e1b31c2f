"""The W&B tracker with real offline wandb: group, job type, tags, state, artifact, exit code, and
the same run id when a run is rerun in its directory. The offline run files are read back."""

import struct
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
from wandb.proto import wandb_internal_pb2

from obsdiff.cli import CONF_DIR
from obsdiff.tracking import RUN_ID, tracking

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of 7-byte-headed chunks


def records(path: Path) -> list:
    """Every record of an offline run's ``run-<id>.wandb`` file."""
    data, pos, chunk, out = path.read_bytes(), 7, b"", []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += BLOCK - pos % BLOCK
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            out.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return out


def offline_run(run_dir: Path) -> dict:
    """The run record, final summary values, artifacts and exit code of the latest offline run."""
    (path,) = (run_dir / "wandb" / "latest-run").glob("run-*.wandb")
    for _ in range(100):  # wandb's service process may still be writing the file after finish()
        if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
            break
        time.sleep(0.1)
    run, summary, artifacts, exit_code = None, {}, [], None
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "summary":
            summary |= {item.key: item.value_json for item in rec.summary.update if item.key}
        elif kind == "artifact":
            artifacts.append(rec.artifact)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    return {"run": run, "summary": summary, "artifacts": artifacts, "exit_code": exit_code}


@pytest.fixture
def wandb_cfg(compose_cfg):
    return compose_cfg("logger=wandb", "logger.mode=offline", "logger.tags=[paper]")


def test_a_run_logs_its_config_state_and_pruned_model_and_resumes_its_id(wandb_cfg, run_dir):
    pruned = run_dir / "pruned"
    pruned.mkdir()
    (pruned / "denoiser.safetensors").write_bytes(b"\0" * 64)
    manifest = {"method": "obs_diff", "format": 1}
    with tracking(wandb_cfg, run_dir) as tracker:
        tracker.log_metrics({"eval/fid_dense": 12.5, "prune/method": "obs_diff"})
        tracker.log_artifact(pruned, manifest)
    first = offline_run(run_dir)
    run = first["run"]
    assert run.job_type == "prune" and run.run_group == ""  # a single run: no sweep, no group
    assert list(run.tags) == ["paper", "tiny_digits", "obs_diff", "unstructured"]
    assert run.display_name == "/".join(run_dir.parts[-2:])
    assert any(item.key == "pruner" for item in run.config.update)
    assert first["summary"]["state"] == '"done"' and first["summary"]["eval/fid_dense"] == "12.5"
    assert first["exit_code"] == 0
    (artifact,) = first["artifacts"]
    assert artifact.type == "model" and artifact.name == f"pruned-{run.run_id}"
    assert '"method":"obs_diff"' in artifact.metadata.replace(" ", "")
    assert [e.path for e in artifact.manifest.contents] == ["denoiser.safetensors"]
    assert (run_dir / RUN_ID).read_text() == run.run_id

    with pytest.raises(RuntimeError), tracking(wandb_cfg, run_dir):  # rerun in the same dir: same id
        raise RuntimeError("boom")
    second = offline_run(run_dir)
    assert second["run"].run_id == run.run_id
    assert second["exit_code"] == 1 and second["summary"]["state"] == '"failed"'

    with open_dict(wandb_cfg):
        wandb_cfg.resume = False  # a clean restart is a new W&B run
    with tracking(wandb_cfg, run_dir):
        pass
    assert offline_run(run_dir)["run"].run_id != run.run_id


def test_a_sweep_job_is_in_the_sweeps_group_and_an_artifact_run_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("OBSDIFF_CACHE", str(tmp_path / "cache"))
    sweep_dir = tmp_path / "multirun" / "2026-11-27" / "10-00-00"
    overrides = [
        "logger=wandb",
        "logger.mode=offline",
        "artifact=/somewhere/pruned",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    hydra_cfg.hydra.mode = RunMode.MULTIRUN  # what a multirun job sees in HydraConfig
    run_dir = sweep_dir / "sparsity.ratio=0.5"
    run_dir.mkdir(parents=True)
    cfg = hydra_cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        with tracking(cfg, run_dir):
            pass
    finally:
        HydraConfig.instance().cfg = None
    run = offline_run(run_dir)["run"]
    assert run.run_group == "2026-11-27/10-00-00" and run.job_type == "evaluate"
    assert run.display_name == "2026-11-27/10-00-00/sparsity.ratio=0.5"
