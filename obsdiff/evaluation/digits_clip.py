"""A small CLIP trained on the digits images and captions: a real CLIP score for the tiny model.

Image and text towers are a stock transformers ``CLIPModel`` (32×32 images in 4×4 patches; text
through the embedded model's own tokenizer, ``obsdiff/models/tiny_digits/tokenizer``), trained
contrastively on coloured training digits and their captions by
``experiments/tiny_digits/train_clip.py``. The shipped weights (``digits_clip.safetensors``) and
their record (``digits_clip.json``: sizes, held-out zero-shot accuracies, floors the tests check)
are made by ``python -m experiments.tiny_digits.train --stages clip``.

:func:`load_digits_clip` returns ``(TensorCLIP, CLIPProcessor)``, the pair
:func:`obsdiff.evaluation.clip.clip_score` takes (``eval.clip_model: digits``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from obsdiff.evaluation.clip import TensorCLIP, TinyImageProcessor
from obsdiff.models.digits_data import COLOUR_NAMES, IMAGE_SIZE, NUM_DIGITS, TEMPLATES, Caption, make_caption

WEIGHTS_FILE = "digits_clip.safetensors"
RECORD_FILE = "digits_clip.json"
PARTS = ("digit", "fg", "bg")


def _package_file(name: str) -> Path:
    """Path of a file shipped next to this module."""
    return Path(str(resources.files(__package__).joinpath(name)))


def tokenizer_dir() -> Path:
    """The embedded digits model's CLIP tokenizer folder (every caption word is one token)."""
    return Path(str(resources.files("obsdiff.models").joinpath("tiny_digits", "tokenizer")))


def load_tokenizer() -> CLIPTokenizer:
    """The embedded digits model's CLIP tokenizer, offline."""
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)


def digits_clip_config(
    tokenizer: CLIPTokenizer,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    patch: int,
    projection: int,
) -> CLIPConfig:
    """The CLIP config: both towers of the same width and depth, images at the digits' 32 px.

    Args:
        tokenizer: The tokenizer; it sets the vocabulary, context length and special tokens.
        hidden: Width of both towers.
        layers: Transformer layers of each tower.
        heads: Attention heads of each tower.
        intermediate: MLP width of each tower.
        patch: Side of the square image patches.
        projection: Width of the joint embedding.
    """
    tower = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }
    text_config = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**tower, "image_size": IMAGE_SIZE, "patch_size": patch}
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection)


def digits_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """The processor: images resized to 32×32 and normalised as CLIP does, text by ``tokenizer``."""
    image_processor = TinyImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pixel_values(images: Tensor, processor: CLIPProcessor) -> Tensor:
    """Normalises 32×32 images as ``processor`` does, in torch (for training and batched scoring).

    Args:
        images: Float images (N, 3, 32, 32) in [0, 1].
        processor: The processor whose mean and std apply.
    """
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected 32×32 images, got {tuple(images.shape)}")
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def clip_record(path: str | Path | None = None) -> dict:
    """The shipped record: architecture, training settings, held-out accuracies and test floors.

    Args:
        path: A record JSON; the packaged ``digits_clip.json`` by default.
    """
    return json.loads(Path(path or _package_file(RECORD_FILE)).read_text(encoding="utf-8"))


def shipped_weights() -> Path:
    """The shipped weights file."""
    return _package_file(WEIGHTS_FILE)


def load_digits_clip(
    weights_path: str | Path | None = None, record_path: str | Path | None = None
) -> tuple[TensorCLIP, CLIPProcessor]:
    """Builds the digits CLIP and loads trained weights (strictly, on CPU, no download).

    Args:
        weights_path: A safetensors state dict; the shipped weights by default.
        record_path: The record whose ``architecture`` gives the sizes; the shipped one by default.

    Returns:
        The model (eval mode, gradients disabled) and its processor.
    """
    tokenizer = load_tokenizer()
    config = digits_clip_config(tokenizer, **clip_record(record_path)["architecture"])
    model = CLIPModel(config)
    model.load_state_dict(load_file(str(weights_path or shipped_weights())), strict=True)
    return TensorCLIP(model.requires_grad_(False)), digits_processor(tokenizer)


def all_captions(template: int) -> list[Caption]:
    """One caption per digit / foreground / background combination (fg ≠ bg), in a fixed order."""
    colours = range(len(COLOUR_NAMES))
    return [
        make_caption(digit, fg, bg, template)
        for digit in range(NUM_DIGITS)
        for fg in colours
        for bg in colours
        if fg != bg
    ]


@torch.no_grad()
def text_embeddings(model: TensorCLIP, processor: CLIPProcessor, texts: list[str]) -> Tensor:
    """Unit-length text embeddings (N, projection_dim)."""
    tokens = processor.tokenizer(texts, return_tensors="pt", padding=True)
    return F.normalize(model.get_text_features(tokens["input_ids"], tokens["attention_mask"]), dim=-1)


@torch.no_grad()
def image_embeddings(model: TensorCLIP, processor: CLIPProcessor, images: Tensor) -> Tensor:
    """Unit-length image embeddings (N, projection_dim) of float 32×32 images in [0, 1]."""
    return F.normalize(model.get_image_features(pixel_values(images, processor)), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(
    model: TensorCLIP, processor: CLIPProcessor, images: Tensor, captions: list[Caption]
) -> dict[str, float]:
    """Zero-shot reading of digit and colours: each image's nearest of all 560 combinations.

    A combination's text embedding is the mean over the caption templates (renormalised); the
    image takes the digit, foreground and background of the most similar one.

    Args:
        model: The CLIP.
        processor: Its processor.
        images: Float images (N, 3, 32, 32) in [0, 1].
        captions: What each image shows.

    Returns:
        Fractions in [0, 1]: ``digit``, ``fg``, ``bg`` right, and ``all`` (all three right).
    """
    combos = all_captions(0)
    per_template = [
        text_embeddings(model, processor, [c.text for c in all_captions(t)]) for t in range(len(TEMPLATES))
    ]
    classes = F.normalize(torch.stack(per_template).mean(0), dim=-1)  # (560, D)
    best = (image_embeddings(model, processor, images) @ classes.T).argmax(1)
    hits = {
        part: torch.tensor([getattr(combos[i], part) for i in best.tolist()])
        == torch.tensor([getattr(c, part) for c in captions])
        for part in PARTS
    }
    hits["all"] = hits["digit"] & hits["fg"] & hits["bg"]
    return {name: hit.float().mean().item() for name, hit in hits.items()}
