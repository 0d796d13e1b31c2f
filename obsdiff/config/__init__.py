"""The run config: its typed schema, the checks that run before any model loads, and helpers.

``obsdiff.config`` is a leaf: importing it (and running :func:`check_fields`) imports no torch, so
the CLI refuses a bad value in well under a second. :func:`validate` adds the model-dependent
checks (``obsdiff.config.resolve``), which read the model's config through its adapter.

- ``schema``: the dataclasses Hydra type-checks every YAML against (``register_configs``); the
  calibration and eval sampler fields default to the model's (``model.sampler``);
- ``validate``: one check per group, :class:`ConfigError` naming the field, value and what is allowed;
- ``resolve``: the checks against the model (blocks, widths, heads, resolutions), resolved once into
  the typed :class:`RunSpec`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from obsdiff.config.fields import ConfigError
from obsdiff.config.resolve import RunSpec, check_against_model, effective_update, resolve
from obsdiff.config.schema import RunConfig, register_schema
from obsdiff.config.validate import check_fields, parse_blocks


def register_configs() -> None:
    """Register the schema so YAML files are type-checked when Hydra composes them."""
    register_schema()


def validate(cfg: DictConfig) -> dict[str, int]:
    """Check every field (no torch), then the fields that depend on the model.

    Returns:
        ``target -> in_features`` for the configured targets (from the model config).
    """
    check_fields(cfg)
    return check_against_model(cfg)


__all__ = [
    "ConfigError",
    "RunConfig",
    "RunSpec",
    "check_against_model",
    "check_fields",
    "effective_update",
    "parse_blocks",
    "resolve",
    "register_configs",
    "validate",
]
