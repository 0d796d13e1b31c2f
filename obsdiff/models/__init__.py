"""Model adapters, found by family name (one module per family)."""

from obsdiff.models.base import ModelAdapter, ModelNotAvailableError, StructuredUnit, Unit
from obsdiff.models.sd3 import SD3Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {"sd3": SD3Adapter}


def get_adapter(family: str) -> ModelAdapter:
    """Return an adapter for ``family``; raise with the known families otherwise."""
    try:
        return ADAPTERS[family]()
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; known families: {sorted(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "ModelAdapter", "ModelNotAvailableError", "StructuredUnit", "Unit", "get_adapter"]
