"""Generate images from pre-encoded prompts and score them (FID, CLIP score).

Dense results are cached per model + eval config, so a sweep generates them once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from obsdiff.calibration.prompts import load_prompts
from obsdiff.evaluation.clip import clip_score, load_clip, tiny_clip
from obsdiff.evaluation.fid import fid, get_feature_net
from obsdiff.models.base import ModelAdapter, slice_embeds

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class EvalSet:
    """Evaluation prompts, encoded once, with one seed per prompt."""

    prompts: list[str]
    embeds: dict
    seeds: list[int]


def prepare_eval_set(adapter: ModelAdapter, pipe: Any, ecfg: Any, max_sequence_length: int) -> EvalSet:
    """Load and encode the evaluation prompts (before the text encoders are offloaded)."""
    num = ecfg.num_prompts + ecfg.skip_prompts
    prompts = load_prompts(ecfg.source, num, ecfg.path, ecfg.column, ecfg.dataset, ecfg.split, group="eval")[
        ecfg.skip_prompts :
    ]
    embeds = adapter.encode(pipe, prompts, ecfg.guidance_scale, ecfg.batch_size, max_sequence_length)
    return EvalSet(prompts, embeds, [ecfg.seed + i for i in range(len(prompts))])


def generate(
    adapter: ModelAdapter, pipe: Any, evalset: EvalSet, ecfg: Any, seeds: list[int], desc: str
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, one generator per prompt."""
    images = []
    for start in tqdm(range(0, len(seeds), ecfg.batch_size), desc=desc, unit="batch", dynamic_ncols=True):
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


class Scorer:
    """FID against a reference set and CLIP score, with injectable networks from config.

    Args:
        ecfg: the ``eval`` config.
        tokenizer: the pipeline's CLIP tokenizer (used by the tiny local CLIP).
    """

    def __init__(self, ecfg: Any, tokenizer: Any = None) -> None:
        self.ecfg = ecfg
        self.feature_net = get_feature_net(ecfg.feature_net, ecfg.feature_weights)
        if ecfg.clip_model == "tiny":
            self.clip = lambda: tiny_clip(tokenizer, image_size=ecfg.resolution)
            self.clip_name = "tiny random CLIP (plumbing check, not a quality number)"
        else:
            self.clip = lambda: load_clip(ecfg.clip_model)
            self.clip_name = ecfg.clip_model

    def names(self) -> dict[str, str]:
        reference = self.ecfg.reference_dir or f"dense model, seeds from {self.ecfg.reference_seed}"
        return {
            "eval/fid_feature_net": self.ecfg.feature_net,
            "eval/fid_reference": str(reference),
            "eval/clip_network": self.clip_name,
        }

    def score(self, images: torch.Tensor, prompts: list[str], reference: torch.Tensor) -> dict[str, float]:
        return {
            "fid": fid(reference, images, self.feature_net),
            "clip_score": clip_score(images, prompts, self.clip),
        }


def dense_baseline(
    adapter: ModelAdapter, pipe: Any, evalset: EvalSet, scorer: Scorer, cfg: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Dense images, reference images and dense metrics, cached under ``cfg.cache_dir``."""
    from obsdiff.artifacts import config_hash, library_versions

    key = config_hash(
        OmegaConf.create({"model": cfg.model, "eval": cfg.eval, "versions": library_versions()})
    )
    cache = Path(cfg.cache_dir) / "dense" / f"{cfg.model.name}-{key}"
    if (cache / "metrics.json").exists():
        tensors = load_file(str(cache / "images.safetensors"))
        return tensors["dense"], tensors["reference"], json.loads((cache / "metrics.json").read_text())
    ecfg = cfg.eval
    dense = generate(adapter, pipe, evalset, ecfg, evalset.seeds, desc="dense images")
    if ecfg.reference_dir:
        reference = load_image_folder(ecfg.reference_dir, len(evalset.prompts), ecfg.resolution)
    else:
        ref_seeds = [ecfg.reference_seed + i for i in range(len(evalset.prompts))]
        reference = generate(adapter, pipe, evalset, ecfg, ref_seeds, desc="reference images")
    metrics = scorer.score(dense, evalset.prompts, reference)
    cache.mkdir(parents=True, exist_ok=True)
    save_file(
        {"dense": dense.contiguous(), "reference": reference.contiguous()}, str(cache / "images.safetensors")
    )
    (cache / "metrics.json").write_text(json.dumps(metrics))
    return dense, reference, metrics
