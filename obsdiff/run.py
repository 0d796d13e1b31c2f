"""One run: load → calibrate/prune per package → save → evaluate → log (the paper's algorithm box)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from obsdiff import distributed, faults
from obsdiff.allocation import Allocation, allocate
from obsdiff.artifacts import library_versions, load_pruned, read_manifest, save_pruned, write_model_card
from obsdiff.calibration.hessian_cache import HessianCache
from obsdiff.checkpoint import PackageCheckpoints
from obsdiff.config import ConfigError, RunSpec, check_fields, resolve
from obsdiff.evaluation.cost import denoiser_cost
from obsdiff.evaluation.evaluate import Scorer, dense_baseline, generate, prepare_eval_set
from obsdiff.evaluation.grid import image_grid
from obsdiff.fileio import atomic_write, write_text
from obsdiff.models import ModelAdapter, get_adapter
from obsdiff.models.base import resolve_device, torch_dtype
from obsdiff.plan import MemoryPlan, build_plan, check_fits, device_capacity, unit_bytes
from obsdiff.provenance import run_hash
from obsdiff.prune import NonFiniteError, make_packages, prepare_calibration, prune_groupwise
from obsdiff.pruners.layerwise import LayerwiseStrategy
from obsdiff.pruners.records import LayerRecord
from obsdiff.pruners.structured import StructuredStrategy
from obsdiff.runstate import read_status, write_status
from obsdiff.solvers import layer_solver
from obsdiff.tracking import tracking

log = logging.getLogger(__name__)
LAYER_COLUMNS = [f.name for f in dataclasses.fields(LayerRecord)]


# What a run writes into its directory (``resume=false`` deletes these before starting).
OUTPUTS = (
    "status.json", "metrics.json", "layers.csv", "samples.png", "plan.json", "allocation.json", "pruned",
    "checkpoints",
)  # fmt: skip


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured experiment (``artifact=…``: evaluate a saved pruned model instead).

    Writes ``status.json`` (``running``, then ``done`` or ``failed``), ``metrics.json``,
    ``layers.csv``, ``pruned/`` and ``samples.png`` into ``run_dir``; the outputs are complete only
    once the status is ``done``. Rerun in the same directory after a kill, the same config resumes
    after its last finished package (``checkpoints/``) and ends with the same bytes as an
    uninterrupted run; a finished run is not redone (``skip_done=false`` redoes it); another
    config is refused (``resume=false`` starts clean).

    Raises:
        ConfigError: ``run_dir`` holds a run of another config and ``resume`` is true.
    """
    check_fields(cfg)  # 0. every check that needs no weights; the spec, resolved once
    spec, run_dir, digest = resolve(cfg), Path(run_dir), run_hash(cfg)
    if not distributed.is_main():  # data-parallel (obsdiff.distributed): only rank 0 writes
        return _follow(cfg, spec, run_dir, digest)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = PackageCheckpoints(run_dir / "checkpoints", digest)
    if distributed.broadcast_object(_claim(cfg, run_dir, digest)):
        checkpoints.clear()
        log.info("%s already holds this run, done; nothing to redo (skip_done=false redoes it)", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    log.info("run dir %s (config %s)", run_dir, digest)
    write_status(run_dir, "running", digest)
    try:
        metrics = _run(cfg, spec, run_dir, checkpoints)
    except BaseException as err:  # a kill -9 leaves "running"; everything else says what happened
        write_status(run_dir, "failed", digest, error=f"{type(err).__name__}: {err}",
                     traceback=traceback.format_exc())  # fmt: skip
        raise
    outputs = sorted(name for name in OUTPUTS[1:] if (run_dir / name).exists() and name != "checkpoints")
    write_status(run_dir, "done", digest, outputs=outputs)
    checkpoints.clear()
    log.info("done; outputs in %s: %s", run_dir, ", ".join(outputs))
    return metrics


def _follow(cfg: DictConfig, spec: RunSpec, run_dir: Path, digest: str) -> dict:
    """A rank other than 0 of a data-parallel run: calibrate and solve its share, write nothing.

    It waits for rank 0 to claim ``run_dir`` and reads the finished packages rank 0 checkpointed
    there (resume); it skips the dense baseline, saving and evaluation.
    """
    if distributed.broadcast_object(None) or cfg.artifact is not None:  # done already, or nothing to prune
        return {}
    torch.set_flush_denormal(cfg.flush_denormal)
    adapter = get_adapter(spec.family, spec.options)
    pipe = adapter.load(cfg.model)
    calib = prepare_calibration(adapter, pipe, cfg.calibration, cfg.schedule)
    adapter.offload_text_encoders(pipe)
    checkpoints = PackageCheckpoints(run_dir / "checkpoints", digest)  # read only: rank 0 writes them
    allocation = allocate(adapter, pipe, calib, spec)  # every rank: the whole set, the same split
    strategy = _strategy(spec, spec.pattern(), allocation)
    prune_groupwise(
        adapter, pipe, calib, strategy, spec.num_packages, None, checkpoints, None, spec.package_bytes
    )
    return {}


def _claim(cfg: DictConfig, run_dir: Path, digest: str) -> bool:
    """Take ``run_dir`` for this run; ``True`` if it already holds this run, done.

    A directory used by another config is refused while ``resume`` is true; ``resume=false``
    deletes the earlier outputs first, and so does ``skip_done=false`` for a finished run.
    """
    status = read_status(run_dir)
    redo = status is not None and status["state"] == "done" and not cfg.skip_done
    if not cfg.resume or redo:
        if redo:
            log.info("%s holds this run, done; skip_done=false: redoing it from scratch", run_dir)
        for name in OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return False
    if status is None:
        leftovers = [name for name in OUTPUTS if (run_dir / name).exists()]
        if leftovers:
            raise ConfigError(
                f"{run_dir} holds outputs of a run with no status.json ({', '.join(leftovers)}): use a new "
                "hydra.run.dir, or resume=false to delete them and start clean"
            )
        return False
    if status["config_hash"] != digest:
        raise ConfigError(
            f"{run_dir} holds a {status['state']} run of another config ({status['config_hash']}; this "
            f"one is {digest}): use a new hydra.run.dir, or resume=false to delete it and start clean"
        )
    if status["state"] == "done":
        return (run_dir / "metrics.json").is_file()
    log.info("%s holds an unfinished run of this config (%s): resuming", run_dir, status["state"])
    return False


def _run(cfg: DictConfig, spec: RunSpec, run_dir: Path, checkpoints: PackageCheckpoints) -> dict:
    torch.set_flush_denormal(cfg.flush_denormal)
    adapter = get_adapter(spec.family, spec.options)
    metrics: dict = {f"versions/{k}": v for k, v in library_versions().items()}
    with tracking(cfg, run_dir) as tracker:
        planned = cfg.artifact is None and adapter.plans_before_load  # 0'. the plan, before weights load
        if planned:
            metrics |= _plan(cfg, spec, adapter, run_dir, tracker)
        pipe = adapter.load(cfg.model)  # 1. load; encode every prompt once
        log.info("model %s loaded (%s)", cfg.model.name, type(adapter.denoiser(pipe)).__name__)
        if cfg.artifact is None and not planned:
            metrics |= _plan(cfg, spec, adapter, run_dir, tracker)
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
            records = _prune(cfg, spec, adapter, pipe, calib, run_dir, metrics, checkpoints)
        else:  # 3'. prune once, evaluate many
            records = _load_artifact(cfg, pipe, run_dir, metrics)
        metrics |= _cost_metrics(cost_dense, _cost(adapter, pipe, cfg), adapter.denoiser(pipe))
        _write_metrics(run_dir, metrics)
        if cfg.eval.kind != "none":  # 5. evaluate against the same prompts and seeds
            pruned = generate(adapter, pipe, evalset, cfg.eval, evalset.seeds, desc="pruned images")
            faults.reached("evaluate")
            metrics |= {f"eval/{k}": v for k, v in scorer.score(pruned, evalset.prompts, dense).items()}
            n = min(cfg.eval.num_grid, len(evalset.prompts))
            grid = run_dir / "samples.png"
            picture = image_grid({"dense": dense[:n], "pruned": pruned[:n]}, evalset.prompts[:n])
            atomic_write(grid, lambda tmp: picture.save(tmp, format="PNG"))
            tracker.log_image("samples", grid, caption="dense (top) vs pruned (bottom)")
            log.info("evaluated: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                              if k.startswith("eval/") and isinstance(v, float)))  # fmt: skip
        _write_metrics(run_dir, metrics)  # 6. log
        faults.reached("log")
        tracker.log_metrics(metrics)
        tracker.log_table("layers", LAYER_COLUMNS, records)
        if cfg.save_model and cfg.artifact is None:  # the card gets the evaluated numbers first:
            write_model_card(run_dir / "pruned", metrics)  # W&B logs the files in place
            tracker.log_artifact(run_dir / "pruned", read_manifest(run_dir / "pruned"))
    log.debug("metrics: %s", json.dumps(metrics, indent=1))
    return metrics


def _prune(
    cfg: DictConfig,
    spec: RunSpec,
    adapter: ModelAdapter,
    pipe: Any,
    calib: Any,
    run_dir: Path,
    metrics: dict,
    checkpoints: PackageCheckpoints,
) -> list:
    """Prune with the spec's strategy, record the metrics, save; return the layer rows."""
    denoiser, pattern = adapter.denoiser(pipe), spec.pattern()
    names = _target_names(adapter, denoiser, spec)
    numel_before = sum(denoiser.get_submodule(n).weight.numel() for n in names)
    allocation = allocate(adapter, pipe, calib, spec)  # sparsity.allocation: before package 1, dense
    if allocation is not None:
        write_text(run_dir / "allocation.json", json.dumps(allocation.to_dict(), indent=2))
        metrics |= {"prune/allocation": allocation.method, "prune/allocation_seconds": allocation.seconds}
    strategy = _strategy(spec, pattern, allocation)
    done: list[LayerRecord] = []

    def write_layers(rows: list[LayerRecord]) -> None:  # the whole file, every layer once
        done.extend(rows)
        _write_layers(run_dir / "layers.csv", done)

    start, extra = time.perf_counter(), {}
    cache = _hessian_cache(cfg, adapter)
    device = next(denoiser.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = prune_groupwise(adapter, pipe, calib, strategy, spec.num_packages, write_layers, checkpoints,
                              cache, spec.package_bytes)  # fmt: skip
    seconds = time.perf_counter() - start
    if device.type == "cuda":  # the plan's prediction is plan/peak_bytes
        metrics["prune/peak_bytes"] = torch.cuda.max_memory_allocated(device)
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
        "prune/num_packages": len({r.package for r in records}),
        "prune/sparsity_target": pattern.target_sparsity,
        "prune/sparsity_achieved": 1 - kept / numel_before,
        "prune/num_layers": len(records),
        "prune/seconds": seconds,
    }
    _write_metrics(run_dir, metrics)
    if cfg.save_model:
        saved = save_pruned(run_dir / "pruned", denoiser, cfg, extra={**extra, "metrics": dict(metrics)})
        log.info("pruned model saved to %s", saved)
        faults.reached("save")
    return [list(dataclasses.astuple(r)) for r in records]


def memory_plan(cfg: DictConfig, spec: RunSpec, adapter: ModelAdapter) -> tuple[MemoryPlan, list[int]]:
    """The prune's memory plan from the model config alone (a ``meta`` denoiser at the run dtype),
    and every unit's Hessian bytes (for :func:`obsdiff.plan.check_fits`'s advice)."""
    c, config = cfg.calibration, spec.denoiser_config
    denoiser = torch.nn.Module.to(adapter.empty_denoiser(config), torch_dtype(cfg.model.torch_dtype))
    strategy = _strategy(spec, spec.pattern())
    packages = make_packages(adapter, denoiser, strategy, spec.num_packages, spec.package_bytes)
    batch = c.batch_size * max(adapter.denoiser_calls(c.guidance_scale, config))
    latent_size = c.resolution // adapter.vae_scale_factor(cfg.model)
    inputs = adapter.example_inputs(denoiser, batch, latent_size, adapter.planned_text_tokens(cfg.model))
    device = resolve_device(cfg.model.device)
    plan = build_plan(denoiser, packages, strategy.input_groups, inputs, device=str(device), batch=batch,
                      resolution=c.resolution, capacity=device_capacity(device),
                      offloaded=cfg.model.get("offload", "none") == "group")  # fmt: skip
    return plan, [unit_bytes(denoiser, strategy.input_groups(u)) for package in packages for u in package]


def _plan(cfg: DictConfig, spec: RunSpec, adapter: ModelAdapter, run_dir: Path, tracker: Any) -> dict:
    """Write ``plan.json``, log the plan (console and W&B), refuse a plan that does not fit the
    device (:class:`obsdiff.plan.PlanError`: which knob to set, to what); return its metrics."""
    plan, sizes = memory_plan(cfg, spec, adapter)
    write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))
    log.info("memory plan (before weights load):\n%s", plan.table())
    columns = ["package", "layers", "hessians", "hessian_bytes", "solve_bytes", "peak_bytes"]
    rows = [[p.package, p.layers, p.hessians, p.hessian_bytes, p.solve_bytes, plan.package_peak(p)]
            for p in plan.packages]  # fmt: skip
    tracker.log_table("plan", columns, rows)
    check_fits(plan, sizes, cfg.calibration.batch_size)
    return plan.metrics()


def plan_only(cfg: DictConfig, run_dir: Path) -> dict:
    """``plan_only=true``: the memory plan printed and written to ``plan.json``; nothing else runs
    (the generic adapter loads the pipeline first: it probes it)."""
    spec = resolve(cfg)
    adapter = get_adapter(spec.family, spec.options)
    if not adapter.plans_before_load:
        adapter.load(cfg.model)
    plan, sizes = memory_plan(cfg, spec, adapter)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(run_dir) / "plan.json", json.dumps(plan.to_dict(), indent=2))
    print(plan.table())
    check_fits(plan, sizes, cfg.calibration.batch_size)
    return plan.metrics()


def _hessian_cache(cfg: DictConfig, adapter: ModelAdapter) -> HessianCache | None:
    """``pruner.hessian_cache``: keyed on the denoiser's files, the model config and the library
    versions (as the dense-image cache); the cache adds the calibration and the groups."""
    if cfg.pruner.hessian_cache is None:
        return None
    if distributed.world_size() > 1:  # a hit on rank 0 alone would leave the others calibrating
        log.warning("pruner.hessian_cache is not used in data-parallel runs: every package is calibrated")
        return None
    from obsdiff.provenance import config_hash, files_fingerprint

    files = files_fingerprint(adapter.weights_location(cfg.model))
    # the calibration is keyed by the cache; offloading moves weights, it changes no Hessian
    model = {k: v for k, v in cfg.model.items() if k not in ("sampler", "offload", "offload_stream")}
    key = config_hash(OmegaConf.create({"model": model, "versions": library_versions(), "files": files}))
    return HessianCache(cfg.pruner.hessian_cache, key)


def _strategy(
    spec: RunSpec, pattern: Any, allocation: Allocation | None = None
) -> LayerwiseStrategy | StructuredStrategy:
    if spec.structured:
        return StructuredStrategy(spec.mask, pattern, spec.blocks, spec.damp_frac, spec.update == "obs")
    solver = layer_solver(
        spec.mask,
        spec.update,
        spec.damp_frac,
        spec.block_size,
        spec.dsnot,
        spec.admm,
        refine=spec.refine,
        swaps=spec.swaps,
        order=spec.order,
        rose_threshold=spec.rose_threshold,
    )
    patterns = None if allocation is None else allocation.patterns(pattern)
    return LayerwiseStrategy(solver, pattern, spec.targets, spec.blocks, patterns)


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


def _write_layers(path: Path, rows: list[LayerRecord]) -> None:
    """Write ``layers.csv`` afresh (atomically): the header and one row per layer pruned so far."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(LAYER_COLUMNS)
    writer.writerows(dataclasses.astuple(r) for r in rows)
    write_text(path, text.getvalue())


def _write_metrics(run_dir: Path, metrics: dict) -> None:
    """Write ``metrics.json`` (atomically); a NaN or Inf metric stops the run first, naming it."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"metrics {', '.join(bad)} are NaN or Inf; metrics.json was not written")
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
