"""Files a run and its caches write: atomic, locked, status records, package checkpoints."""

import json
import logging
import multiprocessing
import os
import stat
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from obsdiff.checkpoint import PackageCheckpoints
from obsdiff.evaluation.cache import load_or_build
from obsdiff.fileio import atomic_write, write_json
from obsdiff.pruners.records import LayerRecord
from obsdiff.runstate import is_done, read_status, write_status


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"a": 1})

    def broken(tmp):
        tmp.write_text('{"a": ')  # half a file, then a crash
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "card.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: others can read it


def test_status_records_state_and_hash(tmp_path):
    assert read_status(tmp_path) is None and not is_done(tmp_path)
    write_status(tmp_path, "running", "abc")
    assert read_status(tmp_path)["state"] == "running" and not is_done(tmp_path)
    write_status(tmp_path, "done", "abc", outputs=["pruned"])
    assert is_done(tmp_path) and is_done(tmp_path, "abc") and not is_done(tmp_path, "other")
    with pytest.raises(ValueError, match="unknown run state"):
        write_status(tmp_path, "finished", "abc")
    (tmp_path / "status.json").write_text('{"state": "do')  # truncated: not a status
    assert read_status(tmp_path) is None


def _build_entry(entry, log_file, out):
    """One of two processes asking for the same cache entry (the build takes a second)."""

    def load():
        return load_file(str(entry))["x"] if entry.exists() else None

    def build():
        with open(log_file, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        value = torch.arange(4.0)
        atomic_write(entry, lambda tmp: save_file({"x": value}, str(tmp)))
        return value

    out.put(load_or_build(entry, load, build, "test entry").tolist())


def test_two_processes_build_a_shared_cache_entry_once(tmp_path):
    entry, log_file = tmp_path / "cache" / "entry.safetensors", tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_entry, args=(entry, log_file, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert [out.get(timeout=5), out.get(timeout=5)] == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert log_file.read_text() == "built\n"  # the second process waited and read it


def test_a_truncated_cache_entry_is_discarded_and_rebuilt(tmp_path, caplog):
    entry = tmp_path / "entry.safetensors"
    save_file({"x": torch.arange(1000.0)}, str(entry))
    entry.write_bytes(entry.read_bytes()[:500])  # a copy that stopped half-way
    builds = []

    def load():
        return load_file(str(entry))["x"] if entry.exists() else None

    def build():
        builds.append(1)
        save_file({"x": torch.ones(3)}, str(entry))
        return torch.ones(3)

    with caplog.at_level(logging.WARNING):
        value = load_or_build(entry, load, build, "test entry")
    assert builds == [1] and value.tolist() == [1.0, 1.0, 1.0]
    assert "corrupt" in caplog.text
    assert load_or_build(entry, load, build, "test entry").tolist() == [1.0] * 3 and builds == [1]


def test_package_checkpoints_restore_weights_and_stop_at_a_damaged_package(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    record = LayerRecord("0", 3, 4, 0, 0.5, 0.01, 0.1, 0.25, 1.5)
    ckpt = PackageCheckpoints(tmp_path / "checkpoints", "hash1")
    ckpt.save(0, net, ["0"], [record], {"0.attn": [1]})
    ckpt.save(1, net, ["1"], [record], {})
    assert ckpt.finished(3) == 2
    assert PackageCheckpoints(tmp_path / "checkpoints", "other").finished(3) == 0  # another config
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ckpt.load(0, fresh)
    assert torch.equal(fresh[0].weight, net[0].weight) and not torch.equal(fresh[1].weight, net[1].weight)
    assert ckpt.record(0) == ([record], {"0.attn": [1]})
    tensors = tmp_path / "checkpoints" / "package-001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])  # truncated after its record was written
    assert ckpt.finished(3) == 1
