"""Generate images from pre-encoded prompts and score them with the chosen metrics
(``eval.metrics``, :mod:`obsdiff.evaluation.metrics`).

Dense results are cached per model + eval config + metrics, so a sweep generates them once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from obsdiff import faults
from obsdiff.calibration.prompts import load_prompts
from obsdiff.evaluation import REAL_IMAGES  # a registry with torch-free names, lazy entries
from obsdiff.evaluation.cache import load_or_build
from obsdiff.evaluation.fid import FidReference
from obsdiff.evaluation.metrics.base import METRICS, EvalContext, Metric
from obsdiff.evaluation.metrics.bootstrap import bootstrap_interval
from obsdiff.fileio import atomic_write, write_json
from obsdiff.models.base import ModelAdapter, slice_embeds

log = logging.getLogger(__name__)
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


def load_real_images(ecfg: Any, count: int) -> torch.Tensor | None:
    """The eval's real images (``reference_dir`` or ``real_images``), or ``None`` if it has none."""
    if ecfg.reference_dir:
        return load_image_folder(ecfg.reference_dir, count, ecfg.resolution)
    if ecfg.get("real_images"):
        return REAL_IMAGES[ecfg.real_images](count, ecfg.resolution)
    return None


def chosen_metrics(ecfg: Any) -> list[Metric]:
    """The metrics of ``eval.metrics`` (not built yet), less those whose input the eval config
    switches off (``eval.clip_model=null``: no CLIP score); each one left out is logged with why."""
    chosen = []
    for name in ecfg.metrics:
        metric = METRICS[name]()
        why_not = metric.enabled(ecfg)
        if why_not is None:
            chosen.append(metric)
        else:
            log.info("metric %s is off: %s", name, why_not)
    return chosen


class Scorer:
    """The chosen metrics (``eval.metrics``), each built once, and their bootstrap intervals.

    ``fid`` is the FID to real images when the eval has them, else to the dense model (other
    seeds); ``fid_real`` and ``fid_dense`` name their reference. With ``eval.bootstrap`` resamples,
    every metric ``<name>`` also gets ``<name>_ci95``: its 95 % interval ``[low, high]`` over prompts.

    Args:
        ecfg: the ``eval`` config.
        tokenizer: the pipeline's CLIP tokenizer (used by the tiny local CLIP).
    """

    def __init__(self, ecfg: Any, tokenizer: Any = None) -> None:
        self.ecfg = ecfg
        self.context = EvalContext(ecfg, tokenizer)
        self.metrics = chosen_metrics(ecfg)
        for metric in self.metrics:
            metric.build(ecfg, self.context)

    @property
    def feature_net(self) -> torch.nn.Module | None:
        """The FID feature network (``None`` when no FID metric is chosen)."""
        return self.context.feature_net

    def chosen(self) -> list[str]:
        """The names of the metrics it scores."""
        return [metric.name for metric in self.metrics]

    def weights(self) -> list[str | Path]:
        """Every file the chosen metrics load (they key the dense cache)."""
        return [file for metric in self.metrics for file in metric.weights()]

    def set_references(self, real: FidReference | None, dense: FidReference | None) -> None:
        """The reference statistics every later :meth:`score` compares with (``None``: no such FID)."""
        self.context.fid_real, self.context.fid_dense = real, dense

    def names(self) -> dict[str, str]:
        """``eval/<what>`` → what the numbers are measured with, and what ``eval/fid`` compares to."""
        names: dict[str, str] = {}
        for metric in self.metrics:
            names |= metric.about()
        chosen, ecfg = self.chosen(), self.ecfg
        if "fid_real" in chosen:
            names["eval/fid_reference"] = str(ecfg.reference_dir or ecfg.get("real_images"))
        elif "fid_dense" in chosen:
            names["eval/fid_reference"] = f"dense model, seeds from {ecfg.reference_seed}"
        if "fid_real" in chosen or "fid_dense" in chosen:
            names["eval/fid_resize"] = getattr(self.feature_net, "resize", "the feature net's own")
        return names

    def score(
        self, images: torch.Tensor, prompts: list[str], dense: torch.Tensor | None = None
    ) -> dict[str, float | list[float]]:
        """Every chosen metric of images (N, 3, H, W) in [0, 1], one per prompt.

        Args:
            images: The images to score.
            prompts: Their prompts.
            dense: The dense model's images of the same prompts and seeds; ``None`` when scoring
                the dense model itself (the metrics that compare with it are left out then).
        """
        self.context.dense = dense
        metrics: dict[str, float | list[float]] = {}
        for metric in self.metrics:
            if metric.versus_dense and dense is None:
                continue
            result = metric.score(images, prompts, self.context)
            metrics |= result.values
            if self.ecfg.bootstrap:
                metrics[f"{metric.name}_ci95"] = bootstrap_interval(
                    result.samples, result.reduce, self.ecfg.bootstrap, self.ecfg.seed, result.debias
                )
        fid = "fid_real" if "fid_real" in metrics else "fid_dense"
        for suffix in ("", "_ci95"):
            if fid + suffix in metrics:
                metrics["fid" + suffix] = metrics[fid + suffix]
        return metrics


def real_reference(
    ecfg: Any, count: int, feature_net: torch.nn.Module, cache_dir: str
) -> FidReference | None:
    """Feature statistics of the eval's real images (``None`` if it has none), cached on disk per
    image set, resolution and feature network, so a sweep computes them once."""
    from obsdiff.provenance import config_hash, files_fingerprint, library_versions

    if ecfg.source == "coco" and ecfg.reference_dir:
        return coco_reference(ecfg, feature_net, cache_dir)
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
    return _cached_reference(
        path, lambda: FidReference.from_images(load_real_images(ecfg, count), feature_net)
    )


def coco_reference(ecfg: Any, feature_net: torch.nn.Module, cache_dir: str) -> FidReference:
    """Feature statistics of the real COCO photos of exactly the protocol's image ids, centre-cropped
    and resized (:meth:`FidReference.from_files`), cached per image list, feature net and resize
    (:func:`obsdiff.evaluation.coco.reference_photos`)."""
    from obsdiff.evaluation.coco import reference_photos

    paths, key = reference_photos(ecfg, getattr(feature_net, "resize", type(feature_net).__name__))
    path = Path(cache_dir) / "fid_reference" / f"coco-{key}.safetensors"
    return _cached_reference(path, lambda: FidReference.from_files(paths, feature_net))


def _cached_reference(path: Path, compute: Callable[[], FidReference]) -> FidReference:
    """Reference statistics read from ``path``, or computed once and saved there."""

    def load() -> FidReference | None:
        if not path.exists():
            return None
        stats = load_file(str(path))
        return FidReference(stats["mean"], stats["cov"])

    def build() -> FidReference:
        reference = compute()
        stats = {"mean": reference.mean, "cov": reference.cov}
        atomic_write(path, lambda tmp: save_file(stats, str(tmp)))
        return reference

    return load_or_build(path, load, build, "real-image FID statistics")


def dense_baseline(
    adapter: ModelAdapter, pipe: Any, evalset: EvalSet, scorer: Scorer, cfg: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense images and metrics; sets the scorer's references. Dense generations and reference
    statistics are cached under ``cfg.cache_dir`` per model + eval config + chosen metrics and the
    files they load, so a sweep makes them once."""
    from obsdiff.provenance import config_hash, files_fingerprint, library_versions

    ecfg, chosen = cfg.eval, scorer.chosen()
    real = (
        real_reference(ecfg, len(evalset.prompts), scorer.feature_net, cfg.cache_dir)
        if "fid_real" in chosen
        else None
    )
    files = files_fingerprint(adapter.weights_location(cfg.model), *scorer.weights())
    what = {
        "model": cfg.model,
        "eval": cfg.eval,
        "metrics": chosen,
        "versions": library_versions(),
        "files": files,
    }
    key = config_hash(OmegaConf.create(what))
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
        if "fid_dense" in chosen:
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
