"""Prompt sources for calibration (and evaluation): packaged sets, local files, HF datasets.

Every source is a ``PromptSource`` in ``PROMPT_SOURCES``, found by name. ``load_prompts`` returns the
first ``num_prompts`` prompts in source order, so a prompt set is fixed by (source, path, N).
``check_prompt_source`` runs the same checks cheaply (no model, no download) before anything heavy.
Errors are ``PromptSourceError`` and name the config field to fix (``calibration.path`` ...).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from obsdiff.registry import Registry

TINY_PROMPTS_FILE = "tiny_prompts.txt"
DEFAULT_COLUMNS = ("Prompt", "caption", "text")
JSON_KEYS = ("caption", "prompt")
FILE_SUFFIXES = (".txt", ".tsv", ".csv", ".json")
# Captions per split of the ``digits`` source (``obsdiff.models.digits_data.digits_captions``), so
# that checking a config does not build them (torch); tests keep the two equal.
DIGITS_PROMPTS = {"train": 1000, "heldout": 500}


class PromptSourceError(ValueError):
    """A prompt source is misconfigured or cannot provide the prompts asked for."""


@dataclass(frozen=True)
class PromptQuery:
    """Where to read prompts from; mirrors the ``calibration`` (or ``eval``) config group.

    Args:
        num_prompts: How many prompts the caller needs (sources may read only that many).
        path: File to read (``file`` source).
        column: Column (TSV/CSV/HF) or object key (JSON) holding the prompt; ``None`` picks a default.
        dataset: Hugging Face dataset name (``hf`` source).
        split: Hugging Face dataset split (``hf``); ``train`` or ``heldout`` (``digits``).
        group: Config group named in error messages.
    """

    num_prompts: int
    path: str | None = None
    column: str | None = None
    dataset: str | None = None
    split: str = "train"
    group: str = "calibration"


PromptLoader = Callable[[PromptQuery], list[str]]


@dataclass(frozen=True)
class PromptSource:
    """A named prompt source.

    Args:
        load: Returns the prompts of the source in order (at least the first ``num_prompts``).
        check: Cheap validation before any model loads (no download); ``None`` means the source is
            cheap to read, so checking it is loading it.
    """

    load: PromptLoader
    check: Callable[[PromptQuery], Any] | None = None


def tiny_prompts() -> list[str]:
    """Return every prompt of the packaged tiny prompt set, in file order."""
    text = resources.files(__package__).joinpath(TINY_PROMPTS_FILE).read_text(encoding="utf-8")
    return _non_blank(text.splitlines())


def _non_blank(prompts: list[Any]) -> list[str]:
    """Strip prompts and drop empty ones, keeping order."""
    return [str(p).strip() for p in prompts if p is not None and str(p).strip()]


def _pick_column(available: list[str], query: PromptQuery, where: str) -> str:
    """Return ``query.column`` if available, else the first default column present; raise otherwise."""
    wanted = [query.column] if query.column is not None else list(DEFAULT_COLUMNS)
    for name in wanted:
        if name in available:
            return name
    raise PromptSourceError(
        f"{query.group}.column: none of {wanted} is a column of {where}; available columns: {available}"
    )


def _read_table(path: Path, query: PromptQuery) -> list[str]:
    """Read one column of a TSV (no quoting) or CSV file with a header row."""
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".tsv":
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(handle)
        name = _pick_column(list(reader.fieldnames or []), query, str(path))
        return _non_blank([row[name] for row in reader])


def _json_prompts(data: Any, query: PromptQuery, path: Path) -> list[str]:
    """Extract prompts from COCO captions, a list of objects, or a list of strings."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        return _non_blank(data)
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        keys = [query.column] if query.column is not None else list(JSON_KEYS)
        found = [key for key in keys if key in data[0]]
        if not found:
            raise PromptSourceError(
                f"{query.group}.column: none of {keys} is a key of the objects in {path}; "
                f"keys: {sorted(data[0])}"
            )
        return _non_blank([item.get(found[0]) for item in data])
    raise PromptSourceError(
        f"{query.group}.path={str(path)!r}: unsupported JSON layout; expected COCO captions "
        "{'annotations': [{'caption': ...}]}, a list of objects with a 'caption' or 'prompt' key, "
        "or a list of strings"
    )


def _resolve_path(query: PromptQuery) -> Path:
    """Check that ``<group>.path`` names an existing file with a supported suffix."""
    if query.path is None:
        raise PromptSourceError(f"{query.group}.path is required for {query.group}.source='file'")
    path = Path(query.path).expanduser()
    if not path.is_file():
        raise PromptSourceError(f"{query.group}.path={query.path!r}: no such file ({path.resolve()})")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise PromptSourceError(
            f"{query.group}.path={query.path!r}: unsupported suffix; known suffixes: {list(FILE_SUFFIXES)}"
        )
    return path


def _load_tiny(query: PromptQuery) -> list[str]:
    """Loader for the packaged tiny prompt set."""
    return tiny_prompts()


def _load_digits(query: PromptQuery) -> list[str]:
    """Loader for captions of the tiny digits model: ``split`` = ``train`` (calibration) or ``heldout``.

    Both splits interleave the digits (0, 1, …, 9, 0, …) so that any prefix covers every digit;
    ``heldout`` gives the captions of the held-out real images that ``eval=tiny`` compares with.
    """
    from obsdiff.models.digits_data import digits_captions

    _check_digits(query)
    return [caption.text for caption in digits_captions(query.split)]


def _check_digits(query: PromptQuery) -> None:
    """Check the split and the count of the digits captions without building them (no torch)."""
    if query.split not in DIGITS_PROMPTS:
        raise PromptSourceError(
            f"{query.group}.split={query.split!r} is invalid for source 'digits'; allowed: train, heldout"
        )
    available = DIGITS_PROMPTS[query.split]
    if query.num_prompts > available:
        raise PromptSourceError(
            f"{query.group}.num_prompts={query.num_prompts}, but source 'digits' "
            f"(packaged digits prompts, split {query.split!r}) has only {available} prompts"
        )


def _load_file(query: PromptQuery) -> list[str]:
    """Loader for a local ``.txt``, ``.tsv``, ``.csv`` or ``.json`` file (chosen by suffix)."""
    path = _resolve_path(query)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _non_blank(path.read_text(encoding="utf-8").splitlines())
    if suffix == ".json":
        return _json_prompts(json.loads(path.read_text(encoding="utf-8")), query, path)
    return _read_table(path, query)


def _import_datasets(query: PromptQuery) -> Any:
    """Import Hugging Face ``datasets`` lazily, with an install hint when it is missing."""
    try:
        import datasets
    except ImportError as err:
        raise PromptSourceError(
            f"{query.group}.source='hf' needs the `datasets` package: `pip install datasets`, "
            f"or use {query.group}.source='file' with a local prompt file"
        ) from err
    return datasets


def _check_hf(query: PromptQuery) -> Any:
    """Check that a dataset is named and ``datasets`` is installed (no download); return the module."""
    if not query.dataset:
        raise PromptSourceError(f"{query.group}.dataset is required for {query.group}.source='hf'")
    return _import_datasets(query)


def _load_hf(query: PromptQuery) -> list[str]:
    """Loader for the first ``num_prompts`` rows of a Hugging Face dataset split."""
    datasets = _check_hf(query)
    try:
        rows = datasets.load_dataset(query.dataset, split=f"{query.split}[:{query.num_prompts}]")
    except Exception as err:  # network, unknown dataset or split: re-raise naming the fields to fix
        raise PromptSourceError(
            f"could not load {query.group}.dataset={query.dataset!r}, {query.group}.split={query.split!r} "
            f"({type(err).__name__}: {err}). Offline? Download it into the HF cache first, "
            f"or use {query.group}.source='file'"
        ) from err
    name = _pick_column(list(rows.column_names), query, f"dataset {query.dataset!r}")
    return _non_blank(rows[name])


PROMPT_SOURCES: Registry[PromptSource] = Registry(
    "prompt source",
    {
        "tiny": PromptSource(_load_tiny),
        "digits": PromptSource(_load_digits, check=_check_digits),
        "file": PromptSource(_load_file),
        "coco": "obsdiff.evaluation.coco:COCO_SOURCE",  # the locked eval=coco caption rule
        "hf": PromptSource(_load_hf, check=_check_hf),
    },
)


def get_prompt_source(source: str, group: str = "calibration") -> PromptSource:
    """Look up a prompt source by name.

    Args:
        source: Name of the source (``<group>.source``).
        group: Config group named in the error message.

    Returns:
        The source, whose ``load`` maps a ``PromptQuery`` to its prompts.
    """
    if source not in PROMPT_SOURCES:
        raise PromptSourceError(f"unknown {group}.source={source!r}; known sources: {sorted(PROMPT_SOURCES)}")
    return PROMPT_SOURCES[source]


def _take_first(prompts: list[str], query: PromptQuery, source: str) -> list[str]:
    """Return the first ``num_prompts`` prompts, or raise saying how many the source has."""
    if len(prompts) < query.num_prompts:
        where = query.path or query.dataset or f"packaged {source} prompts"
        raise PromptSourceError(
            f"{query.group}.num_prompts={query.num_prompts}, but source {source!r} ({where}) "
            f"has only {len(prompts)} prompts"
        )
    return prompts[: query.num_prompts]


def _query(source: str, query: PromptQuery) -> PromptSource:
    """Validate the prompt count and return the named source."""
    if query.num_prompts < 1:
        raise PromptSourceError(f"{query.group}.num_prompts must be >= 1, got {query.num_prompts}")
    return get_prompt_source(source, query.group)


def load_prompts(
    source: str,
    num_prompts: int,
    path: str | None = None,
    column: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    group: str = "calibration",
) -> list[str]:
    """Load the first ``num_prompts`` prompts of a source, in source order.

    Args:
        source: Name in ``PROMPT_SOURCES`` (``tiny``, ``file``, ``coco``, ``hf``).
        num_prompts: Number of prompts to return (>= 1, at most the size of the source).
        path: Prompt file for the ``file`` source.
        column: Column or JSON key with the prompts; defaults to ``Prompt``, ``caption``, ``text``
            (JSON: ``caption``, ``prompt``).
        dataset: Hugging Face dataset name for the ``hf`` source.
        split: Hugging Face split (``hf``); ``train`` or ``heldout`` (``digits``).
        group: Config group named in error messages (``calibration`` or ``eval``).

    Returns:
        Exactly ``num_prompts`` non-empty, stripped prompts.
    """
    query = PromptQuery(num_prompts, path, column, dataset, split, group)
    return _take_first(_query(source, query).load(query), query, source)


def check_prompt_source(
    source: str,
    num_prompts: int,
    path: str | None = None,
    column: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    group: str = "calibration",
) -> None:
    """Validate a prompt source before any model loads; raise ``PromptSourceError`` naming the field.

    Local sources are read in full (cheap), so the file, column and count are checked; sources with
    their own ``check`` are not read, as that may download or import torch (``hf``: dataset name and
    ``datasets`` install; ``digits``: split and count).

    Args:
        source: Name in ``PROMPT_SOURCES``.
        num_prompts: Number of prompts the run will load.
        path: Prompt file for the ``file`` source.
        column: Column or JSON key with the prompts.
        dataset: Hugging Face dataset name for the ``hf`` source.
        split: Hugging Face split (``hf``); ``train`` or ``heldout`` (``digits``).
        group: Config group named in error messages (``calibration`` or ``eval``).
    """
    query = PromptQuery(num_prompts, path, column, dataset, split, group)
    prompt_source = _query(source, query)
    if prompt_source.check is not None:
        prompt_source.check(query)
    else:
        _take_first(prompt_source.load(query), query, source)
