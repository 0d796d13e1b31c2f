"""Experiment tracking: Weights & Biases (offline by default) or nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class NullTracker:
    """Tracker that records nothing (``logger=none``)."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path, caption: str = "") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


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
        self.run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            name=lcfg.name or run_dir.name,
            tags=list(lcfg.tags),
            mode=lcfg.mode,
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.log(numbers)
        self.run.summary.update(metrics)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path, caption: str = "") -> None:
        self.run.log({name: self._wandb.Image(str(path), caption=caption)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


TRACKERS = {"wandb": WandbTracker, "none": lambda cfg, run_dir: NullTracker()}


@contextmanager
def tracking(cfg: Any, run_dir: Path) -> Iterator[NullTracker]:
    """Open the configured tracker; ``finish()`` always runs, with exit code 1 after an error."""
    if cfg.logger.kind not in TRACKERS:
        raise KeyError(f"unknown logger {cfg.logger.kind!r}; known loggers: {sorted(TRACKERS)}")
    tracker = TRACKERS[cfg.logger.kind](cfg, run_dir)
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
