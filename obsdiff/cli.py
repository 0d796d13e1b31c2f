"""``obsdiff`` console script: a Hydra app around ``obsdiff.run.run``.

Nothing torch-based is imported before the composed config has passed the field checks, so
``obsdiff --help`` and a bad value answer in about a second; a bad config exits with status 2 and
one line naming the field.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from obsdiff.calibration.prompts import PromptSourceError
from obsdiff.compare import register_cells
from obsdiff.config import ConfigError, check_against_model, check_fields, register_configs

log = logging.getLogger("obsdiff")
# conf/ sits beside the package in the repository (editable install, see README).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERRORS = (ConfigError, PromptSourceError)


def _needs_compare_grid(argv: list[str]) -> bool:
    """Whether to register the method-comparison cells (``obsdiff.compare``): always, except for a
    plain ``--help``. Hydra's help deep-copies the whole ConfigStore once per config group it lists
    (about 90 times); the 29 cells doubled its time, and help needs them only when asked about them."""
    return not {"--help", "-h"} & set(argv) or any("compare" in arg for arg in argv)


register_configs()
if _needs_compare_grid(sys.argv[1:]):
    register_cells()


def _exit_with(err: BaseException) -> None:
    """Log the error as one line and exit with status 2 (a config or input problem, not a bug)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError quotes its text
    log.error("%s", str(message).replace("\n", " "))
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Prune, save, evaluate and log one configuration (``-m`` for sweeps)."""
    try:
        check_fields(cfg)  # no torch yet: a bad value exits here
    except USER_ERRORS as err:
        _exit_with(err)
    from obsdiff.models import ModelNotAvailableError

    try:  # the adapter reads the model's config: block range, layer widths, head counts
        check_against_model(cfg)
    except (*USER_ERRORS, ModelNotAvailableError, ValueError, KeyError) as err:
        _exit_with(err)
    from obsdiff.run import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (*USER_ERRORS, ModelNotAvailableError) as err:
        _exit_with(err)


if __name__ == "__main__":
    main()
