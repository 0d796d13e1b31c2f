"""Model adapters, found by family name (one module per family, imported on first use)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from obsdiff.models.base import ModelAdapter, ModelConfigError, ModelNotAvailableError, Unit

# family -> "module:class"; a new family is one module and one line here.
ADAPTERS: dict[str, str] = {
    "sd3": "obsdiff.models.sd3:SD3Adapter",
    "flux": "obsdiff.models.flux:FluxAdapter",
    "pixart": "obsdiff.models.pixart:PixArtAdapter",
    "generic": "obsdiff.models.generic:GenericAdapter",
    "sdxl": "obsdiff.models.unet:SDXLAdapter",
    "sd21": "obsdiff.models.unet:SD21Adapter",
}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family``; raises with the known families otherwise."""
    if family not in ADAPTERS:
        raise ModelConfigError(f"model.family={family!r} is unknown; known families: {sorted(ADAPTERS)}")
    module, _, name = ADAPTERS[family].partition(":")
    return getattr(importlib.import_module(module), name)


def get_adapter(family: str, options: Mapping[str, Any] | None = None) -> ModelAdapter:
    """An adapter for ``family`` with its ``model.options`` checked."""
    return adapter_class(family)(options)


__all__ = ["ADAPTERS", "ModelAdapter", "ModelConfigError", "ModelNotAvailableError", "Unit", "get_adapter"]
