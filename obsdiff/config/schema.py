"""The typed config schema: one dataclass per group, stored in Hydra's ConfigStore.

Hydra checks every composed YAML against these types (a typo in a field name or a string where a
number belongs fails at compose time). Value checks live in ``obsdiff.config.validate``. This module
imports nothing from obsdiff, so that the CLI can check a config before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, MISSING


@dataclass
class SamplerRunConfig:
    """How many prompts one use of the sampler (calibration or eval) takes by default, and how."""

    num_prompts: int = MISSING
    num_steps: int = MISSING
    batch_size: int = MISSING


@dataclass
class SamplerConfig:
    """A model's sampler defaults: every prompt source of ``calibration`` and ``eval`` takes them
    (``${model.sampler...}``) unless the run sets its own. Each ``conf/model/*.yaml`` declares them."""

    resolution: int = MISSING  # pixels per side; the model's grid: see ModelAdapter.resolution_grid
    guidance_scale: float = MISSING
    calibration: SamplerRunConfig = field(default_factory=SamplerRunConfig)
    eval: SamplerRunConfig = field(default_factory=SamplerRunConfig)


@dataclass
class ModelConfig:
    family: str = "sd3"  # the model family: its adapter checks and loads everything below
    name: str = "tiny_digits"
    path: str = "tiny_digits"  # embedded: tiny_digits (trained), tiny (random); else hub id or folder
    torch_dtype: str = "float32"
    device: str = "auto"
    # none | group: the denoiser's weights wait on the CPU and diffusers' group offloading moves one
    # block at a time to model.device while the sampler runs (models larger than the GPU)
    offload: str = "none"
    offload_stream: bool = False  # group: overlap transfers and compute on a CUDA stream
    # family-specific model options, checked by the family's adapter (SD3: text_encoder_3, ...)
    options: dict[str, Any] = field(default_factory=dict)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # What the weights were trained on: general (any text), digits (the digit captions only: the
    # digits prompts and prompt judge fit it), random (untrained test models: any prompt is plumbing).
    prompt_domain: str = MISSING


@dataclass
class PromptsConfig:
    source: str = "tiny"
    path: str | None = None
    column: str | None = None
    dataset: str | None = None
    split: str = "train"
    # The sampler settings: the model's (model.sampler) whatever the source, unless set.
    num_prompts: int = II("model.sampler.calibration.num_prompts")
    num_steps: int = II("model.sampler.calibration.num_steps")
    guidance_scale: float = II("model.sampler.guidance_scale")
    resolution: int = II("model.sampler.resolution")
    batch_size: int = II("model.sampler.calibration.batch_size")
    seed: int = 0


@dataclass
class CalibrationConfig(PromptsConfig):
    compile: bool = False  # torch.compile the denoiser while Hessians accumulate (recompiles per package)


@dataclass
class ScheduleConfig:
    name: str = "log_decrease"
    alpha_min: float = 0.8
    alpha_max: float = 1.2


@dataclass
class OwlConfig:
    """OWL's allocation rule (``obsdiff.solvers.owl``); the reference's defaults (LLaMA-7B)."""

    threshold_m: float = 5.0  # M: a score is an outlier above M x the mean score of its block
    lam: float = 0.08  # lambda: every block's sparsity stays within ratio +- lam


@dataclass
class SparsityConfig:
    kind: str = "unstructured"
    ratio: float = 0.5
    n: int = 2
    m: int = 4
    exact_count: bool = False  # unstructured: exact per-block count instead of the reference's `<=`
    head_ratio: float | None = None  # structured: fraction of heads (null = ratio)
    ffn_ratio: float | None = None  # structured: fraction of FFN neurons (null = ratio)
    # unstructured: uniform (every target layer at ratio) | owl: OWL's outlier-weighted split of
    # ratio over blocks (a dense diag(H) pre-pass first); the global count stays round(ratio x weights)
    allocation: str = "uniform"
    allocation_granularity: str = "block"  # owl: one sparsity per block | per target layer
    owl: OwlConfig = field(default_factory=OwlConfig)


@dataclass
class SwapsConfig:
    """SparseSwaps' options (see ``obsdiff.solvers.swaps``); the paper's only knob is the cap."""

    max_iterations: int = 100  # most 1-swaps per row (a row stops earlier once no swap helps)
    chunk_elements: int = 67108864  # fp32 candidate changes held at once (2**26: 256 MiB)


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
class AdmmConfig:
    """The ADMM update's options (``pruner.update=admm``; see ``obsdiff.solvers.admm``)."""

    rho: float = 1.0  # penalty ρ on the unit-diagonal (preconditioned) Hessian; paper: 1
    iterations: int = 20  # ADMM iterations (each a matmul); paper: 20
    growth: int = 0  # gradual mask growth over the first iterations (paper: 15 for its own mask; 0 = off)
    rho_factor: float = 1.0  # ρ is multiplied by this every rho_every iterations (1 = constant)
    rho_every: int = 0  # iterations per ρ value, one factorisation each (0 = one ρ throughout)


@dataclass
class PrunerConfig:
    name: str = "obs_diff"  # the method's label in metrics and reports
    mask: str = "obs"  # which weights go: obs | magnitude | wanda | dsnot; structured: obs | l1
    update: str = "obs"  # obs: OBS compensation on that mask | admm: ADMM re-fit | none: plain masking
    num_packages: int = 4
    package_bytes: Any = None  # a Hessian budget per package ("20GB", or bytes): overrides num_packages
    damp_frac: float = 0.01
    block_size: int = 128
    # column order of the OBS sweep: natural (left to right) | rose (ROSE, Su & Wang 2026: on
    # "columnar" layers, columns by would-be-pruned loss within each block, blocks by block loss)
    order: str = "natural"
    rose_threshold: float = 0.5  # order=rose: columnar when (max-min)/max of block loss exceeds it
    blocks: Any = None  # null = all blocks ([1, L-1) for structured); a list of indices; or "start:stop"
    compensate: bool = True  # false = update=none (the "no OBS update" ablation)
    dsnot: DsnotConfig = field(default_factory=DsnotConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    targets: list[str] | None = None  # null = the model family's default targets
    hessian_cache: str | None = None  # a folder: reuse package 1's Hessians across runs (opt-in)
    refine: str = "none"  # none | swaps: SparseSwaps' 1-swaps on the chosen mask, before the update
    swaps: SwapsConfig = field(default_factory=SwapsConfig)


# The metrics of conf/eval/tiny.yaml.
TINY_METRICS = ("fid_real", "fid_dense", "clip_score", "prompt_accuracy", "ssim_dense", "psnr_dense")


@dataclass
class EvalConfig(PromptsConfig):
    kind: str = "tiny"  # tiny | coco | none
    seed: int = 1000
    num_prompts: int = II("model.sampler.eval.num_prompts")
    num_steps: int = II("model.sampler.eval.num_steps")
    batch_size: int = II("model.sampler.eval.batch_size")
    skip_prompts: int = 0  # skip the first N prompts of the source (e.g. the calibration ones)
    feature_net: str = "efficientnet_lite0"
    feature_weights: str | None = None
    reference_dir: str | None = None  # folder of real images (coco)
    protocol_sha256: str | None = None  # source=coco: sha256 of the chosen (image id, caption) pairs
    check_protocol: bool = True  # source=coco: false accepts captions other than the pinned ones
    real_images: str | None = None  # packaged real images by name (tiny: digits_heldout)
    reference_seed: int | None = 5000  # fid_dense: the dense model with these seeds; null = none
    # a CLIP hub id or folder; tiny = random plumbing check; digits = trained digits CLIP; null = none
    clip_model: str | None = "tiny"
    prompt_judge: str | None = None  # digits_classifier: prompt accuracy (tiny model)
    pickscore_model: str | None = "yuvalkirstain/PickScore_v1"  # eval.metrics [..., pickscore]
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore_v1 ships none
    # eval.metrics [..., hpsv2, hpsv21]: a .pt / .safetensors file or <owner>/<repo>/<file> on the hub
    hpsv2_model: str | None = "xswu/HPSv2/HPS_v2_compressed.pt"
    hpsv21_model: str | None = "xswu/HPSv2/HPS_v2.1_compressed.pt"
    hps_tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP BPE both were tuned with
    # ImageReward v1.0: ImageReward.pt, a folder holding it, or the hub repo; eval.metrics [..., imagereward]
    imagereward_model: str | None = "THUDM/ImageReward"
    imagereward_tokenizer: str = "bert-base-uncased"  # BLIP's BERT tokenizer (its two tokens are added)
    # obsdiff.evaluation.metrics.base.METRICS names; one whose input is null above is left out
    metrics: list[str] = field(default_factory=lambda: list(TINY_METRICS))
    bootstrap: int = 200  # resamples of the prompts for every metric's 95 % interval; 0 = none
    num_grid: int = 8


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "obsdiff"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    name: str | None = None
    group: str | None = None  # the W&B run group; null: the sweep folder in a multirun, else none
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    save_model: bool = True
    artifact: str | None = None  # a run's pruned/ folder: evaluate it without pruning again
    plan_only: bool = False  # print the memory plan (and write plan.json), load nothing, exit
    # CPU only: treat subnormal floats (|x| < 1.2e-38) as zero. Denormal arithmetic made the
    # embedded model's sampler up to 20x slower on x86; the values it changes are far below
    # anything that moves a mask or a metric. false = strict IEEE arithmetic.
    flush_denormal: bool = True
    cache_dir: str = "${oc.env:OBSDIFF_CACHE,${oc.env:HOME,.}/.cache/obsdiff}"
    # A rerun in a used run dir continues after its last finished package (same config only);
    # false = start clean, deleting the dir's earlier outputs.
    resume: bool = True
    # A run (or -m job) whose dir already holds a finished run of the same config is not redone;
    # false = redo it from scratch.
    skip_done: bool = True
    # The metric the task function returns (Hydra sweepers, e.g. Optuna, minimise/maximise it).
    optimized_metric: str | None = None


def register_schema() -> None:
    """Store ``RunConfig`` as ``base_config`` so YAML files are type-checked when Hydra composes them."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=RunConfig)
