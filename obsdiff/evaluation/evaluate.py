"""Generate images from pre-encoded prompts and score them (FID, CLIP score, prompt accuracy).

Dense results are cached per model + eval config, so a sweep generates them once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from obsdiff import faults
from obsdiff.calibration.prompts import load_prompts
from obsdiff.evaluation import PROMPT_JUDGES, REAL_IMAGES  # registries with torch-free names, lazy entries
from obsdiff.evaluation.cache import load_or_build
from obsdiff.evaluation.clip import clip_score, load_clip, tiny_clip
from obsdiff.evaluation.fid import FidReference, get_feature_net, image_features
from obsdiff.fileio import atomic_write, write_json
from obsdiff.models.base import ModelAdapter, slice_embeds

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class EvalSet:
    """Evaluation prompts, encoded once, with one seed per prompt."""

    prompts: list[str]
    embeds: dict
    seeds: list[int]


def prepare_eval_set(adapter: ModelAdapter, pipe: Any, ecfg: Any) -> EvalSet:
    """Load and encode the evaluation prompts (before the text encoders are offloaded)."""
    num = ecfg.num_prompts + ecfg.skip_prompts
    prompts = load_prompts(ecfg.source, num, ecfg.path, ecfg.column, ecfg.dataset, ecfg.split, group="eval")[
        ecfg.skip_prompts :
    ]
    embeds = adapter.encode(pipe, prompts, ecfg.guidance_scale, ecfg.batch_size)
    return EvalSet(prompts, embeds, [ecfg.seed + i for i in range(len(prompts))])


def generate(
    adapter: ModelAdapter, pipe: Any, evalset: EvalSet, ecfg: Any, seeds: list[int], desc: str
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, one generator per prompt (``model.offload=group``:
    offloading hooks for the whole generation)."""
    images = []
    batches = tqdm(range(0, len(seeds), ecfg.batch_size), desc=desc, unit="batch", dynamic_ncols=True)
    with adapter.offload.sampling(adapter.denoiser(pipe)):
        for start in batches:
            stop = min(start + ecfg.batch_size, len(seeds))
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:stop]]
            out = adapter.denoise(
                pipe,
                slice_embeds(evalset.embeds, start, stop),
                generators,
                ecfg.num_steps,
                ecfg.guidance_scale,
                ecfg.resolution,
                output_type="pt",
            )
            images.append(out.float().clamp(0, 1).cpu())
    return torch.cat(images)


def load_image_folder(folder: str | Path, limit: int, resolution: int) -> torch.Tensor:
    """The first ``limit`` images (sorted by name) of a folder as (N, 3, R, R) floats in [0, 1]."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(paths) < 2:
        raise ValueError(f"eval.reference_dir={folder!s}: needs at least 2 images, found {len(paths)}")
    arrays = [
        np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution), Image.BICUBIC))
        for p in paths
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R)


def heldout_digits(count: int, resolution: int) -> torch.Tensor:
    """All 500 held-out real digits of the embedded model's data, whatever ``count`` prompts are scored."""
    from obsdiff.models.digits_data import heldout_set

    images, _ = heldout_set()
    if images.shape[-1] != resolution:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear")
    return images.clamp(0, 1)


class PromptJudge(NamedTuple):
    """A prompt judge: ``build()`` gives a scorer ``(images, prompts) -> {part: fraction}`` whose
    ``all`` part is the fraction of images showing everything their prompt asks for; ``weights()``
    is its weight file, which keys the dense cache."""

    description: str
    build: Callable[[], Callable[[torch.Tensor, list[str]], dict[str, float]]]
    weights: Callable[[], Path]


def _digits_classifier() -> Callable[[torch.Tensor, list[str]], dict[str, float]]:
    from obsdiff.evaluation.digits_classifier import load_digits_classifier, prompt_accuracy

    classifier = load_digits_classifier()
    return lambda images, prompts: prompt_accuracy(images, prompts, classifier)


def _digits_classifier_weights() -> Path:
    from obsdiff.evaluation.digits_classifier import shipped_weights

    return shipped_weights()


# The ``digits_classifier`` entry of ``PROMPT_JUDGES`` (``eval.prompt_judge``).
DIGITS_CLASSIFIER_JUDGE = PromptJudge(
    "digits classifier: digit, foreground and background all as prompted "
    "(the tiny model's stand-in for CLIP score)",
    _digits_classifier,
    _digits_classifier_weights,
)


def load_real_images(ecfg: Any, count: int) -> torch.Tensor | None:
    """The eval's real images (``reference_dir`` or ``real_images``), or ``None`` if it has none."""
    if ecfg.reference_dir:
        return load_image_folder(ecfg.reference_dir, count, ecfg.resolution)
    if ecfg.get("real_images"):
        return REAL_IMAGES[ecfg.real_images](count, ecfg.resolution)
    return None


class Scorer:
    """FID to real images and to the dense model, CLIP score and prompt accuracy, from config.

    ``fid`` is the FID to real images when the eval has them, else to the dense model (other
    seeds); ``fid_real`` and ``fid_dense`` name their reference. Every network is built once.

    Args:
        ecfg: the ``eval`` config.
        tokenizer: the pipeline's CLIP tokenizer (used by the tiny local CLIP).
    """

    def __init__(self, ecfg: Any, tokenizer: Any = None) -> None:
        self.ecfg = ecfg
        self.feature_net = get_feature_net(ecfg.feature_net, ecfg.feature_weights)
        self.fid_real: FidReference | None = None
        self.fid_dense: FidReference | None = None
        self.clip, self.clip_name = None, None
        if ecfg.clip_model == "tiny":
            self.clip = lambda: tiny_clip(tokenizer, image_size=ecfg.resolution)
            self.clip_name = "tiny random CLIP (plumbing check, not a quality number)"
        elif ecfg.clip_model == "digits":
            from obsdiff.evaluation.digits_clip import load_digits_clip

            self.clip = load_digits_clip
            self.clip_name = "digits CLIP (trained on the tiny model's digits and captions)"
        elif ecfg.clip_model:
            self.clip = lambda: load_clip(ecfg.clip_model)
            self.clip_name = ecfg.clip_model
        self.judge_name, self.judge = None, None
        if ecfg.get("prompt_judge"):
            judge = PROMPT_JUDGES[ecfg.prompt_judge]
            self.judge_name, self.judge = judge.description, judge.build()

    def set_references(self, real: FidReference | None, dense: FidReference | None) -> None:
        """The reference statistics every later :meth:`score` compares with (``None``: no such FID)."""
        self.fid_real, self.fid_dense = real, dense

    def names(self) -> dict[str, str]:
        ecfg = self.ecfg
        real = ecfg.reference_dir or ecfg.get("real_images")
        dense = f"dense model, seeds from {ecfg.reference_seed}"
        names = {"eval/fid_feature_net": ecfg.feature_net, "eval/fid_reference": str(real or dense)}
        if self.clip_name:
            names["eval/clip_network"] = self.clip_name
        if self.judge_name:
            names["eval/prompt_judge"] = self.judge_name
        return names

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        features = image_features(images, self.feature_net)  # one pass for both references
        if self.fid_real is not None:
            metrics["fid_real"] = self.fid_real.fid(features)
        if self.fid_dense is not None:
            metrics["fid_dense"] = self.fid_dense.fid(features)
        metrics["fid"] = metrics["fid_real"] if "fid_real" in metrics else metrics["fid_dense"]
        if self.clip is not None:
            metrics["clip_score"] = clip_score(images, prompts, self.clip)
        if self.judge is not None:
            parts = self.judge(images, prompts)
            metrics["prompt_accuracy"] = parts.pop("all")
            metrics |= {f"prompt_accuracy_{part}": value for part, value in parts.items()}
        return metrics


def real_reference(
    ecfg: Any, count: int, feature_net: torch.nn.Module, cache_dir: str
) -> FidReference | None:
    """Feature statistics of the eval's real images (``None`` if it has none), cached on disk per
    image set, resolution and feature network, so a sweep computes them once."""
    from obsdiff.provenance import config_hash, files_fingerprint, library_versions

    if not ecfg.reference_dir and not ecfg.get("real_images"):
        return None
    what = {
        "images": ecfg.reference_dir or ecfg.real_images,
        "files": files_fingerprint(ecfg.reference_dir) if ecfg.reference_dir else None,
        "count": count if ecfg.reference_dir else "all",
        **{k: ecfg[k] for k in ("resolution", "feature_net", "feature_weights")},
        "versions": library_versions(),
    }
    path = Path(cache_dir) / "fid_reference" / f"{config_hash(OmegaConf.create(what))}.safetensors"

    def load() -> FidReference | None:
        if not path.exists():
            return None
        stats = load_file(str(path))
        return FidReference(stats["mean"], stats["cov"])

    def build() -> FidReference:
        reference = FidReference.from_images(load_real_images(ecfg, count), feature_net)
        stats = {"mean": reference.mean, "cov": reference.cov}
        atomic_write(path, lambda tmp: save_file(stats, str(tmp)))
        return reference

    return load_or_build(path, load, build, "real-image FID statistics")


def dense_baseline(
    adapter: ModelAdapter, pipe: Any, evalset: EvalSet, scorer: Scorer, cfg: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense images and metrics; sets the scorer's references. Dense generations and reference
    statistics are cached under ``cfg.cache_dir`` per model + eval config, so a sweep makes them once."""
    from obsdiff.provenance import config_hash, files_fingerprint, library_versions

    ecfg = cfg.eval
    real = real_reference(ecfg, len(evalset.prompts), scorer.feature_net, cfg.cache_dir)
    if real is None and ecfg.reference_seed is None:
        raise ValueError("eval has no reference: set eval.reference_dir, real_images or reference_seed")
    judge = [PROMPT_JUDGES[ecfg.prompt_judge].weights()] if ecfg.get("prompt_judge") else []
    files = files_fingerprint(adapter.weights_location(cfg.model), *judge)
    key = config_hash(
        OmegaConf.create(
            {"model": cfg.model, "eval": cfg.eval, "versions": library_versions(), "files": files}
        )
    )
    cache = Path(cfg.cache_dir) / "dense" / f"{cfg.model.name}-{key}"

    def load() -> tuple[torch.Tensor, dict[str, float]] | None:
        if not (cache / "metrics.json").exists():  # written last: it marks a complete entry
            return None
        tensors = load_file(str(cache / "images.safetensors"))
        metrics = json.loads((cache / "metrics.json").read_text())
        if tensors["dense"].shape[0] != len(evalset.prompts):
            raise ValueError(f"{tensors['dense'].shape[0]} images for {len(evalset.prompts)} prompts")
        dense_ref = FidReference(tensors["ref_mean"], tensors["ref_cov"]) if "ref_mean" in tensors else None
        scorer.set_references(real, dense_ref)
        return tensors["dense"], metrics

    def build() -> tuple[torch.Tensor, dict[str, float]]:
        dense = generate(adapter, pipe, evalset, ecfg, evalset.seeds, desc="dense images")
        tensors, dense_ref = {"dense": dense.contiguous()}, None
        if ecfg.reference_seed is not None:
            ref_seeds = [ecfg.reference_seed + i for i in range(len(evalset.prompts))]
            reference = generate(adapter, pipe, evalset, ecfg, ref_seeds, desc="reference images")
            dense_ref = FidReference.from_images(reference, scorer.feature_net)
            tensors |= {"ref_mean": dense_ref.mean, "ref_cov": dense_ref.cov}
        scorer.set_references(real, dense_ref)
        metrics = scorer.score(dense, evalset.prompts)
        atomic_write(cache / "images.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        faults.reached("dense_cache")
        write_json(cache / "metrics.json", metrics)
        return dense, metrics

    return load_or_build(cache, load, build, "dense images and metrics")
