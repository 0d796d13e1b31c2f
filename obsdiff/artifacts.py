"""Save and load pruned denoisers: safetensors weights + a JSON manifest, never pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from obsdiff.config import effective_update
from obsdiff.models import get_adapter
from obsdiff.provenance import config_hash, files_fingerprint, library_versions  # noqa: F401 (re-exported)

FORMAT = "obsdiff-pruned/2"  # /2: per-attention shapes ("attn", "attn2"), group-keyed removals
FORMAT_V1 = "obsdiff-pruned/1"  # one head count per block ("heads"), read and converted
WEIGHTS_FORMAT = FORMAT_V1  # the safetensors layout did not change with the manifest
WEIGHTS = "denoiser.safetensors"
MANIFEST = "manifest.json"


class ArtifactMismatchError(ValueError):
    """The artifact does not fit the base model it is loaded into."""


def _jsonable(config: Any) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def save_pruned(out_dir: Path, denoiser: torch.nn.Module, cfg: Any, extra: dict | None = None) -> Path:
    """Write ``denoiser.safetensors``, ``manifest.json`` and the resolved ``config.yaml``.

    Args:
        out_dir: the run's ``pruned/`` folder.
        denoiser: the pruned denoiser (structured runs: with its heads / neurons sliced out).
        cfg: the run's resolved config.
        extra: more manifest fields (metrics; ``structure`` = the per-block architecture and the
            removed heads / neurons of a structured run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": WEIGHTS_FORMAT})
    manifest = {
        "format": FORMAT,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config": _jsonable(denoiser.config),
        "method": cfg.pruner.name,
        "mask": cfg.pruner.mask,
        "update": effective_update(cfg.pruner),
        "pattern": OmegaConf.to_container(cfg.sparsity, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "config_hash": config_hash(cfg),
        "versions": library_versions(),
        **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    return out_dir


def read_manifest(path: str | Path) -> dict:
    """The manifest of a ``pruned/`` folder; raises if it is not an obsdiff artifact."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ArtifactMismatchError(f"{path}: no {MANIFEST}; expected a run's pruned/ folder")
    manifest = json.loads(file.read_text())
    if manifest.get("format") == FORMAT_V1:  # SD3 only: the block's head count was "heads"
        arch = manifest.get("structure", {}).get("architecture", {})
        for shape in arch.values():
            if "heads" in shape:
                shape["attn"] = shape.pop("heads")
        manifest["format"] = FORMAT
    if manifest.get("format") != FORMAT:
        raise ArtifactMismatchError(
            f"{path}: unknown artifact format {manifest.get('format')!r}, expected {FORMAT}"
        )
    return manifest


def load_pruned(path: str | Path, pipeline: Any = None, **pipeline_kwargs: Any) -> Any:
    """Restore a pruned denoiser into its pipeline.

    Args:
        path: a run's ``pruned/`` folder.
        pipeline: an already loaded base pipeline to load into (else the manifest's base model
            is loaded).
        **pipeline_kwargs: overrides of the manifest's model settings when loading the base
            pipeline, e.g. ``device="cuda"``, ``torch_dtype="float16"``, ``path="/local/sd3"``.

    Returns:
        The pipeline with the pruned denoiser: for structured artifacts the stock denoiser is
        first given the manifest's per-block shapes (fewer heads, narrower FFNs).
    """
    path = Path(path)
    manifest = read_manifest(path)
    model_cfg = OmegaConf.create({**manifest["model"], **pipeline_kwargs})
    adapter = get_adapter(model_cfg.family, model_cfg.get("options"))
    pipe = pipeline if pipeline is not None else adapter.load(model_cfg)
    denoiser = adapter.denoiser(pipe)
    saved, actual = manifest["denoiser_config"], _jsonable(denoiser.config)
    diff = {k: (saved.get(k), actual.get(k)) for k in set(saved) | set(actual)
            if not k.startswith("_") and saved.get(k) != actual.get(k)}  # fmt: skip
    if type(denoiser).__name__ != manifest["denoiser_class"] or diff:
        raise ArtifactMismatchError(
            f"{path}: the artifact was pruned from {manifest['model']['path']!r} "
            f"({manifest['denoiser_class']}) and does not match this base model: {diff}"
        )
    if adapter.architecture(denoiser):
        raise ArtifactMismatchError(f"{path}: the pipeline's denoiser is already pruned; pass a dense base")
    adapter.reshape(denoiser, manifest.get("structure", {}).get("architecture", {}))
    state = load_file(str(path / WEIGHTS), device=str(next(denoiser.parameters()).device))
    dtype = next(denoiser.parameters()).dtype
    denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return pipe
