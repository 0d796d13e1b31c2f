"""The vocabulary of the field checks: one refusal format, and the value rules every group uses.

A leaf (stdlib and omegaconf). Every refusal raises :class:`ConfigError` naming the field, its value
and what is allowed; every float must be finite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, NoReturn

from omegaconf import ListConfig

NAMES = re.compile(r"[A-Za-z0-9._-]+")  # model.name and pruner.name name run folders and caches


class ConfigError(ValueError):
    """A config field holds a value obsdiff cannot run with."""


def fail(fld: str, value: Any, allowed: str) -> NoReturn:
    """Raise ``ConfigError("<fld>=<value> is invalid; allowed: <allowed>")``."""
    raise ConfigError(f"{fld}={value!r} is invalid; allowed: {allowed}")


def plain(value: Any) -> Any:
    """Lists as lists in messages (not ``ListConfig``)."""
    return list(value) if isinstance(value, ListConfig | list | tuple) else value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(fld: str, value: Any, low: int) -> None:
    if not is_int(value) or value < low:
        fail(fld, value, f"an integer >= {low}")


def number_at_least(fld: str, value: Any, low: float, hint: str = "") -> None:
    if not (finite(value) and value >= low):
        fail(fld, value, f"a finite number >= {low:g}{hint}")


def fraction(fld: str, value: Any) -> None:
    if not (finite(value) and 0 <= value < 1):
        fail(fld, value, "a fraction in [0, 1)")


def valid_name(fld: str, value: Any) -> None:
    if not (isinstance(value, str) and NAMES.fullmatch(value)):
        fail(fld, value, "a non-empty name of letters, digits, '.', '_' and '-' (it names run folders)")


def non_empty(fld: str, value: Any, allowed: str, nullable: bool = False) -> None:
    """A non-empty string (or null when ``nullable``)."""
    if not (value is None and nullable or isinstance(value, str) and value.strip()):
        fail(fld, value, ("null or " if nullable else "") + allowed)


def one_of(fld: str, value: Any, names: Iterable[str], suffix: str = "", nullable: bool = False) -> None:
    names = list(names)
    if value not in names:
        fail(fld, value, ("null, " if nullable else "") + ", ".join(names) + suffix)


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(fld: str, value: Any) -> int:
    """A size in bytes: an integer, or e.g. ``"20GB"``, ``"1.5GiB"``, ``"512MB"``; at least 1."""
    match = None if is_int(value) else re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if is_int(value):
        size = int(value)
    elif match is not None and match.group(2).upper() in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        size = 0
    if size < 1:
        fail(fld, value, "bytes as an integer >= 1, or a size such as '20GB', '1.5GiB', '512MB'")
    return size
