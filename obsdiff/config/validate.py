"""Field checks that need no model: every value, range and registered name of a composed config.

One function per config group; :func:`check_fields` runs them all. Registered names (schedules,
mask methods, feature nets, …) come from the registries themselves, which answer without importing
torch. Every failure raises :class:`ConfigError` naming the field, its value and what is allowed.
The checks that need the model's config (block range, layer widths, head counts) are in
``obsdiff.config.resolve``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, ListConfig

from obsdiff.calibration.prompts import PromptSourceError, check_prompt_source
from obsdiff.calibration.timesteps import SCHEDULES
from obsdiff.evaluation import FEATURE_NETS, PROMPT_JUDGES, REAL_IMAGES
from obsdiff.solvers import DSNOT_INITS, MASK_METHODS, STRUCTURED_METHODS, UPDATES

# torch dtype names of ``model.torch_dtype`` (``obsdiff.models.base.DTYPES``; a test keeps them equal).
TORCH_DTYPES = ("float32", "float16", "bfloat16")
SPARSITY_KINDS = ("unstructured", "nm", "structured")
EVAL_KINDS = ("tiny", "coco", "none")
LOGGER_KINDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
BLOCKS_ALLOWED = (
    'null, a non-empty list of distinct block indices >= 0, or "start:stop" (negative from the end)'
)


class ConfigError(ValueError):
    """A config field holds a value obsdiff cannot run with."""


def fail(fld: str, value: Any, allowed: str) -> NoReturn:
    """Raise ``ConfigError("<fld>=<value> is invalid; allowed: <allowed>")``."""
    raise ConfigError(f"{fld}={value!r} is invalid; allowed: {allowed}")


def _plain(value: Any) -> Any:
    """Lists as lists in messages (not ``ListConfig``)."""
    return list(value) if isinstance(value, ListConfig | list | tuple) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(fld: str, value: Any, low: int) -> None:
    if not _is_int(value) or value < low:
        fail(fld, value, f"an integer >= {low}")


def _fraction(fld: str, value: Any) -> None:
    if not (_finite(value) and 0 <= value < 1):
        fail(fld, value, "a fraction in [0, 1)")


def _one_of(fld: str, value: Any, names: Iterable[str], suffix: str = "", nullable: bool = False) -> None:
    names = list(names)
    if value not in names:
        fail(fld, value, ("null, " if nullable else "") + ", ".join(names) + suffix)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def _range_bounds(blocks: str) -> tuple[int, int]:
    """``"3:25"`` → ``(3, 25)``; negative bounds count from the end."""
    start, _, stop = (x.strip() for x in blocks.partition(":"))
    if not all(x.lstrip("-").isdigit() for x in (start, stop)):
        fail("pruner.blocks", blocks, BLOCKS_ALLOWED)
    return int(start), int(stop)


def parse_blocks(blocks: Any, num_layers: int | None = None) -> list[int] | None:
    """``null`` → all blocks; ``[0, 3]`` → those; ``"3:25"`` → ``range(3, 25)``; ``"1:-1"`` →
    ``range(1, num_layers - 1)``."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        start, stop = _range_bounds(blocks)
        if num_layers is None and min(start, stop) < 0:
            fail("pruner.blocks", blocks, "non-negative bounds when the model's block count is unknown")
        return list(range(num_layers or 0)[start:stop])
    if isinstance(blocks, int):
        return [blocks]
    return [int(b) for b in blocks]


def check_blocks(blocks: Any) -> None:
    """``pruner.blocks``: its form, and an explicit list's indices (the range needs the model)."""
    if blocks is None:
        return
    if isinstance(blocks, str):
        _range_bounds(blocks)
        return
    items = [blocks] if _is_int(blocks) else blocks
    if not isinstance(items, ListConfig | list) or not items:
        fail("pruner.blocks", _plain(blocks), BLOCKS_ALLOWED)
    if not all(_is_int(b) and b >= 0 for b in items):
        fail("pruner.blocks", _plain(blocks), BLOCKS_ALLOWED)
    indices = list(items)
    duplicates = sorted({b for b in indices if indices.count(b) > 1})
    if duplicates:
        fail("pruner.blocks", _plain(blocks), f"distinct block indices (repeated: {duplicates})")


def check_sparsity(cfg: DictConfig) -> None:
    """``sparsity``: the ratios, N:M, and ``pruner.block_size`` as a multiple of M."""
    sp = cfg.sparsity
    _one_of("sparsity.kind", sp.kind, SPARSITY_KINDS)
    if sp.kind == "unstructured":
        _fraction("sparsity.ratio", sp.ratio)
    elif sp.kind == "nm":
        if sp.n <= 0 or sp.m <= 0 or sp.n >= sp.m:
            fail("sparsity.n/sparsity.m", f"{sp.n}:{sp.m}", "positive integers with N < M (e.g. 2:4, 4:8)")
        if cfg.pruner.block_size % sp.m:
            fail("pruner.block_size", cfg.pruner.block_size, f"a multiple of sparsity.m={sp.m}")
    else:
        for key in ("ratio", "head_ratio", "ffn_ratio"):
            if sp[key] is not None:
                _fraction(f"sparsity.{key}", sp[key])


def check_schedule(sch: DictConfig) -> None:
    """``schedule``: a registered weighting and finite ``0 < alpha_min <= alpha_max``."""
    _one_of("schedule.name", sch.name, SCHEDULES.names())
    if not (_finite(sch.alpha_min) and _finite(sch.alpha_max) and 0 < sch.alpha_min <= sch.alpha_max):
        fail(
            "schedule.alpha_min/alpha_max",
            f"{sch.alpha_min}/{sch.alpha_max}",
            "finite numbers with 0 < alpha_min <= alpha_max",
        )


def check_pruner(cfg: DictConfig) -> None:
    """``pruner``: mask and update names, numbers, blocks, targets and the compensate ablation."""
    pr, kind = cfg.pruner, cfg.sparsity.kind
    methods = STRUCTURED_METHODS if kind == "structured" else MASK_METHODS
    _one_of("pruner.mask", pr.mask, methods, f" (for sparsity={kind})")
    _one_of("pruner.update", pr["update"], UPDATES)  # pr.update is DictConfig.update, the method
    _int_at_least("pruner.num_packages", pr.num_packages, 1)
    if not (_finite(pr.damp_frac) and pr.damp_frac > 0):
        fail("pruner.damp_frac", pr.damp_frac, "a finite number > 0 (0.01 in the paper)")
    _int_at_least("pruner.block_size", pr.block_size, 1)
    if not pr.compensate and kind != "structured":
        fail(
            "pruner.compensate", pr.compensate, "true (false is the structured ablation, sparsity=structured)"
        )
    check_blocks(pr.blocks)
    if pr.targets is not None:
        targets = list(pr.targets)
        if not targets or len(set(targets)) < len(targets):
            fail("pruner.targets", targets, "null (the family's default targets) or distinct target layers")
    check_dsnot(pr.dsnot)


def check_dsnot(ds: DictConfig) -> None:
    """``pruner.dsnot``: the start mask, a cycle count >= 0 and finite thresholds and powers."""
    _one_of("pruner.dsnot.init", ds.init, DSNOT_INITS)
    _int_at_least("pruner.dsnot.max_cycles", ds.max_cycles, 0)
    if not (_finite(ds.update_threshold) and ds.update_threshold >= 0):
        fail("pruner.dsnot.update_threshold", ds.update_threshold, "a finite number >= 0")
    for key in ("pow_of_var_regrowing", "pow_of_var_pruning"):
        if not _finite(ds[key]):
            fail(f"pruner.dsnot.{key}", ds[key], "a finite number")


def check_prompts(cfg: DictConfig, group: str) -> None:
    """``calibration`` / ``eval``: sampler numbers, and the prompt source (read if local, no download)."""
    c = cfg[group]
    if group == "eval" and c.kind == "none":
        return
    for key in ("num_steps", "batch_size", "resolution"):
        _int_at_least(f"{group}.{key}", c[key], 1)
    if not (_finite(c.guidance_scale) and c.guidance_scale >= 0):
        fail(f"{group}.guidance_scale", c.guidance_scale, "a finite number >= 0 (> 1 turns on CFG)")
    if group == "eval":
        _int_at_least("eval.skip_prompts", c.skip_prompts, 0)
        _int_at_least("eval.num_grid", c.num_grid, 1)
    num = c.num_prompts + c.get("skip_prompts", 0)
    try:
        check_prompt_source(c.source, num, c.path, c.column, c.dataset, c.split, group=group)
    except PromptSourceError as err:
        raise ConfigError(str(err)) from err


def check_eval(ecfg: DictConfig) -> None:
    """``eval``: its kind, reference images, prompt judge and FID feature net."""
    _one_of("eval.kind", ecfg.kind, EVAL_KINDS)
    if ecfg.kind == "none":
        return
    if ecfg.reference_dir is not None and not Path(ecfg.reference_dir).is_dir():
        fail("eval.reference_dir", ecfg.reference_dir, "an existing folder of reference images")
    if ecfg.real_images is not None:
        _one_of("eval.real_images", ecfg.real_images, REAL_IMAGES.names(), nullable=True)
    if ecfg.reference_dir is None and ecfg.real_images is None and ecfg.reference_seed is None:
        fail("eval.reference_seed", None, "a seed when eval has no real images (reference_dir, real_images)")
    if ecfg.prompt_judge is not None:
        _one_of("eval.prompt_judge", ecfg.prompt_judge, PROMPT_JUDGES.names(), nullable=True)
        if ecfg.source != "digits":
            fail("eval.prompt_judge", ecfg.prompt_judge, "null unless eval.source=digits")
    _one_of("eval.feature_net", ecfg.feature_net, FEATURE_NETS.names())
    if ecfg.feature_net == "inception_v3" and not _installed("torch_fidelity"):
        fail("eval.feature_net", ecfg.feature_net, 'efficientnet_lite0; or pip install "obsdiff[coco]"')


def check_run(cfg: DictConfig) -> None:
    """Top-level fields, ``model.torch_dtype`` and ``logger``."""
    if cfg.artifact is not None and not (Path(cfg.artifact) / "manifest.json").is_file():
        fail("artifact", cfg.artifact, "a run's pruned/ folder (with manifest.json)")
    _one_of("model.torch_dtype", cfg.model.torch_dtype, TORCH_DTYPES)
    _one_of("logger.kind", cfg.logger.kind, LOGGER_KINDS)
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)


def check_fields(cfg: DictConfig) -> None:
    """Check every field that needs no model (no torch import); raise ``ConfigError`` on the first bad one."""
    check_sparsity(cfg)
    check_schedule(cfg.schedule)
    check_pruner(cfg)
    check_run(cfg)
    check_prompts(cfg, "calibration")
    check_prompts(cfg, "eval")
    check_eval(cfg.eval)
