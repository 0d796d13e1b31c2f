"""Save and load pruned denoisers: safetensors weights + a JSON manifest, never pickles.

A ``pruned/`` folder is a diffusers model folder as well: ``config.json`` +
``diffusion_pytorch_model.safetensors`` load with the stock class's ``from_pretrained``
(unstructured and N:M; structured blocks have shapes no stock config describes, so those load with
:func:`load_pruned` only). ``manifest.json`` says how it was pruned, ``README.md`` is the model card
and ``config.yaml`` the resolved run config. Nothing in the folder names a path of the machine that
pruned it (:func:`portable`), so it can be shared as it is.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from obsdiff.config import effective_update
from obsdiff.fileio import atomic_write, write_json, write_text
from obsdiff.models import get_adapter
from obsdiff.provenance import config_hash, files_fingerprint, library_versions  # noqa: F401 (re-exported)

FORMAT = "obsdiff-pruned/2"  # /2: per-attention shapes ("attn", "attn2"), group-keyed removals
FORMAT_V1 = "obsdiff-pruned/1"  # one head count per block ("heads"), read and converted
WEIGHTS_FORMAT = FORMAT_V1  # the safetensors layout did not change with the manifest
WEIGHTS = "diffusion_pytorch_model.safetensors"  # the name diffusers' from_pretrained reads
WEIGHTS_V1 = "denoiser.safetensors"  # the same bytes under the name of earlier artifacts (still read)
MANIFEST = "manifest.json"
DIFFUSERS_CONFIG = "config.json"
CARD = "README.md"
PACKAGE_DIR = Path(__file__).resolve().parent
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+)--(?P<name>[^/]+)/snapshots/")


class ArtifactMismatchError(ValueError):
    """The artifact does not fit the base model it is loaded into."""


def _jsonable(config: Any) -> dict:
    return json.loads(json.dumps(dict(config), default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def save_pruned(out_dir: Path, denoiser: torch.nn.Module, cfg: Any, extra: dict | None = None) -> Path:
    """Write the weights, diffusers' ``config.json``, ``manifest.json``, ``config.yaml`` and the card.

    Every file is written atomically. The card holds the metrics known now (``extra["metrics"]``);
    call :func:`write_model_card` again once the run has evaluated the pruned model.

    Args:
        out_dir: the run's ``pruned/`` folder.
        denoiser: the pruned denoiser (structured runs: with its heads / neurons sliced out).
        cfg: the run's resolved config.
        extra: more manifest fields (metrics; ``structure`` = the per-block architecture and the
            removed heads / neurons of a structured run).
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT}
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    (out_dir / WEIGHTS_V1).unlink(missing_ok=True)  # an earlier save's copy under the old name
    saved_config = {k: v for k, v in _jsonable(denoiser.config).items() if k != "_name_or_path"}
    manifest = portable({
        "format": FORMAT,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "denoiser_class": type(denoiser).__name__,
        "denoiser_config": saved_config,
        "method": cfg.pruner.name,
        "mask": cfg.pruner.mask,
        "update": effective_update(cfg.pruner),
        "pattern": OmegaConf.to_container(cfg.sparsity, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "pruner": OmegaConf.to_container(cfg.pruner, resolve=True),
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
        "config_hash": config_hash(cfg),
        "versions": library_versions(),
        **(extra or {}),
    })  # fmt: skip
    if "structure" in manifest:  # per-block shapes: no stock config describes them
        (out_dir / DIFFUSERS_CONFIG).unlink(missing_ok=True)
    else:
        write_json(out_dir / DIFFUSERS_CONFIG, _diffusers_config(denoiser, saved_config))
    write_json(out_dir / MANIFEST, manifest)
    resolved = OmegaConf.create(portable(OmegaConf.to_container(cfg, resolve=True)))
    write_text(out_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    write_text(out_dir / CARD, model_card(manifest))
    return out_dir


def write_model_card(out_dir: str | Path, metrics: dict | None = None) -> Path:
    """(Re)write the ``README.md`` model card of a ``pruned/`` folder from its manifest.

    Args:
        out_dir: the ``pruned/`` folder.
        metrics: the run's final metrics (e.g. with ``eval/*`` after evaluation); they update the
            manifest's pruning-time metrics on the card (the manifest itself is left as saved).
    """
    manifest = read_manifest(out_dir)
    manifest["metrics"] = portable({**manifest.get("metrics", {}), **(metrics or {})})
    return write_text(Path(out_dir) / CARD, model_card(manifest))


def portable(value: Any) -> Any:
    """``value`` (JSON-like) with each absolute path of this machine replaced by a portable name.

    A hub cache snapshot becomes its repo id, a file of the package ``obsdiff/...``, one under the
    home folder ``~/...``, anything else ``.../<name>`` (its folder is this machine's business).
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    path = Path(value)
    snapshot = _HUB_SNAPSHOT.search(path.as_posix())
    if snapshot:
        return f"{snapshot['org']}/{snapshot['name']}"
    for root, name in ((PACKAGE_DIR, "obsdiff"), (Path.home(), "~")):
        for candidate in (path, path.resolve()):
            if candidate.is_relative_to(root):
                return (Path(name) / candidate.relative_to(root)).as_posix()
    return f".../{path.name}"


def _local(value: str) -> str:
    """The local path of a :func:`portable` name that has one (``obsdiff/...``, ``~/...``)."""
    if value.startswith("obsdiff/") and (PACKAGE_DIR.parent / value).exists():
        return str(PACKAGE_DIR.parent / value)
    return os.path.expanduser(value) if value.startswith("~/") else value


def _diffusers_config(denoiser: torch.nn.Module, config: dict) -> dict:
    """The stock class's ``config.json``: its name, this diffusers version, the public fields."""
    import diffusers

    public = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"_class_name": type(denoiser).__name__, "_diffusers_version": diffusers.__version__, **public}


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


def base_model_config(artifact: Path, manifest: dict, /, need_path: bool = True, **overrides: Any) -> Any:
    """The manifest's base-model settings with its portable path made local, and ``overrides``.

    Raises:
        ArtifactMismatchError: ``need_path`` and the base model was a folder of another machine
            that ``overrides`` does not replace.
    """
    saved_model = {**manifest["model"], "path": _local(str(manifest["model"]["path"]))}
    for key in ("offload", "offload_stream"):  # how the pruning run ran: a loaded pipeline runs as is
        saved_model.pop(key, None)
    model_cfg = OmegaConf.create({**saved_model, **overrides})
    if need_path and str(model_cfg.path).startswith(".../"):  # see portable()
        raise ArtifactMismatchError(
            f"{artifact}: pruned from a local folder {model_cfg.path!r} of another machine; pass "
            "path=<your copy of that base model> or pipeline=<the loaded base pipeline>"
        )
    return model_cfg


def load_pruned(path: str | Path, /, pipeline: Any = None, **pipeline_kwargs: Any) -> Any:
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
    model_cfg = base_model_config(path, manifest, need_path=pipeline is None, **pipeline_kwargs)
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
    weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / WEIGHTS_V1
    state = load_file(str(weights), device=str(next(denoiser.parameters()).device))
    dtype = next(denoiser.parameters()).dtype
    denoiser.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return pipe


def model_card(manifest: dict) -> str:
    """The ``README.md`` of an artifact: base model, method, pattern, calibration, metrics, how to load."""
    model, pattern, metrics = manifest["model"], manifest["pattern"], manifest.get("metrics", {})
    pruner, calibration = manifest.get("pruner", {}), manifest.get("calibration", {})
    schedule = manifest["schedule"]
    # a hub id (org/name), not an embedded name, a package file, ``~/...`` or ``.../name``
    path = str(model["path"])
    hub_base = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) and not path.startswith("obsdiff/")
    lines = ["---", "library_name: diffusers", *([f"base_model: {path}"] if hub_base else [])]
    lines += [f"tags: [obsdiff, pruning, sparsity, {model['family']}]", "---", ""]
    lines += [f"# {model.get('name', path)}: {manifest['method']}, {_pattern_label(pattern)}", ""]
    lines += [f"The denoiser of `{path}` pruned one-shot by obsdiff (OBS-Diff).", ""]
    rows = {
        "Base model": f"`{path}` ({'' if '/' in path else 'embedded in obsdiff; '}"
        f"{model['family']}, {manifest['denoiser_class']})",
        "Method": f"{manifest['method']}: mask `{manifest['mask']}`, update `{manifest['update']}`",
        "Pattern": _pattern_label(pattern),
        "Calibration": _calibration_label(calibration) if calibration else "not recorded",
        "Schedule": f"{schedule['name']} (alpha {schedule.get('alpha_min')} to {schedule.get('alpha_max')})",
        "Packages": pruner.get("num_packages", metrics.get("prune/num_packages", "not recorded")),
        "Config hash": f"`{manifest['config_hash']}`",
    }
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items()), ""]
    shown = sorted((k for k in metrics if not k.startswith("versions/")), key=_metric_order)
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {_metric_text(metrics[k])} |" for k in shown] or ["| (none recorded) | |"]
    lines += ["", "## Load", ""]
    if "structure" in manifest:
        lines += [
            "The blocks have fewer heads / narrower FFNs than any stock config describes, so load it "
            "with obsdiff, which gives the stock class the per-block shapes of `manifest.json` first:",
            "", "```python", "import obsdiff", "", 'pipe = obsdiff.load_pruned("path/to/pruned")', "```",
        ]  # fmt: skip
    else:
        lines += [
            "The removed weights are zeros in dense tensors: the stock class loads this folder as it is.",
            "", "```python", f"from diffusers import {manifest['denoiser_class']}", "",
            f'denoiser = {manifest["denoiser_class"]}.from_pretrained("path/to/pruned")', "```", "",
            "The whole pipeline (the base model above with this denoiser in it): "
            '`obsdiff.load_pruned("path/to/pruned")`.',
        ]  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    lines += ["", "## Versions", "", versions or "not recorded", ""]
    return "\n".join(lines)


def _pattern_label(pattern: dict) -> str:
    """``unstructured 50%``, ``2:4``, ``structured 30% (heads 30%, FFN 30%)``."""
    if pattern["kind"] == "nm":
        return f"{pattern['n']}:{pattern['m']}"
    label = f"{pattern['kind']} {round(100 * pattern['ratio'])}%"
    if pattern["kind"] == "structured":
        heads, ffn = (pattern.get(k) for k in ("head_ratio", "ffn_ratio"))  # null = the ratio
        heads, ffn = (pattern["ratio"] if r is None else r for r in (heads, ffn))
        label += f" (heads {round(100 * heads)}%, FFN {round(100 * ffn)}%)"
    return label


def _calibration_label(calibration: dict) -> str:
    """``digits, 32 prompts x 8 steps, guidance 4.5, 128 px, seed 0`` (plus the source's file or dataset)."""
    where = calibration.get("path") or calibration.get("dataset")
    source = f"{calibration.get('source')} (`{where}`)" if where else str(calibration.get("source"))
    return (
        f"{source}, {calibration.get('num_prompts')} prompts x {calibration.get('num_steps')} steps, "
        f"guidance {calibration.get('guidance_scale')}, {calibration.get('resolution')} px, "
        f"seed {calibration.get('seed')}"
    )


def _metric_order(key: str) -> tuple[int, str]:
    prefixes = ("prune/", "eval/", "dense/", "model/")
    return next((i for i, p in enumerate(prefixes) if key.startswith(p)), len(prefixes)), key


def _metric_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
