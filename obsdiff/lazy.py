"""Modules imported on first attribute access.

The model adapters answer config questions (block counts, target widths, head counts) from a
``config.json`` alone, and the CLI refuses a bad config before anything heavy loads: ``import
torch`` costs seconds. Adapters therefore name ``torch`` through :class:`LazyModule`; the real
import happens the first time a tensor is needed.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for module ``name``; imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
