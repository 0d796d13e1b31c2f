"""Field checks that need no model: every value, range and registered name of a composed config.

One function per config group; :func:`check_fields` runs them all. Registered names (schedules,
mask methods, feature nets, …) come from the registries themselves, which answer without importing
torch. Every failure raises :class:`ConfigError` naming the field, its value and what is allowed;
every float must be finite. The checks that need the model's config (block range, layer widths,
head counts, the resolutions it takes) are in ``obsdiff.config.resolve``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from obsdiff.calibration.prompts import PROMPT_SOURCES, PromptSourceError, check_prompt_source
from obsdiff.calibration.timesteps import SCHEDULES
from obsdiff.config.fields import (
    ConfigError,
    fail,
    finite,
    fraction,
    int_at_least,
    is_int,
    non_empty,
    number_at_least,
    one_of,
    parse_bytes,
    plain,
    valid_name,
)
from obsdiff.evaluation import FEATURE_NETS, PROMPT_JUDGES, REAL_IMAGES
from obsdiff.evaluation.coco import protocol_error
from obsdiff.evaluation.metrics.base import METRICS
from obsdiff.solvers import DSNOT_INITS, MASK_METHODS, ORDERS, REFINES, STRUCTURED_METHODS, UPDATES

# torch dtype names of ``model.torch_dtype`` (``obsdiff.models.base.DTYPES``; a test keeps them equal).
TORCH_DTYPES = ("float32", "float16", "bfloat16")
SPARSITY_KINDS = ("unstructured", "nm", "structured")
# sparsity.allocation (obsdiff.allocation) and its granularity
ALLOCATIONS = ("uniform", "owl")
ALLOCATION_GRANULARITIES = ("block", "layer")
EVAL_KINDS = ("tiny", "coco", "none")
LOGGER_KINDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
# model.prompt_domain: what the weights were trained on (``random``: untrained test models).
PROMPT_DOMAINS = ("general", "digits", "random")
# Prompt sources, judges and real image sets made for the tiny digits model's captions and images.
DIGITS_ONLY = {
    "source": ("digits",),
    "prompt_judge": ("digits_classifier",),
    "real_images": ("digits_heldout",),
}
DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
OFFLOADS = ("none", "group")
METRIC_GROUPS = ("prune", "model", "dense", "eval")  # the prefixes of run()'s metric names
BLOCKS_ALLOWED = (
    'null, a non-empty list of distinct block indices >= 0, or "start:stop" (negative from the end)'
)


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
    items = [blocks] if is_int(blocks) else blocks
    if not isinstance(items, ListConfig | list) or not items:
        fail("pruner.blocks", plain(blocks), BLOCKS_ALLOWED)
    if not all(is_int(b) and b >= 0 for b in items):
        fail("pruner.blocks", plain(blocks), BLOCKS_ALLOWED)
    indices = list(items)
    duplicates = sorted({b for b in indices if indices.count(b) > 1})
    if duplicates:
        fail("pruner.blocks", plain(blocks), f"distinct block indices (repeated: {duplicates})")


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys holding ``???``, found without resolving interpolations (one to a ``???`` would raise)."""
    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            found += _missing_keys(node[key], f"{prefix}{key}.")
    return found


def check_missing(cfg: DictConfig) -> None:
    """No ``???`` left: a model yaml without ``sampler`` or ``prompt_domain`` is named here."""
    missing = _missing_keys(cfg)
    if missing:
        where = " (every conf/model/*.yaml declares it)" if missing[0].startswith("model.") else ""
        fail(missing[0], "???", f"a value{where}")


def check_model(model: DictConfig) -> None:
    """``model``: names, dtype, device, prompt domain and the sampler defaults (options: the adapter)."""
    valid_name("model.name", model.name)
    non_empty("model.path", model.path, "a hub id, a local diffusers folder or an embedded model's name")
    one_of("model.torch_dtype", model.torch_dtype, TORCH_DTYPES)
    if not (isinstance(model.device, str) and DEVICES.fullmatch(model.device)):
        fail("model.device", model.device, "auto, cpu, mps, cuda or cuda:<index>")
    one_of("model.prompt_domain", model.prompt_domain, PROMPT_DOMAINS)
    check_offload(model)
    sampler = model.sampler
    int_at_least("model.sampler.resolution", sampler.resolution, 1)
    number_at_least("model.sampler.guidance_scale", sampler.guidance_scale, 0, " (> 1 turns on CFG)")
    for use in ("calibration", "eval"):
        for key in ("num_prompts", "num_steps", "batch_size"):
            int_at_least(f"model.sampler.{use}.{key}", sampler[use][key], 1)


def check_offload(model: DictConfig) -> None:
    """``model.offload`` / ``model.offload_stream``: group offloading where diffusers can run it."""
    one_of("model.offload", model.offload, OFFLOADS)
    if model.offload == "group" and not _installed("accelerate"):
        fail("model.offload", model.offload, 'none; or pip install "obsdiff[offload]" (accelerate)')
    if model.offload == "group" and model.family == "generic":
        fail(
            "model.offload", model.offload, "none for model.family=generic (its load probes the sampler "
            "and groups layers by running the denoiser in place, without offloading hooks)"
        )  # fmt: skip
    if model.offload_stream and model.offload != "group":
        fail("model.offload_stream", True, f"false for model.offload={model.offload} (no blocks to stream)")
    if model.offload_stream and not model.device.startswith("cuda"):
        fail(
            "model.offload_stream", True, f"false for model.device={model.device}: diffusers' streamed "
            "offloading needs a CUDA onload device (set model.device=cuda or cuda:<index>)"
        )  # fmt: skip


def check_sparsity(cfg: DictConfig) -> None:
    """``sparsity``: ratios, N:M, the kind-specific fields, ``pruner.block_size`` as a multiple of M,
    the allocation."""
    sp = cfg.sparsity
    one_of("sparsity.kind", sp.kind, SPARSITY_KINDS)
    fraction("sparsity.ratio", sp.ratio)
    if sp.kind == "nm":
        if sp.n <= 0 or sp.m <= 0 or sp.n >= sp.m:
            fail("sparsity.n/sparsity.m", f"{sp.n}:{sp.m}", "positive integers with N < M (e.g. 2:4, 4:8)")
        if cfg.pruner.block_size % sp.m:
            fail("pruner.block_size", cfg.pruner.block_size, f"a multiple of sparsity.m={sp.m}")
    if sp.exact_count and sp.kind != "unstructured":
        fail("sparsity.exact_count", sp.exact_count, f"false for sparsity.kind={sp.kind} (unstructured only)")
    for key in ("head_ratio", "ffn_ratio"):
        if sp[key] is not None:
            if sp.kind != "structured":
                fail(f"sparsity.{key}", sp[key], f"null for sparsity.kind={sp.kind} (structured only)")
            fraction(f"sparsity.{key}", sp[key])
    check_allocation(sp)


def check_allocation(sp: DictConfig) -> None:
    """``sparsity.allocation``: a known rule, unstructured only, and OWL's ``M > 0``, ``0 <= λ < 1``."""
    one_of("sparsity.allocation", sp.allocation, ALLOCATIONS)
    one_of("sparsity.allocation_granularity", sp.allocation_granularity, ALLOCATION_GRANULARITIES)
    if sp.allocation != "uniform" and sp.kind != "unstructured":
        fail(
            "sparsity.allocation", sp.allocation,
            f"uniform for sparsity.kind={sp.kind} (a non-uniform split is unstructured only)",
        )  # fmt: skip
    if not (finite(sp.owl.threshold_m) and sp.owl.threshold_m > 0):
        fail("sparsity.owl.threshold_m", sp.owl.threshold_m, "a finite number > 0 (5 in the reference)")
    fraction("sparsity.owl.lam", sp.owl.lam)


def check_schedule(sch: DictConfig) -> None:
    """``schedule``: a registered weighting and finite ``0 < alpha_min <= alpha_max``."""
    one_of("schedule.name", sch.name, SCHEDULES.names())
    for key in ("alpha_min", "alpha_max"):
        if not (finite(sch[key]) and sch[key] > 0):
            fail(f"schedule.{key}", sch[key], "a finite number > 0")
    if sch.alpha_min > sch.alpha_max:
        fail("schedule.alpha_min/alpha_max", f"{sch.alpha_min}/{sch.alpha_max}", "alpha_min <= alpha_max")


def check_pruner(cfg: DictConfig) -> None:
    """``pruner``: mask and update names, numbers, blocks, targets and the compensate ablation."""
    pr, kind = cfg.pruner, cfg.sparsity.kind
    valid_name("pruner.name", pr.name)
    methods = STRUCTURED_METHODS if kind == "structured" else MASK_METHODS
    one_of("pruner.mask", pr.mask, methods, f" (for sparsity={kind})")
    one_of("pruner.update", pr["update"], UPDATES)  # pr.update is DictConfig.update, the method
    if kind == "structured" and pr["update"] == "admm":
        fail("pruner.update", "admm", "obs or none for sparsity=structured (ADMM re-fits unstructured / N:M)")
    int_at_least("pruner.num_packages", pr.num_packages, 1)
    if pr.package_bytes is not None:
        parse_bytes("pruner.package_bytes", pr.package_bytes)
    if not (finite(pr.damp_frac) and pr.damp_frac > 0):
        fail("pruner.damp_frac", pr.damp_frac, "a finite number > 0 (0.01 in the paper)")
    int_at_least("pruner.block_size", pr.block_size, 1)
    check_order(pr, kind)
    if not pr.compensate and kind != "structured":
        fail(
            "pruner.compensate", pr.compensate, "true (false is the structured ablation, sparsity=structured)"
        )
    check_blocks(pr.blocks)
    one_of("pruner.refine", pr.refine, REFINES)
    if pr.refine != "none" and kind == "structured":
        fail("pruner.refine", pr.refine, "none with sparsity=structured")
    int_at_least("pruner.swaps.max_iterations", pr.swaps.max_iterations, 0)
    int_at_least("pruner.swaps.chunk_elements", pr.swaps.chunk_elements, 1)
    if pr.targets is not None:
        targets = list(pr.targets)
        if not targets or len(set(targets)) < len(targets):
            fail("pruner.targets", targets, "null (the family's default targets) or distinct target layers")
    check_dsnot(pr.dsnot)
    check_admm(pr.admm)


def check_admm(ad: DictConfig) -> None:
    """``pruner.admm``: ρ > 0, a ρ factor > 0, counts >= 0 and growth within the iterations."""
    for key in ("rho", "rho_factor"):
        if not (finite(ad[key]) and ad[key] > 0):
            fail(f"pruner.admm.{key}", ad[key], "a finite number > 0 (1 in the paper)")
    for key in ("iterations", "growth", "rho_every"):
        int_at_least(f"pruner.admm.{key}", ad[key], 0)
    if ad.growth > ad.iterations:
        fail("pruner.admm.growth", ad.growth, f"at most pruner.admm.iterations ({ad.iterations})")


def check_order(pr: DictConfig, kind: str) -> None:
    """``pruner.order``: a registered order; a non-natural one needs a layer-wise OBS sweep to order."""
    one_of("pruner.order", pr.order, ORDERS)
    if not (finite(pr.rose_threshold) and 0 <= pr.rose_threshold < 1):
        fail("pruner.rose_threshold", pr.rose_threshold, "a number in [0, 1) (0.5 in the ROSE code)")
    if pr.order != "natural" and (kind == "structured" or "obs" not in (pr.mask, pr["update"])):
        fail("pruner.order", pr.order, "natural for methods without a layer-wise OBS sweep "
             "(sparsity=structured, or neither pruner.mask nor pruner.update is obs)")  # fmt: skip


def check_dsnot(ds: DictConfig) -> None:
    """``pruner.dsnot``: the start mask, a cycle count >= 0 and finite thresholds and powers."""
    one_of("pruner.dsnot.init", ds.init, DSNOT_INITS)
    int_at_least("pruner.dsnot.max_cycles", ds.max_cycles, 0)
    number_at_least("pruner.dsnot.update_threshold", ds.update_threshold, 0)
    for key in ("pow_of_var_regrowing", "pow_of_var_pruning"):
        if not finite(ds[key]):
            fail(f"pruner.dsnot.{key}", ds[key], "a finite number")


def _fits_domain(cfg: DictConfig, fld: str, value: Any) -> None:
    """The digits prompts, judge and images only with a model that is not a general one."""
    key = fld.split(".")[1]
    if value not in DIGITS_ONLY[key] or cfg.model.prompt_domain != "general":
        return
    others = [n for n in PROMPT_SOURCES.names() if n not in DIGITS_ONLY["source"]]
    instead = {
        "source": f"another prompt source ({', '.join(others)})",
        "prompt_judge": "null",
        "real_images": "null (eval.reference_dir: a folder of real images)",
    }[key]
    fail(
        fld,
        value,
        f"{instead} for model.name={cfg.model.name!r} (model.prompt_domain=general): "
        f"{value!r} fits the tiny digits model only",
    )


def check_prompts(cfg: DictConfig, group: str) -> None:
    """``calibration`` / ``eval``: sampler numbers, seed, and the prompt source (read if local, no
    download), which must fit the model's prompt domain."""
    c = cfg[group]
    if group == "eval" and c.kind == "none":
        return
    _fits_domain(cfg, f"{group}.source", c.source)
    for key in ("num_steps", "batch_size", "resolution"):
        int_at_least(f"{group}.{key}", c[key], 1)
    number_at_least(f"{group}.guidance_scale", c.guidance_scale, 0, " (> 1 turns on CFG)")
    int_at_least(f"{group}.seed", c.seed, 0)
    if group == "eval":
        int_at_least("eval.skip_prompts", c.skip_prompts, 0)
        int_at_least("eval.num_grid", c.num_grid, 1)
    if not is_int(c.num_prompts):
        fail(f"{group}.num_prompts", c.num_prompts, "an integer >= 1")
    num = c.num_prompts + c.get("skip_prompts", 0)
    try:
        check_prompt_source(c.source, num, c.path, c.column, c.dataset, c.split, group=group)
    except PromptSourceError as err:
        raise ConfigError(str(err)) from err


def _check_coco_protocol(ecfg: DictConfig) -> None:
    """``eval.source=coco``: the chosen captions hash to the pinned ``eval.protocol_sha256``."""
    error = protocol_error(ecfg)
    if error is not None:
        raise ConfigError(error)


def check_eval(cfg: DictConfig) -> None:
    """``eval``: its kind, references (real images or a dense-model seed range apart from the eval
    seeds), prompt judge, FID feature net, CLIP model and metrics."""
    ecfg = cfg.eval
    one_of("eval.kind", ecfg.kind, EVAL_KINDS)
    if ecfg.kind == "none":
        return
    if ecfg.source == "coco":
        _check_coco_protocol(ecfg)
    if ecfg.reference_dir is not None and ecfg.real_images is not None:
        fail(
            "eval.reference_dir", ecfg.reference_dir, "null when eval.real_images is set (one reference set)"
        )
    if ecfg.reference_dir is not None and not Path(ecfg.reference_dir).is_dir():
        fail("eval.reference_dir", ecfg.reference_dir, "an existing folder of reference images")
    if ecfg.real_images is not None:
        one_of("eval.real_images", ecfg.real_images, REAL_IMAGES.names(), nullable=True)
        _fits_domain(cfg, "eval.real_images", ecfg.real_images)
    if ecfg.reference_dir is None and ecfg.real_images is None and ecfg.reference_seed is None:
        fail("eval.reference_seed", None, "a seed when eval has no real images (reference_dir, real_images)")
    if ecfg.reference_seed is not None:
        int_at_least("eval.reference_seed", ecfg.reference_seed, 0)
        seed, num = ecfg.seed, ecfg.num_prompts  # the eval images' seeds: seed .. seed + num - 1
        if abs(ecfg.reference_seed - seed) < num:
            fail(
                "eval.reference_seed",
                ecfg.reference_seed,
                f">= {seed + num} or <= {seed - num}, apart from the eval seeds (eval.seed={seed}, {num})",
            )
    if ecfg.prompt_judge is not None:
        one_of("eval.prompt_judge", ecfg.prompt_judge, PROMPT_JUDGES.names(), nullable=True)
        _fits_domain(cfg, "eval.prompt_judge", ecfg.prompt_judge)
        if ecfg.source != "digits":
            fail("eval.prompt_judge", ecfg.prompt_judge, "null unless eval.source=digits")
    one_of("eval.feature_net", ecfg.feature_net, FEATURE_NETS.names())
    if ecfg.feature_net == "inception_v3" and not _installed("torch_fidelity"):
        fail("eval.feature_net", ecfg.feature_net, 'efficientnet_lite0; or pip install "obsdiff[coco]"')
    if ecfg.feature_weights is not None and not Path(ecfg.feature_weights).is_file():
        fail("eval.feature_weights", ecfg.feature_weights, "null (packaged weights) or an existing file")
    clip_values = "tiny, digits, a CLIP hub id or a local folder"
    non_empty("eval.clip_model", ecfg.clip_model, clip_values, nullable=True)
    check_metrics(ecfg)


def check_metrics(ecfg: DictConfig) -> None:
    """``eval.metrics``: distinct registered metric names; ``eval.bootstrap``: resamples >= 0."""
    names = list(ecfg.metrics)
    for name in names:
        if name not in METRICS:
            fail(
                "eval.metrics", plain(ecfg.metrics), f"registered metrics only ({name!r} is not one; "
                f"known: {', '.join(METRICS.names())}; a new one is a file in obsdiff/evaluation/metrics/)"
            )  # fmt: skip
    if len(set(names)) < len(names):
        fail("eval.metrics", names, "distinct metric names")
    int_at_least("eval.bootstrap", ecfg.bootstrap, 0)


def check_logger(lg: DictConfig) -> None:
    """``logger``: kind, mode, names and distinct, non-empty tags."""
    one_of("logger.kind", lg.kind, LOGGER_KINDS)
    one_of("logger.mode", lg.mode, LOGGER_MODES)
    non_empty("logger.project", lg.project, "a W&B project name")
    non_empty("logger.entity", lg.entity, "a W&B entity (user or team)", nullable=True)
    non_empty("logger.name", lg.name, "a run name (null: W&B picks one)", nullable=True)
    non_empty("logger.group", lg.group, "a run group (null: the sweep folder in a multirun)", nullable=True)
    tags = list(lg.tags)
    if not all(isinstance(t, str) and 0 < len(t.strip()) <= 64 for t in tags) or len(set(tags)) < len(tags):
        fail("logger.tags", tags, "distinct, non-empty tags of at most 64 characters")


def check_run(cfg: DictConfig) -> None:
    """Top-level fields: the artifact to evaluate, the cache folder and the optimized metric."""
    if cfg.artifact is not None:
        manifest = Path(cfg.artifact) / "manifest.json"
        if not manifest.is_file():
            fail("artifact", cfg.artifact, "a run's pruned/ folder (with manifest.json)")
        family = json.loads(manifest.read_text()).get("model", {}).get("family")
        if family != cfg.model.family:
            fail(
                "artifact", cfg.artifact, f"an artifact of model.family={cfg.model.family!r}, not {family!r}"
            )
    non_empty("cache_dir", cfg.cache_dir, "a folder for dense results and reference statistics")
    if Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        fail("cache_dir", cfg.cache_dir, "a folder (this is a file)")
    metric = cfg.optimized_metric
    if metric is not None:
        group, _, name = metric.partition("/") if isinstance(metric, str) else ("", "", "")
        if group not in METRIC_GROUPS or not name:
            fail("optimized_metric", metric, f"null or <group>/<name>, group: {', '.join(METRIC_GROUPS)}")
        if group in ("dense", "eval") and cfg.eval.kind == "none":
            fail("optimized_metric", metric, "a prune/ or model/ metric when eval=none (no eval metrics)")


def check_fields(cfg: DictConfig) -> None:
    """Check every field that needs no model (no torch import); raise ``ConfigError`` on the first bad one."""
    check_missing(cfg)
    check_model(cfg.model)
    check_sparsity(cfg)
    check_schedule(cfg.schedule)
    check_pruner(cfg)
    check_run(cfg)
    check_logger(cfg.logger)
    check_prompts(cfg, "calibration")
    check_prompts(cfg, "eval")
    check_eval(cfg)
