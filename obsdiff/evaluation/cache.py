"""Cache entries that concurrent runs can share: locked, atomic, and rebuilt when corrupt.

Two runs sharing ``$OBSDIFF_CACHE`` (a sweep's jobs) never compute the same entry at once: the
first takes the entry's file lock and builds it, the second waits and then reads it. Entries are
written atomically (:mod:`obsdiff.fileio`), so nobody reads half of one; a corrupt entry (a file
truncated by a full disk or a copy) is detected, discarded with a warning, and rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError

from obsdiff.fileio import file_lock

log = logging.getLogger(__name__)
T = TypeVar("T")
# What reading a damaged entry raises: safetensors' header/size checks, JSON, a missing key.
CORRUPT = (SafetensorError, ValueError, KeyError, OSError, EOFError)


def load_or_build(entry: str | Path, load: Callable[[], T | None], build: Callable[[], T], what: str) -> T:
    """The cached value of ``entry``, built once under its lock if absent or corrupt.

    Args:
        entry: The entry's path (a file or a folder); its lock is ``<entry>.lock`` beside it.
        load: Reads the entry; returns ``None`` if it does not exist (raises one of
            :data:`CORRUPT` if it is damaged).
        build: Computes the value and writes the entry (atomically); returns the value.
        what: Names the entry in log lines.
    """
    entry = Path(entry)
    with file_lock(entry.with_name(entry.name + ".lock")):
        try:
            value = load()
        except CORRUPT as err:
            log.warning("cache entry %s is corrupt (%s: %s); discarding and rebuilding it",
                        entry, type(err).__name__, err)  # fmt: skip
            _discard(entry)
            value = None
        if value is not None:
            log.info("%s: cache hit (%s)", what, entry)
            return value
        log.info("%s: cache miss, computing it (%s)", what, entry)
        return build()


def _discard(entry: Path) -> None:
    if entry.is_dir():
        for file in entry.iterdir():
            file.unlink(missing_ok=True)
    else:
        entry.unlink(missing_ok=True)
