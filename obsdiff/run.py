"""One run: load → calibrate/prune per package → save → evaluate → log (the paper's algorithm box)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from obsdiff.artifacts import library_versions, save_pruned
from obsdiff.calibration.prompts import load_prompts
from obsdiff.calibration.timesteps import timestep_weights
from obsdiff.config import parse_blocks, pattern_from_config, validate
from obsdiff.evaluation.evaluate import Scorer, dense_baseline, generate, prepare_eval_set
from obsdiff.evaluation.grid import save_image_grid
from obsdiff.models import get_adapter
from obsdiff.prune import Calibration, LayerRecord, prune_model
from obsdiff.solvers import get_solver
from obsdiff.tracking import tracking

log = logging.getLogger(__name__)
LAYER_COLUMNS = [f.name for f in dataclasses.fields(LayerRecord)]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Execute the configured experiment; write ``metrics.json``, ``layers.csv``, ``pruned/``, ``samples.png``."""
    validate(cfg)  # 0. every check that needs no weights
    adapter, pattern, c = get_adapter(cfg.model.family), pattern_from_config(cfg.sparsity), cfg.calibration
    targets = list(cfg.pruner.targets or adapter.default_targets)
    metrics: dict = {"prune/sparsity_target": pattern.target_sparsity, **_versions()}
    with tracking(cfg, run_dir) as tracker:
        pipe = adapter.load(cfg.model)  # 1. load; encode every prompt once
        calib = Calibration(
            embeds=adapter.encode(pipe, load_prompts(c.source, c.num_prompts, path=c.path, column=c.column,
                                                     dataset=c.dataset, split=c.split), c.guidance_scale, c.batch_size),
            seeds=[c.seed + i for i in range(c.num_prompts)],
            num_steps=c.num_steps, guidance_scale=c.guidance_scale, resolution=c.resolution, batch_size=c.batch_size,
            timestep_weights=timestep_weights(cfg.schedule.name, c.num_steps, cfg.schedule.alpha_min,
                                              cfg.schedule.alpha_max),
        )  # fmt: skip
        if cfg.eval.kind != "none":  # 2. dense baseline (cached per model + eval config)
            evalset, scorer = prepare_eval_set(adapter, pipe, cfg.eval), Scorer(cfg.eval, pipe.tokenizer)
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
            save_image_grid(run_dir / "samples.png", {"dense": dense[:n], "pruned": pruned[:n]}, evalset.prompts[:n])
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
