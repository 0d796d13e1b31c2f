"""One run: load → calibrate/prune per package → save → evaluate → log (the paper's algorithm box)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from obsdiff.artifacts import library_versions, save_pruned
from obsdiff.config import parse_blocks, pattern_from_config, validate
from obsdiff.evaluation.evaluate import Scorer, dense_baseline, generate, prepare_eval_set
from obsdiff.evaluation.grid import save_image_grid
from obsdiff.models import get_adapter
from obsdiff.prune import LayerRecord, prepare_calibration, prune_model
from obsdiff.solvers import get_solver
from obsdiff.tracking import tracking

log = logging.getLogger(__name__)
LAYER_COLUMNS = [f.name for f in dataclasses.fields(LayerRecord)]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured experiment.

    Writes ``metrics.json``, ``layers.csv``, ``pruned/`` and ``samples.png`` into ``run_dir``.
    """
    validate(cfg)  # 0. every check that needs no weights
    torch.set_flush_denormal(cfg.flush_denormal)
    adapter, pattern = get_adapter(cfg.model.family), pattern_from_config(cfg.sparsity)
    targets = list(cfg.pruner.targets or adapter.default_targets)
    metrics: dict = {"prune/sparsity_target": pattern.target_sparsity, **_versions()}
    with tracking(cfg, run_dir) as tracker:
        pipe = adapter.load(cfg.model)  # 1. load; encode every prompt once
        calib = prepare_calibration(adapter, pipe, cfg)
        if cfg.eval.kind != "none":  # 2. dense baseline (cached per model + eval config)
            evalset, scorer = (
                prepare_eval_set(adapter, pipe, cfg.eval, cfg.model.max_sequence_length),
                Scorer(cfg.eval, pipe.tokenizer),
            )
            dense, reference, dense_metrics = dense_baseline(adapter, pipe, evalset, scorer, cfg)
            metrics |= {f"dense/{k}": v for k, v in dense_metrics.items()} | scorer.names()
        adapter.offload_text_encoders(pipe)
        start = time.perf_counter()  # 3. group-wise sequential pruning
        records = prune_model(
            adapter, pipe, calib, pattern, get_solver(cfg.pruner.solver), cfg.pruner.num_packages, targets,
            blocks=parse_blocks(cfg.pruner.blocks),
            solver_options={"damp_frac": cfg.pruner.damp_frac, "block_size": cfg.pruner.block_size},
            on_package_done=lambda rows: _append_layers(run_dir / "layers.csv", rows),
        )  # fmt: skip
        metrics |= {"prune/seconds": time.perf_counter() - start, **_achieved(records)}
        _write_metrics(run_dir, metrics)
        if cfg.save_model:  # 4. save
            save_pruned(run_dir / "pruned", adapter.denoiser(pipe), cfg, extra={"metrics": dict(metrics)})
        if cfg.eval.kind != "none":  # 5. evaluate against the same prompts and seeds
            pruned = generate(adapter, pipe, evalset, cfg.eval, evalset.seeds, desc="pruned images")
            metrics |= {f"eval/{k}": v for k, v in scorer.score(pruned, evalset.prompts, reference).items()}
            n = min(cfg.eval.num_grid, len(evalset.prompts))
            save_image_grid(
                run_dir / "samples.png", {"dense": dense[:n], "pruned": pruned[:n]}, evalset.prompts[:n]
            )
            tracker.log_image("samples", run_dir / "samples.png", caption="dense (top) vs pruned (bottom)")
        _write_metrics(run_dir, metrics)  # 6. log
        tracker.log_metrics(metrics)
        tracker.log_table("layers", LAYER_COLUMNS, [list(dataclasses.astuple(r)) for r in records])
    log.info("metrics: %s", json.dumps(metrics, indent=1))
    return metrics


def _versions() -> dict[str, str]:
    return {f"versions/{k}": v for k, v in library_versions().items()}


def _achieved(records: list[LayerRecord]) -> dict[str, float]:
    zeros = sum(r.sparsity * r.rows * r.cols for r in records)
    total = sum(r.rows * r.cols for r in records)
    return {"prune/sparsity_achieved": zeros / total, "prune/num_layers": len(records)}


def _append_layers(path: Path, rows: list[LayerRecord]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LAYER_COLUMNS)
        writer.writerows(dataclasses.astuple(r) for r in rows)


def _write_metrics(run_dir: Path, metrics: dict) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
