"""``obsdiff`` console script: a Hydra app around ``obsdiff.run.run``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from obsdiff.calibration.prompts import PromptSourceError
from obsdiff.config import ConfigError, register_configs
from obsdiff.models import ModelNotAvailableError

log = logging.getLogger("obsdiff")
# conf/ sits beside the package in the repository (editable install, see README).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERRORS = (ConfigError, PromptSourceError, ModelNotAvailableError)

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Prune, save, evaluate and log one configuration (``-m`` for sweeps)."""
    from obsdiff.run import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
