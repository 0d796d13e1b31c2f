"""Tiny random-weight SDXL and SD2.1 pipelines, built offline from ``tiny_sdxl.json`` / ``tiny_sd21.json``.

Stock diffusers/transformers classes only: a ``UNet2DConditionModel`` with linear ``proj_in``/
``proj_out`` (as SDXL and SD2.1), an ``AutoencoderKL``, CLIP text encoders sized by the config
with the project-built tokenizer of ``tiny_sd3`` (nothing is downloaded), an Euler scheduler.

- tiny SDXL: SDXL's layout scaled down: no attention in the first stage, two transformer blocks
  per ``Transformer2DModel`` in the second (SDXL: 1, 2, 10), 12 blocks (down 4, mid 2, up 6),
  two text encoders whose hidden states concatenate to the cross-attention width (64) and the
  ``text_time`` added conditioning (pooled text + 6 size ids).
- tiny SD2.1: cross-attention in both stages at two widths (32 and 64 channels), one CLIP text
  encoder (32 = the cross-attention width), 7 blocks (down 2, mid 1, up 4).

Every build is bit-identical: each component right after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from obsdiff.models.tiny_sd3 import build_tokenizer, clip_text_config, tiny_vocabulary_words

TINY_SDXL = Path(__file__).with_name("tiny_sdxl.json")
TINY_SD21 = Path(__file__).with_name("tiny_sd21.json")


def _components(config_path: Path) -> tuple[dict[str, Any], Any, UNet2DConditionModel, AutoencoderKL]:
    config = json.loads(Path(config_path).read_text())
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = build_tokenizer(tiny_vocabulary_words(), Path(vocab_dir))
    torch.manual_seed(config["seed"])
    unet = UNet2DConditionModel(**config["unet"]).eval()
    torch.manual_seed(config["seed"])
    vae = AutoencoderKL(**config["vae"]).eval()
    return config, tokenizer, unet, vae


def build_tiny_sdxl_pipeline(config_path: Path = TINY_SDXL) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline on CPU in float32 (no watermarker); identical weights on every call."""
    config, tokenizer, unet, vae = _components(config_path)
    text = clip_text_config(config["text_encoder"], tokenizer)
    torch.manual_seed(config["seed"])
    text_encoder = CLIPTextModel(text).eval()
    torch.manual_seed(config["seed"] + 1)  # a different draw: two identical encoders would be degenerate
    text_encoder_2 = CLIPTextModelWithProjection(text).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**config["scheduler"]),
        add_watermarker=False,
    )


def build_tiny_sd21_pipeline(config_path: Path = TINY_SD21) -> StableDiffusionPipeline:
    """The tiny SD2.1 pipeline on CPU in float32 (no safety checker); identical weights on every call."""
    config, tokenizer, unet, vae = _components(config_path)
    torch.manual_seed(config["seed"])
    text_encoder = CLIPTextModel(clip_text_config(config["text_encoder"], tokenizer)).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**config["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
