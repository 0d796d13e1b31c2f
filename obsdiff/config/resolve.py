"""The run spec: the config resolved once, against the model's config, into what every stage needs.

``resolve(cfg)`` reads the denoiser's ``config.json`` once (no weights, no torch), asks the family
adapter for every model-dependent answer (block range, targets and their widths, head counts, the
resolutions its sampler takes) and refuses what cannot run, naming the field. Prune, save, cost and
report receive the spec instead of re-deriving these from the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from obsdiff.config.fields import ConfigError, parse_bytes
from obsdiff.config.validate import parse_blocks


@dataclass(frozen=True)
class RunSpec:
    """Everything pruning needs, resolved once.

    Args:
        family: the model family (adapter name).
        options: the family's model options (defaults filled in).
        denoiser_config: the dense denoiser's ``config.json``.
        kind: ``unstructured``, ``nm`` or ``structured``.
        ratio, n, m, exact_count, head_ratio, ffn_ratio: the sparsity fields (head/FFN ratios
            resolved: ``null`` → ``ratio``).
        blocks: block indices to prune (``None`` = all; structured: never ``None``).
        targets: layer-wise target names (relative to a block); empty for structured runs.
        widths: input features of each target.
        mask, update: the method (``update`` already folds ``pruner.compensate=false`` in).
        damp_frac, block_size, num_packages: solver and loop settings.
        package_bytes: the Hessian budget per package in bytes (``None``: ``num_packages``).
        refine, swaps: the mask refinement (``none`` | ``swaps``) and SparseSwaps' options.
        dsnot: DSnoT's options.
        allocation, allocation_granularity, owl: the sparsity allocation (``obsdiff.allocation``).
        admm: the ADMM update's options.
        order, rose_threshold: the OBS sweep's column order (``natural`` | ``rose``) and ROSE's
            columnar-layer cut.
    """

    family: str
    options: dict[str, Any]
    denoiser_config: dict[str, Any]
    kind: str
    ratio: float
    n: int
    m: int
    exact_count: bool
    head_ratio: float
    ffn_ratio: float
    blocks: list[int] | None
    targets: list[str]
    widths: dict[str, int]
    mask: str
    update: str
    damp_frac: float
    block_size: int
    num_packages: int
    package_bytes: int | None
    refine: str = "none"
    swaps: dict[str, Any] = field(default_factory=dict)
    dsnot: dict[str, Any] = field(default_factory=dict)
    allocation: str = "uniform"
    allocation_granularity: str = "block"
    owl: dict[str, Any] = field(default_factory=dict)
    admm: dict[str, Any] = field(default_factory=dict)
    order: str = "natural"
    rose_threshold: float = 0.5

    @property
    def structured(self) -> bool:
        return self.kind == "structured"

    def pattern(self) -> Any:
        """The solver's pattern object (imports the solvers, and so torch)."""
        if self.structured:
            from obsdiff.solvers.structured import StructuredPattern

            return StructuredPattern(ratio=self.ratio, head_ratio=self.head_ratio, ffn_ratio=self.ffn_ratio)
        from obsdiff.solvers.obs import Pattern

        if self.kind == "nm":
            return Pattern(kind="nm", n=self.n, m=self.m)
        return Pattern(kind="unstructured", ratio=self.ratio, exact_count=self.exact_count)

    @property
    def target_sparsity(self) -> float:
        return self.n / self.m if self.kind == "nm" else self.ratio


def resolve(cfg: DictConfig) -> RunSpec:
    """Resolve ``cfg`` against its model; raises :class:`ConfigError` naming the field on misfit."""
    from obsdiff.models import ModelConfigError

    try:
        return _resolve(cfg)
    except ModelConfigError as err:  # the adapter's answer (options, blocks, targets) -> one error type
        raise ConfigError(str(err)) from err


def check_against_model(cfg: DictConfig) -> dict[str, int]:
    """The model-dependent checks (``resolve``); returns ``target -> in_features``."""
    return resolve(cfg).widths


def effective_update(pruner: DictConfig) -> str:
    """``pruner.update``, or ``none`` when ``pruner.compensate=false``.

    (``pruner["update"]``: attribute access would return ``DictConfig.update``, the dict method.)
    """
    return pruner["update"] if pruner.compensate else "none"


def check_resolutions(cfg: DictConfig, grid: tuple[int, int | None]) -> None:
    """Every sampler resolution (``model.sampler``, ``calibration``, ``eval``) on the model's grid:
    ``(step, largest)`` from ``ModelAdapter.resolution_grid`` (VAE factor × patch size; the
    position embedding's reach)."""
    step, largest = grid
    groups = ["model.sampler", "calibration"] + (["eval"] if cfg.eval.kind != "none" else [])
    for group in groups:
        resolution = OmegaConf.select(cfg, f"{group}.resolution")
        if resolution % step or (largest is not None and resolution > largest):
            reach = f" up to {largest} (the position embedding's reach)" if largest else ""
            raise ConfigError(
                f"{group}.resolution={resolution} is invalid; allowed for model.name={cfg.model.name!r}: "
                f"a multiple of {step} (VAE factor x latent patch){reach}"
            )


def _resolve(cfg: DictConfig) -> RunSpec:
    from obsdiff.models import get_adapter

    model = cfg.model
    adapter = get_adapter(model.family, OmegaConf.to_container(model.options, resolve=True))
    if cfg.sparsity.kind == "structured" and not adapter.supports_structured:
        msg = f"the {model.family} adapter prunes unstructured and N:M only"
        raise ConfigError(f"sparsity=structured needs a family adapter; {msg}")
    config = adapter.denoiser_config(model)
    check_resolutions(cfg, adapter.resolution_grid(model, config))
    sp, pr = cfg.sparsity, cfg.pruner
    structured = sp.kind == "structured"
    blocks = parse_blocks(pr.blocks, adapter.num_blocks(config))
    if blocks is None and structured:
        blocks = adapter.default_blocks(config, structured=True)
    if blocks is not None and not blocks:
        raise ConfigError(
            f"pruner.blocks={pr.blocks!r} selects no block of the model's {adapter.num_blocks(config)}"
        )
    if structured and pr.targets is not None:
        raise ConfigError(f"pruner.targets={list(pr.targets)} is invalid; allowed: null for structured runs")
    targets = [] if structured else list(pr.targets if pr.targets is not None else adapter.default_targets)
    widths = adapter.check(model, blocks, targets)
    if sp.kind == "nm":
        bad = {t: w for t, w in widths.items() if w % sp.m}
        if bad:
            raise ConfigError(f"sparsity.m={sp.m} must divide every target layer's input width; not: {bad}")
    head_ratio = sp.ratio if sp.get("head_ratio") is None else sp.head_ratio
    ffn_ratio = sp.ratio if sp.get("ffn_ratio") is None else sp.ffn_ratio
    if structured:
        for name, heads in adapter.attention_heads(config).items():
            if round(heads * head_ratio) >= heads:
                raise ConfigError(
                    f"sparsity.head_ratio={head_ratio} removes all {heads} heads of {name}; keep at least one"
                )
    return RunSpec(
        family=model.family, options=adapter.options, denoiser_config=config, kind=sp.kind,
        ratio=sp.ratio, n=sp.n, m=sp.m, exact_count=sp.exact_count, head_ratio=head_ratio,
        ffn_ratio=ffn_ratio, blocks=blocks, targets=targets, widths=widths, mask=pr.mask,
        update=effective_update(pr), damp_frac=pr.damp_frac,
        refine=pr.refine, swaps=OmegaConf.to_container(pr.swaps, resolve=True),
        block_size=pr.block_size, num_packages=pr.num_packages,
        package_bytes=None if pr.package_bytes is None else parse_bytes("pruner.package_bytes",
                                                                         pr.package_bytes),
        dsnot=OmegaConf.to_container(pr.dsnot, resolve=True),
        allocation=sp.get("allocation", "uniform"),
        allocation_granularity=sp.get("allocation_granularity", "block"),
        owl=OmegaConf.to_container(sp.owl, resolve=True) if "owl" in sp else {},
        admm=OmegaConf.to_container(pr.admm, resolve=True),
        order=pr.order, rose_threshold=pr.rose_threshold,
    )  # fmt: skip
