"""The state of a run directory: ``status.json`` says ``running``, ``failed`` or ``done``.

A leaf (stdlib and :mod:`obsdiff.fileio`). ``metrics.json`` and ``pruned/`` are complete only when
the status is ``done``; reports and sweeps read :func:`read_status` / :func:`is_done` and nothing
else to tell a finished run from one that was killed or failed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from obsdiff.fileio import write_json

STATUS = "status.json"
STATES = ("running", "failed", "done")


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status record, or ``None`` if it has none (never started, or not an obsdiff run).

    A ``running`` record whose process is gone reads as it was written: a killed run stays
    ``running`` until it is rerun; :func:`is_done` is what callers use to decide.
    """
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def is_done(run_dir: str | Path, config_hash: str | None = None) -> bool:
    """Whether the run finished (and, if ``config_hash`` is given, with that config)."""
    record = read_status(run_dir)
    if record is None or record["state"] != "done":
        return False
    return config_hash is None or record.get("config_hash") == config_hash


def write_status(run_dir: str | Path, state: str, config_hash: str, **fields: Any) -> dict[str, Any]:
    """Atomically record the run's state (``running`` / ``failed`` / ``done``) and returns the record.

    Args:
        run_dir: The run directory.
        state: One of :data:`STATES`.
        config_hash: The run spec's hash (what a rerun in the same directory must match).
        **fields: More fields, e.g. ``error=`` for a failure, ``outputs=`` for a finished run.
    """
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; known: {STATES}")
    record = {
        "state": state,
        "config_hash": config_hash,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **fields,
    }
    write_json(Path(run_dir) / STATUS, record)
    return record
