"""Multirun plumbing: stable job folders, the whole grid checked before any job starts, skipping
finished jobs, the objective a sweeper optimises, and the summary table at the end of a sweep.

- **Job folders** (``hydra.sweep.subdir: ${obsdiff.job_dir:${hydra.job.override_dirname}}``): a
  job's folder is named after its overrides, not its job number, so the same override set lands in
  the same folder however the grid around it changes. Relaunching a sweep into the same
  ``hydra.sweep.dir`` finds every finished job where it left it.
- **Skipping**: a job whose folder holds a ``done`` run (``status.json``) of the same
  :func:`obsdiff.provenance.run_hash` is not run again (``skip_done=true``, the default).
- :class:`SweepCallback` (``hydra.callbacks`` in ``conf/config.yaml``) composes and checks every
  job of a basic-sweeper grid (fields, then against the model's config) before the first one
  starts, lists every bad one and exits with status 2; after the sweep it writes
  ``report.{csv,md,png}`` into the sweep folder.

A leaf as far as torch goes: hydra, omegaconf, the config checks and the adapters' config answers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from obsdiff.provenance import run_hash
from obsdiff.runstate import is_done, read_status

log = logging.getLogger("obsdiff")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
PLAIN = "A-Za-z0-9_.,=+@-"  # characters a job folder name keeps as they are
MAX_NAME = 120


def job_dirname(override_dirname: str) -> str:
    """The folder of one job inside the sweep folder, from its overrides (Hydra's ``override_dirname``).

    Overrides made only of plain characters and at most 120 long are the name as they are
    (``schedule=uniform,sparsity.ratio=0.5``). Others (a path, a list, many overrides) are
    shortened for reading, each key to its last part (``calibration.num_prompts=2`` →
    ``num_prompts=2``) and other characters to ``_``, and end in a hash of the full overrides, so
    two override sets never share a folder. No overrides: ``defaults``.
    """
    if not override_dirname:
        return "defaults"
    if len(override_dirname) <= MAX_NAME and re.fullmatch(f"[{PLAIN}]+", override_dirname):
        return override_dirname
    items = re.split(r",(?=[+~]?[A-Za-z_][\w.@/-]*=)", override_dirname)  # commas that start a key
    short = ",".join(re.sub(r"^([+~]?)(?:[\w@/-]+\.)+(?=[\w-]+=)", r"\1", item) for item in items)
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:10]
    return re.sub(f"[^{PLAIN}]+", "_", short)[: MAX_NAME - 11] + "-" + digest


def register_resolvers() -> None:
    """``${obsdiff.job_dir:...}`` (the sweep subdir of ``conf/config.yaml``)."""
    OmegaConf.register_new_resolver("obsdiff.job_dir", job_dirname, replace=True)


def task_config(job_cfg: DictConfig) -> DictConfig:
    """The config a job's task function sees: the composed one without its ``hydra`` node."""
    task = copy.deepcopy(job_cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def finished(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether ``run_dir`` holds a ``done`` run of this config and ``skip_done`` allows skipping it."""
    return bool(cfg.skip_done) and is_done(run_dir, run_hash(cfg)) and (run_dir / "metrics.json").is_file()


def objective(metrics: dict | None, name: str | None) -> float | None:
    """What the task function returns to Hydra's sweeper: ``metrics[optimized_metric]``.

    ``None`` when nothing is optimised, when the run failed (``metrics`` is ``None``), when the run
    has no such metric, or when it is NaN: Optuna records such a trial as failed and goes on (it
    refuses a NaN objective outright, which would end the whole study).
    """
    if name is None or metrics is None:
        return None
    value = metrics.get(name)
    if not isinstance(value, int | float) or math.isnan(value):
        known = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
        log.error("optimized_metric=%s is %r in this run; numeric metrics: %s", name, value, ", ".join(known))
        return None
    return float(value)


def stored_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def grid(config: DictConfig, config_loader: Any) -> list[list[str]]:
    """Every job of a basic-sweeper multirun, as the overrides the sweeper will launch it with."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_grid(config: DictConfig, config_loader: Any) -> tuple[list[str], list[Path]]:
    """Compose and check every job: its fields, then against its model's config (no torch, no weights).

    Returns:
        One line per bad job (its overrides and the error), and the folders of jobs that will be
        skipped as already done.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from obsdiff.calibration.prompts import PromptSourceError
    from obsdiff.config import ConfigError, check_against_model, check_fields
    from obsdiff.models import ModelNotAvailableError

    bad, done = [], []
    errors = (ConfigError, PromptSourceError, HydraException, OmegaConfBaseException, ValueError, KeyError)
    for num, overrides in enumerate(grid(config, config_loader)):
        try:
            job_cfg = config_loader.load_sweep_config(config, list(overrides))
            cfg = task_config(job_cfg)
            check_fields(cfg)
            try:  # block range, widths, resolutions: from the model's config file, no weights
                check_against_model(cfg)
            except ModelNotAvailableError:
                pass  # no config here (an uncached hub model): the job records it when it runs
        except errors as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            bad.append(f"{' '.join(overrides) or '(no overrides)'}: {message}")
            continue
        with open_dict(job_cfg.hydra.job):
            job_cfg.hydra.job.num = num  # as the launchers number them, for subdirs that use it
        try:
            run_dir = Path(job_cfg.hydra.sweep.dir) / str(job_cfg.hydra.sweep.subdir)
        except OmegaConfBaseException:  # a subdir from runtime values (e.g. ${hydra.job.id})
            continue
        if finished(run_dir, cfg):
            done.append(run_dir)
    return bad, done


class SweepCallback(Callback):
    """Before a multirun: every job composed and checked, all bad ones listed at once (exit 2).
    After it: the summary table, and the jobs that failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.info("sweep dir %s", Path(config.hydra.sweep.dir).resolve())
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return  # e.g. Optuna: trials are drawn as the study goes; each job checks its own config
        from hydra.core.global_hydra import GlobalHydra

        bad, done = check_grid(config, GlobalHydra.instance().config_loader())
        if bad:
            log.error("%d job(s) of this sweep have a bad config; nothing was launched:", len(bad))
            for line in bad:
                log.error("  %s", line.replace("\n", " "))
            sys.exit(2)
        if done:
            names = ", ".join(p.name for p in done)
            log.info("%d job(s) done already with this config, skipped (skip_done): %s", len(done), names)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from obsdiff.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [p.parent for p in sorted(sweep_dir.glob("*/status.json")) if _state(p.parent) == "failed"]
        for run_dir in failed:
            log.error("job failed: %s: %s", run_dir, (read_status(run_dir) or {}).get("error", "?"))
        try:
            rows, _ = write_report([sweep_dir], sweep_dir)
        except Exception:  # the sweep's results stay on disk; the report can be rerun by hand
            log.exception("could not write the sweep report; run obsdiff-report %s", sweep_dir)
            return
        if rows:
            log.info("sweep report: %s (%d runs)", sweep_dir / "report.md", len(rows))
        else:
            log.warning("no finished runs under %s: no report", sweep_dir)


def _state(run_dir: Path) -> str | None:
    record = read_status(run_dir)
    return record["state"] if record else None
