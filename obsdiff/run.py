"""One run: load → calibrate/prune per package → save → evaluate → log (the paper's algorithm box)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from obsdiff.artifacts import library_versions, load_pruned, read_manifest, save_pruned
from obsdiff.config import RunSpec, check_fields, resolve
from obsdiff.evaluation.cost import denoiser_cost
from obsdiff.evaluation.evaluate import Scorer, dense_baseline, generate, prepare_eval_set
from obsdiff.evaluation.grid import save_image_grid
from obsdiff.models import ModelAdapter, get_adapter
from obsdiff.prune import prepare_calibration, prune_groupwise
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.pruners.records import LayerRecord
from obsdiff.pruners.structured import StructuredStrategy
from obsdiff.solvers import layer_solver
from obsdiff.tracking import tracking

log = logging.getLogger(__name__)
LAYER_COLUMNS = [f.name for f in dataclasses.fields(LayerRecord)]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured experiment (``artifact=…``: evaluate a saved pruned model instead).

    Writes ``metrics.json``, ``layers.csv``, ``pruned/`` and ``samples.png`` into ``run_dir``.
    """
    check_fields(cfg)  # 0. every check that needs no weights; the spec, resolved once
    spec = resolve(cfg)
    torch.set_flush_denormal(cfg.flush_denormal)
    adapter = get_adapter(spec.family, spec.options)
    metrics: dict = {f"versions/{k}": v for k, v in library_versions().items()}
    with tracking(cfg, run_dir) as tracker:
        pipe = adapter.load(cfg.model)  # 1. load; encode every prompt once
        calib = (
            prepare_calibration(adapter, pipe, cfg.calibration, cfg.schedule)
            if cfg.artifact is None
            else None
        )
        if cfg.eval.kind != "none":  # 2. dense baseline (cached per model + eval config)
            evalset, scorer = prepare_eval_set(adapter, pipe, cfg.eval), Scorer(cfg.eval, pipe.tokenizer)
            dense, dense_metrics = dense_baseline(adapter, pipe, evalset, scorer, cfg)
            metrics |= {f"dense/{k}": v for k, v in dense_metrics.items()} | scorer.names()
        adapter.offload_text_encoders(pipe)
        cost_dense = _cost(adapter, pipe, cfg)
        if cfg.artifact is None:  # 3. group-wise sequential pruning, 4. save
            records = _prune(cfg, spec, adapter, pipe, calib, run_dir, metrics)
        else:  # 3'. prune once, evaluate many
            records = _load_artifact(cfg, pipe, run_dir, metrics)
        metrics |= _cost_metrics(cost_dense, _cost(adapter, pipe, cfg), adapter.denoiser(pipe))
        _write_metrics(run_dir, metrics)
        if cfg.eval.kind != "none":  # 5. evaluate against the same prompts and seeds
            pruned = generate(adapter, pipe, evalset, cfg.eval, evalset.seeds, desc="pruned images")
            metrics |= {f"eval/{k}": v for k, v in scorer.score(pruned, evalset.prompts).items()}
            n = min(cfg.eval.num_grid, len(evalset.prompts))
            save_image_grid(
                run_dir / "samples.png", {"dense": dense[:n], "pruned": pruned[:n]}, evalset.prompts[:n]
            )
            tracker.log_image("samples", run_dir / "samples.png", caption="dense (top) vs pruned (bottom)")
        _write_metrics(run_dir, metrics)  # 6. log
        tracker.log_metrics(metrics)
        tracker.log_table("layers", LAYER_COLUMNS, records)
    log.info("metrics: %s", json.dumps(metrics, indent=1))
    return metrics


def _prune(
    cfg: DictConfig, spec: RunSpec, adapter: ModelAdapter, pipe: Any, calib: Any, run_dir: Path, metrics: dict
) -> list:
    """Prune with the spec's strategy, record the metrics, save; return the layer rows."""
    denoiser, pattern = adapter.denoiser(pipe), spec.pattern()
    strategy = _strategy(spec, pattern)
    names = _target_names(adapter, denoiser, spec)
    numel_before = sum(denoiser.get_submodule(n).weight.numel() for n in names)
    append = lambda rows: _append_layers(run_dir / "layers.csv", rows)  # noqa: E731
    start, extra = time.perf_counter(), {}
    records = prune_groupwise(adapter, pipe, calib, strategy, spec.num_packages, on_package_done=append)
    seconds = time.perf_counter() - start
    if spec.structured:
        extra["structure"] = {"architecture": adapter.architecture(denoiser), "removed": strategy.removed}
        metrics |= {"prune/head_ratio": spec.head_ratio, "prune/ffn_ratio": spec.ffn_ratio}
    # zeros (and removed weights) over every target layer of the pruned blocks
    kept = sum(int(torch.count_nonzero(denoiser.get_submodule(n).weight)) for n in names)
    metrics |= {
        "prune/method": cfg.pruner.name,
        "prune/mask": spec.mask,
        "prune/update": spec.update,
        "prune/pattern": _pattern_label(cfg.sparsity),
        "prune/schedule": cfg.schedule.name,
        "prune/num_packages": spec.num_packages,
        "prune/sparsity_target": pattern.target_sparsity,
        "prune/sparsity_achieved": 1 - kept / numel_before,
        "prune/num_layers": len(records),
        "prune/seconds": seconds,
    }
    _write_metrics(run_dir, metrics)
    if cfg.save_model:
        save_pruned(run_dir / "pruned", denoiser, cfg, extra={**extra, "metrics": dict(metrics)})
    return [list(dataclasses.astuple(r)) for r in records]


def _strategy(spec: RunSpec, pattern: Any) -> LayerwiseStrategy | StructuredStrategy:
    if spec.structured:
        return StructuredStrategy(spec.mask, pattern, spec.blocks, spec.damp_frac, spec.update == "obs")
    solver = layer_solver(spec.mask, spec.update, spec.damp_frac, spec.block_size, spec.dsnot)
    return LayerwiseStrategy(solver, pattern, spec.targets, spec.blocks)


def _target_names(adapter: ModelAdapter, denoiser: Any, spec: RunSpec) -> list[str]:
    """The layers whose weights count towards the achieved sparsity (structured: every default target)."""
    targets = adapter.default_targets if spec.structured else spec.targets
    return [n for unit in adapter.units(denoiser, spec.blocks, targets) for group in unit for n in group]


def _pattern_label(sp: DictConfig) -> str:
    """``unstructured 50%``, ``2:4``, ``structured 30%`` (how reports name a sparsity)."""
    return f"{sp.n}:{sp.m}" if sp.kind == "nm" else f"{sp.kind} {round(100 * sp.ratio)}%"


def _load_artifact(cfg: DictConfig, pipe: Any, run_dir: Path, metrics: dict) -> list:
    """Load ``cfg.artifact`` into the pipeline; carry over its pruning metrics and layer rows."""
    load_pruned(cfg.artifact, pipeline=pipe)
    saved = read_manifest(cfg.artifact).get("metrics", {})
    metrics |= {k: v for k, v in saved.items() if k.startswith("prune/")} | {"artifact": str(cfg.artifact)}
    layers = Path(cfg.artifact).parent / "layers.csv"
    if not layers.exists():
        return []
    shutil.copyfile(layers, run_dir / "layers.csv")
    return list(csv.reader(layers.open()))[1:]


def _cost(adapter: ModelAdapter, pipe: Any, cfg: DictConfig) -> dict:
    """Parameters and TFLOPs of one denoising step (CFG-doubled batch of one prompt)."""
    c = cfg.eval if cfg.eval.kind != "none" else cfg.calibration
    denoiser = adapter.denoiser(pipe)
    return denoiser_cost(
        adapter,
        dict(denoiser.config),
        adapter.architecture(denoiser),
        calls=adapter.denoiser_calls(c.guidance_scale, dict(denoiser.config)),
        latent_size=c.resolution // pipe.vae_scale_factor,
        text_tokens=adapter.text_tokens(pipe),
    )


def _cost_metrics(dense: dict, pruned: dict, denoiser: torch.nn.Module) -> dict:
    return {
        "model/params_dense": dense["params"],
        "model/params": pruned["params"],
        "model/params_nonzero": sum(int(torch.count_nonzero(p)) for p in denoiser.parameters()),
        "model/tflops_per_step_dense": dense["tflops"],
        "model/tflops_per_step": pruned["tflops"],
    }


def _append_layers(path: Path, rows: list[LayerRecord]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LAYER_COLUMNS)
        writer.writerows(dataclasses.astuple(r) for r in rows)


def _write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
