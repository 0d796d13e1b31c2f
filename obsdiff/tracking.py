"""Experiment tracking: Weights & Biases (offline by default) or nothing.

One W&B run per run directory, grouped by sweep: ``group`` is ``logger.group`` or, in a multirun,
the sweep folder (its last two path parts, e.g. ``2026-11-27/10-00-00``), so every job of one
sweep sits in one group and two sweeps never share one; single runs have no group. ``job_type`` is
``prune``, or ``evaluate`` for ``artifact=…`` runs; the name is the group and the job folder.
The run id is kept in ``<run dir>/wandb/run_id``: a rerun in the same directory (a resumed or
requeued job) continues the same W&B run (``resume="allow"``); ``resume=false`` starts a new one.
The summary's ``state`` mirrors ``status.json``: ``running``, then ``done`` or ``failed``.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)
RUN_ID = Path("wandb") / "run_id"


class NullTracker:
    """Tracker that records nothing (``logger=none``)."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path, caption: str = "") -> None:
        pass

    def log_artifact(self, path: Path, manifest: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def sweep_group() -> str | None:
    """The running multirun's sweep folder as a group name (``None`` outside a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "/".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


def run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of ``run_dir``: the stored one (``resume``), else a new one, stored."""
    path = run_dir / RUN_ID
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
    path.write_text(new)
    return new


class WandbTracker(NullTracker):
    """W&B run whose files live under ``<run dir>/wandb``.

    Args:
        cfg: the resolved run config (logged as the run's config).
        run_dir: the Hydra run directory.
    """

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        import wandb

        self._wandb = wandb
        lcfg = cfg.logger
        group = OmegaConf.select(cfg, "logger.group", default=None) or sweep_group()
        name = lcfg.name or (f"{group}/{run_dir.name}" if group else "/".join(run_dir.parts[-2:]))
        tags = dict.fromkeys([*lcfg.tags, cfg.model.name, cfg.pruner.name, cfg.sparsity.kind])  # unique
        self.run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            group=group,
            job_type="evaluate" if cfg.artifact is not None else "prune",
            name=name,
            tags=list(tags),
            mode=lcfg.mode,
            dir=str(run_dir),
            id=run_id(run_dir, bool(cfg.resume)),
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )
        self.run.summary["state"] = "running"

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.log(numbers)
        self.run.summary.update(metrics)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path, caption: str = "") -> None:
        self.run.log({name: self._wandb.Image(str(path), caption=caption)})

    def log_artifact(self, path: Path, manifest: dict[str, Any]) -> None:
        """Log a saved pruned model (``pruned/``) as a ``model`` artifact, its manifest as metadata.

        The files are referenced in place (``policy="immutable"``: not copied to a staging area), so
        the folder must not change until the run is synced or uploaded.
        """
        artifact = self._wandb.Artifact(
            name=f"pruned-{self.run.id}",
            type="model",
            description=f"{manifest.get('method', 'pruned')} model saved by obsdiff (safetensors + manifest)",
            metadata=manifest,
        )
        artifact.add_dir(str(path), policy="immutable")
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.summary["state"] = "done" if exit_code == 0 else "failed"
        self.run.finish(exit_code=exit_code)


TRACKERS = {"wandb": WandbTracker, "none": lambda cfg, run_dir: NullTracker()}


@contextmanager
def tracking(cfg: Any, run_dir: Path) -> Iterator[NullTracker]:
    """Open the configured tracker; ``finish()`` always runs, with exit code 1 after an error."""
    if cfg.logger.kind not in TRACKERS:
        raise KeyError(f"unknown logger {cfg.logger.kind!r}; known loggers: {sorted(TRACKERS)}")
    tracker = TRACKERS[cfg.logger.kind](cfg, Path(run_dir))
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
