"""``obsdiff`` console script: a Hydra app around ``obsdiff.run.run``.

Nothing torch-based is imported before the composed config has passed the field checks, so
``obsdiff --help`` and a bad value answer in about a second; a bad config exits with status 2 and
one line naming the field. The run's folder is logged when it starts and ends, and a failure's
traceback goes into its log file (``<run dir>/cli.log``) as well as onto the console.

In a multirun (``-m``) a job never ends the sweep: a job that fails is recorded (``failed`` in its
``status.json``, the error in its log) and the next one starts; a job already done with the same
config is skipped (``skip_done``). See ``obsdiff.sweeper`` for the job folders and the checks
before launch.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from obsdiff.calibration.prompts import PromptSourceError
from obsdiff.compare import register_cells
from obsdiff.config import ConfigError, check_against_model, check_fields, register_configs
from obsdiff.models import ModelNotAvailableError
from obsdiff.provenance import run_hash
from obsdiff.runstate import read_status, write_status
from obsdiff.sweeper import finished, objective, register_resolvers, stored_metrics

log = logging.getLogger("obsdiff")
# The config tree: an installed wheel ships the repository's conf/ as obsdiff/conf (pyproject's
# package-dir); a checkout (editable install) has it beside the package.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _PACKAGED_CONF.parents[1] / "conf")
USER_ERRORS = (ConfigError, PromptSourceError, ModelNotAvailableError)
# What the checks before a run raise for a config the model cannot take (block range, widths, ...).
CHECK_ERRORS = (*USER_ERRORS, ValueError, KeyError)
# What the other ranks of a torchrun job add to their command line: no .hydra/, no log file, warnings only.
FOLLOWER_OVERRIDES = [
    "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING",
]  # fmt: skip
# Lines every run printed that say nothing about the run: (logger, text in the message).
KNOWN_NOISE = [
    # CLIP/Siglip image processors of the pipelines' components; obsdiff never uses them on images.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back"),
    # without accelerate, diffusers loads weights the plain way (low_cpu_mem_usage=False).
    ("diffusers.pipelines.pipeline_utils", "because `accelerate` was not found"),
    ("diffusers.models.modeling_utils", "because `accelerate` was not found"),
]


def _needs_compare_grid(argv: list[str]) -> bool:
    """Whether to register the method-comparison cells (``obsdiff.compare``): always, except for a
    plain ``--help``. Hydra's help deep-copies the whole ConfigStore once per config group it lists
    (about 90 times); the 29 cells doubled its time, and help needs them only when asked about them."""
    return not {"--help", "-h"} & set(argv) or any("compare" in arg for arg in argv)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Drop exactly the :data:`KNOWN_NOISE` messages (every other warning of those loggers stays)."""
    for name, text in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


register_configs()
register_resolvers()
silence_known_noise()
if _needs_compare_grid(sys.argv[1:]):
    register_cells()


def _exit_with(err: BaseException) -> None:
    """Log the error as one line and exit with status 2 (a config or input problem, not a bug)."""
    log.error("%s", _one_line(err))
    sys.exit(2)


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError quotes its text
    return str(message).replace("\n", " ")


def _check(cfg: DictConfig) -> None:
    """Every check before weights load: the fields (no torch), then against the model's config."""
    check_fields(cfg)
    check_against_model(cfg)  # the adapter reads the model's config: block range, widths, heads


def _record_failure(run_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """``failed`` in ``status.json`` for an error raised before ``run()`` started (``run()`` records
    its own); a folder holding another config's run, or a finished one, is left as it is."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 records it (obsdiff.distributed)
        return
    try:
        digest = run_hash(cfg)
    except Exception:  # a config that does not even resolve
        digest = "unresolved"
    status = read_status(run_dir)
    if status is None or (status["config_hash"] == digest and status["state"] != "done"):
        error = f"{type(err).__name__}: {_one_line(err)}"
        write_status(run_dir, "failed", digest, error=error, traceback=traceback.format_exc())


def _traceback_to_log_file(message: str) -> None:
    """Write the current exception's traceback into the run's log file; Hydra prints it on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _single_run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run: a user error exits with status 2, anything else raises (Hydra prints the traceback)."""
    try:
        _check(cfg)
    except CHECK_ERRORS as err:
        _record_failure(run_dir, cfg, err)
        _exit_with(err)
    from obsdiff import distributed
    from obsdiff.run import plan_only, run

    try:
        if cfg.plan_only:
            return plan_only(cfg, run_dir)
        with distributed.process_group(cfg.model.device):  # under torchrun: data-parallel calibration
            return run(cfg, Path(distributed.broadcast_object(str(run_dir))))  # rank 0's run dir
    except USER_ERRORS as err:
        _exit_with(err)
    except Exception:
        _traceback_to_log_file("run failed")
        raise


def _sweep_job(cfg: DictConfig, run_dir: Path) -> dict | None:
    """One job of a multirun; never raises, so the sweep goes on (``None``: the job failed)."""
    try:
        if finished(run_dir, cfg):
            log.info("skipped: %s holds a finished run of this config already (skip_done=true)", run_dir)
            return stored_metrics(run_dir)
        _check(cfg)
    except Exception as err:
        _record_failure(run_dir, cfg, err)
        log.error("job failed before it started: %s; the sweep goes on", _one_line(err))
        return None
    from obsdiff.run import plan_only, run

    try:
        return plan_only(cfg, run_dir) if cfg.plan_only else run(cfg, run_dir)
    except USER_ERRORS as err:
        log.error("job failed: %s; the sweep goes on", _one_line(err))
    except Exception:
        log.exception("job failed; the sweep goes on")
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Prune, save, evaluate and log one configuration (``-m`` for sweeps).

    Returns:
        ``metrics[optimized_metric]``, the objective of Hydra's sweepers (e.g. Optuna); ``None``
        when nothing is optimised or the run failed (see :func:`obsdiff.sweeper.objective`).
    """
    global _task_started
    _task_started = True
    silence_known_noise()  # again: a submitit job process may not have imported this module
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log.info("output dir %s", run_dir)
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            metrics = _sweep_job(cfg, run_dir)
        else:
            metrics = _single_run(cfg, run_dir)
    finally:
        log.info("output dir %s (%s)", run_dir, (read_status(run_dir) or {}).get("state", "no status"))
    return objective(metrics, cfg.optimized_metric)


# Whether Hydra got as far as the task function (see :func:`entry`).
_task_started = False


def entry() -> None:
    """The ``obsdiff`` console script: :func:`main`, with Hydra's own config errors as status 2.

    Hydra exits with status 1 both when it cannot compose the config (an unknown key or group
    option: a user error) and when the task raised (a bug). The first happens before the task
    function starts, so it is told apart here and given status 2, like every other config error.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and {"-m", "--multirun"} & set(sys.argv[1:]):
        print("obsdiff: -m sweeps are not data-parallel; launch one torchrun per job", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 writes into the run dir
        sys.argv += FOLLOWER_OVERRIDES
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    entry()
