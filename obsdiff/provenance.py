"""Where a number comes from: library versions, config hashes and weight-file fingerprints.

A leaf (stdlib and omegaconf at import): torch, diffusers and transformers are imported inside
:func:`library_versions` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def library_versions() -> dict[str, str]:
    """Versions recorded next to every artifact and number."""
    import diffusers
    import torch
    import transformers

    from obsdiff import __version__

    return {
        "obsdiff": __version__,
        "torch": str(torch.__version__),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def config_hash(cfg: Any) -> str:
    """Short, stable hash of a (resolved) config."""
    return _digest(OmegaConf.to_container(cfg, resolve=True))


def _digest(container: Any) -> str:
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def files_fingerprint(*locations: str | Path) -> str:
    """Short hash of every file under the given local paths (relative name, size, mtime).

    Caches key on it, so that new weights or images at the same path never reuse stale results.
    A location that is not a local path (a hub id) adds only its name.
    """
    entries = []
    for location in locations:
        path = Path(location)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                stat = file.stat()
                entries.append(
                    f"{file.relative_to(path) if path.is_dir() else file}:{stat.st_size}:{stat.st_mtime_ns}"
                )
        entries.append(str(location))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:12]


# Fields that change how a run is carried out or recorded, never what it computes.
NOT_HASHED = ("resume", "skip_done", "logger", "optimized_metric", "pruner.hessian_cache", "plan_only",
              "model.offload", "model.offload_stream")  # fmt: skip


def run_hash(cfg: Any) -> str:
    """Hash of what a run computes: the resolved config without :data:`NOT_HASHED` fields.

    A rerun in the same run directory resumes only if this matches; a sweep skips a job whose
    directory holds a ``done`` run with the same value.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        *parents, leaf = key.split(".")
        node = container
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(leaf, None)
    return _digest(container)
