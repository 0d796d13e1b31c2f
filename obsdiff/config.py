"""Typed config schema (Hydra ConfigStore) and the checks that run before any model loads."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from obsdiff.calibration.prompts import check_prompt_source
from obsdiff.calibration.timesteps import SCHEDULES
from obsdiff.compare import register_cells
from obsdiff.evaluation.evaluate import PROMPT_JUDGES, REAL_IMAGES
from obsdiff.evaluation.fid import FEATURE_NETS
from obsdiff.models import get_adapter
from obsdiff.models.base import DTYPES
from obsdiff.solvers import MASK_METHODS, STRUCTURED_METHODS, UPDATES, Pattern
from obsdiff.solvers.dsnot import INITS as DSNOT_INITS
from obsdiff.solvers.structured import StructuredPattern


@dataclass
class ModelConfig:
    family: str = "sd3"
    name: str = "tiny_digits"
    path: str = "tiny_digits"  # embedded: tiny_digits (trained), tiny (random); else hub id or folder
    torch_dtype: str = "float32"
    device: str = "auto"
    text_encoder_3: str | None = "auto"  # null drops T5 (SD3 pipelines allow it)
    max_sequence_length: int = 256  # T5 tokens (zero rows when T5 is dropped), as at inference


@dataclass
class PromptsConfig:
    source: str = "tiny"
    path: str | None = None
    column: str | None = None
    dataset: str | None = None
    split: str = "train"
    num_prompts: int = 16
    num_steps: int = 10
    guidance_scale: float = 7.0
    resolution: int = 32
    batch_size: int = 8
    seed: int = 0


@dataclass
class ScheduleConfig:
    name: str = "log_decrease"
    alpha_min: float = 0.8
    alpha_max: float = 1.2


@dataclass
class SparsityConfig:
    kind: str = "unstructured"
    ratio: float = 0.5
    n: int = 2
    m: int = 4
    exact_count: bool = False  # unstructured: exact per-block count instead of the reference's `<=`
    head_ratio: float | None = None  # structured: fraction of heads (null = ratio)
    ffn_ratio: float | None = None  # structured: fraction of FFN neurons (null = ratio)


@dataclass
class DsnotConfig:
    """DSnoT's options, reference defaults (see ``obsdiff.solvers.dsnot``)."""

    init: str = "wanda"  # wanda | magnitude: the start mask
    max_cycles: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    pow_of_var_pruning: float = 0.0  # the reference parses 1 but never uses it
    keep_error_sign: bool = True
    exact_guard: bool = False  # opt-in: also reject swaps that raise the exact error


@dataclass
class PrunerConfig:
    name: str = "obs_diff"  # the method's label in metrics and reports
    mask: str = "obs"  # which weights go: obs | magnitude | wanda | dsnot; structured: obs | l1
    update: str = "obs"  # obs: OBS compensation on that mask | none: plain masking
    num_packages: int = 4
    damp_frac: float = 0.01
    block_size: int = 128
    blocks: Any = None  # null = all blocks ([1, L-1) for structured); a list of indices; or "start:stop"
    compensate: bool = True  # false = update=none (the "no OBS update" ablation)
    dsnot: DsnotConfig = field(default_factory=DsnotConfig)
    targets: list[str] | None = None  # null = the model family's default targets


@dataclass
class EvalConfig(PromptsConfig):
    kind: str = "tiny"  # tiny | coco | none
    seed: int = 1000
    num_prompts: int = 32
    skip_prompts: int = 0  # skip the first N prompts of the source (e.g. the calibration ones)
    feature_net: str = "efficientnet_lite0"
    feature_weights: str | None = None
    reference_dir: str | None = None  # folder of real images (coco)
    real_images: str | None = None  # packaged real images by name (tiny: digits_heldout)
    reference_seed: int | None = 5000  # fid_dense: the dense model with these seeds; null = none
    clip_model: str | None = "tiny"  # a CLIP hub id or folder; tiny = random plumbing check; null = none
    prompt_judge: str | None = None  # digits_classifier: prompt accuracy (tiny model)
    num_grid: int = 8


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "obsdiff"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: PromptsConfig = field(default_factory=PromptsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    save_model: bool = True
    artifact: str | None = None  # a run's pruned/ folder: evaluate it without pruning again
    # CPU only: treat subnormal floats (|x| < 1.2e-38) as zero. Denormal arithmetic made the
    # embedded model's sampler up to 20x slower on x86; the values it changes are far below
    # anything that moves a mask or a metric. false = strict IEEE arithmetic.
    flush_denormal: bool = True
    cache_dir: str = "${oc.env:OBSDIFF_CACHE,${oc.env:HOME,.}/.cache/obsdiff}"


def register_configs() -> None:
    """Register the schema so YAML files are type-checked when Hydra composes them."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    register_cells()


class ConfigError(ValueError):
    """A config field holds a value obsdiff cannot run with."""


def _fail(fld: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{fld}={value!r} is invalid; allowed: {allowed}")


def pattern_from_config(sparsity: DictConfig) -> Pattern | StructuredPattern:
    """The solver's pattern for the ``sparsity`` group."""
    if sparsity.kind == "structured":
        head = sparsity.ratio if sparsity.head_ratio is None else sparsity.head_ratio
        ffn = sparsity.ratio if sparsity.ffn_ratio is None else sparsity.ffn_ratio
        return StructuredPattern(ratio=sparsity.ratio, head_ratio=head, ffn_ratio=ffn)
    if sparsity.kind == "nm":
        return Pattern(kind="nm", n=sparsity.n, m=sparsity.m)
    return Pattern(kind="unstructured", ratio=sparsity.ratio, exact_count=sparsity.exact_count)


def parse_blocks(blocks: Any, num_layers: int | None = None) -> list[int] | None:
    """``null`` → all blocks; ``[0, 3]`` → those; ``"3:25"`` → ``range(3, 25)``; ``"1:-1"`` →
    ``range(1, num_layers - 1)``."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        start, _, stop = (x.strip() for x in blocks.partition(":"))
        ints = all(x.lstrip("-").isdigit() for x in (start, stop))
        if not ints or (num_layers is None and "-" in start + stop):
            _fail(
                "pruner.blocks",
                blocks,
                'null, a list of block indices, or "start:stop" (negative from the end)',
            )
        return list(range(num_layers or 0)[int(start) : int(stop)])
    if isinstance(blocks, int):
        return [blocks]
    return [int(b) for b in blocks]


def _validate_eval(ecfg: DictConfig) -> None:
    if ecfg.kind not in ("tiny", "coco", "none"):
        _fail("eval.kind", ecfg.kind, "tiny, coco, none")
    if ecfg.kind == "none":
        return
    if ecfg.reference_dir is not None and not Path(ecfg.reference_dir).is_dir():
        _fail("eval.reference_dir", ecfg.reference_dir, "an existing folder of reference images")
    if ecfg.real_images is not None and ecfg.real_images not in REAL_IMAGES:
        _fail("eval.real_images", ecfg.real_images, f"null, {', '.join(sorted(REAL_IMAGES))}")
    if ecfg.reference_dir is None and ecfg.real_images is None and ecfg.reference_seed is None:
        _fail("eval.reference_seed", None, "a seed when eval has no real images (reference_dir, real_images)")
    if ecfg.prompt_judge is not None:
        if ecfg.prompt_judge not in PROMPT_JUDGES:
            _fail("eval.prompt_judge", ecfg.prompt_judge, f"null, {', '.join(sorted(PROMPT_JUDGES))}")
        if ecfg.source != "digits":
            _fail("eval.prompt_judge", ecfg.prompt_judge, "null unless eval.source=digits")
    if ecfg.feature_net not in FEATURE_NETS:
        _fail("eval.feature_net", ecfg.feature_net, ", ".join(sorted(FEATURE_NETS)))
    if ecfg.feature_net == "inception_v3" and importlib.util.find_spec("torch_fidelity") is None:
        _fail("eval.feature_net", ecfg.feature_net, 'efficientnet_lite0; or pip install "obsdiff[coco]"')


def validate(cfg: DictConfig) -> dict[str, int]:
    """Check every field that can be checked without loading weights.

    Returns:
        ``target -> in_features`` for the configured targets (from the model config).
    """
    sp = cfg.sparsity
    if sp.kind == "unstructured":
        if not 0 <= sp.ratio < 1:
            _fail("sparsity.ratio", sp.ratio, "a fraction in [0, 1)")
    elif sp.kind == "nm":
        if sp.n <= 0 or sp.m <= 0 or sp.n >= sp.m:
            _fail("sparsity.n/sparsity.m", f"{sp.n}:{sp.m}", "positive integers with N < M (e.g. 2:4, 4:8)")
        if cfg.pruner.block_size % sp.m:
            _fail("pruner.block_size", cfg.pruner.block_size, f"a multiple of sparsity.m={sp.m}")
    elif sp.kind == "structured":
        for key in ("ratio", "head_ratio", "ffn_ratio"):
            if sp[key] is not None and not 0 <= sp[key] < 1:
                _fail(f"sparsity.{key}", sp[key], "a fraction in [0, 1)")
    else:
        _fail("sparsity.kind", sp.kind, "unstructured, nm, structured")
    sch = cfg.schedule
    if sch.name not in SCHEDULES:
        _fail("schedule.name", sch.name, ", ".join(sorted(SCHEDULES)))
    if sch.alpha_min <= 0 or sch.alpha_max <= 0 or sch.alpha_min > sch.alpha_max:
        _fail(
            "schedule.alpha_min/alpha_max", f"{sch.alpha_min}/{sch.alpha_max}", "0 < alpha_min <= alpha_max"
        )
    pr = cfg.pruner
    methods = STRUCTURED_METHODS if sp.kind == "structured" else tuple(MASK_METHODS)
    if pr.mask not in methods:
        _fail("pruner.mask", pr.mask, f"{', '.join(methods)} (for sparsity={sp.kind})")
    if pr["update"] not in UPDATES:
        _fail("pruner.update", pr["update"], ", ".join(UPDATES))
    if pr.dsnot.init not in DSNOT_INITS:
        _fail("pruner.dsnot.init", pr.dsnot.init, ", ".join(DSNOT_INITS))
    if pr.num_packages < 1:
        _fail("pruner.num_packages", pr.num_packages, "an integer >= 1")
    if pr.damp_frac <= 0:
        _fail("pruner.damp_frac", pr.damp_frac, "a positive number (0.01 in the paper)")
    if pr.block_size < 1:
        _fail("pruner.block_size", pr.block_size, "an integer >= 1")
    if not pr.compensate and sp.kind != "structured":
        _fail(
            "pruner.compensate", pr.compensate, "true (false is the structured ablation: sparsity=structured)"
        )
    if cfg.artifact is not None and not (Path(cfg.artifact) / "manifest.json").is_file():
        _fail("artifact", cfg.artifact, "a run's pruned/ folder (with manifest.json)")
    if cfg.model.torch_dtype not in DTYPES:
        _fail("model.torch_dtype", cfg.model.torch_dtype, ", ".join(DTYPES))
    for group in ("calibration", "eval"):
        c = cfg[group]
        if group == "eval" and c.kind == "none":
            continue
        for key in ("num_steps", "batch_size", "resolution"):
            if c[key] < 1:
                _fail(f"{group}.{key}", c[key], "an integer >= 1")
        num = c.num_prompts + c.get("skip_prompts", 0)
        check_prompt_source(c.source, num, c.path, c.column, c.dataset, c.split, group=group)
    _validate_eval(cfg.eval)
    if cfg.logger.kind not in ("wandb", "none"):
        _fail("logger.kind", cfg.logger.kind, "wandb, none")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        _fail("logger.mode", cfg.logger.mode, "offline, online, disabled")
    adapter = get_adapter(cfg.model.family)
    targets = list(pr.targets) if pr.targets is not None else list(adapter.default_targets)
    widths = adapter.check(cfg.model, pruned_blocks(cfg, adapter), targets)
    if sp.kind == "nm":
        bad = {t: w for t, w in widths.items() if w % sp.m}
        if bad:
            _fail("sparsity.m", sp.m, f"a divisor of every target layer's input width; not divisible: {bad}")
    if sp.kind == "structured":
        _check_structured(cfg, adapter)
    return widths


def effective_update(pruner: DictConfig) -> str:
    """``pruner.update``, or ``none`` when ``pruner.compensate=false``.

    (``pruner["update"]``: attribute access would return ``DictConfig.update``, the dict method.)
    """
    return pruner["update"] if pruner.compensate else "none"


def pruned_blocks(cfg: DictConfig, adapter: Any) -> list[int] | None:
    """The configured blocks; for structured runs ``null`` means the paper's ``[1, L-1)``."""
    num_layers = adapter.denoiser_config(cfg.model)["num_layers"]
    blocks = parse_blocks(cfg.pruner.blocks, num_layers)
    if blocks is None and cfg.sparsity.kind == "structured":
        return list(range(1, num_layers - 1))
    return blocks


def _check_structured(cfg: DictConfig, adapter: Any) -> None:
    config, pattern = adapter.denoiser_config(cfg.model), pattern_from_config(cfg.sparsity)
    heads = config["num_attention_heads"]
    if pattern.num_heads(heads) >= heads:
        _fail(
            "sparsity.head_ratio", pattern.head_ratio, f"a fraction that keeps at least one of {heads} heads"
        )
    if cfg.pruner.targets is not None:
        _fail("pruner.targets", list(cfg.pruner.targets), "null for structured runs (heads and FFN neurons)")
    if not pruned_blocks(cfg, adapter):
        _fail(
            "pruner.blocks",
            cfg.pruner.blocks,
            f"a non-empty range of the model's {config['num_layers']} blocks",
        )
