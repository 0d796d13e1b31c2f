"""CLIP score through torchmetrics, made to work with transformers >= 5.

torchmetrics' ``CLIPScore`` expects ``get_image_features``/``get_text_features`` to return the
projected embedding tensor. From transformers 5 on they return a ``BaseModelOutputWithPooling``
whose ``pooler_output`` holds the projected embedding; :class:`TensorCLIP` unwraps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.multimodal.clip_score import (
    _clip_score_update,  # private; torchmetrics <1.10 pin
)
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

try:  # transformers >= 5: the PIL backend gives the same pixels with or without torchvision
    from transformers import CLIPImageProcessorPil as TinyImageProcessor
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor as TinyImageProcessor

TINY_HIDDEN = 32
TINY_PROJECTION = 32


def _embedding(output: Any, embeds_name: str) -> Tensor:
    """Returns the projected embedding from whatever a CLIP ``get_*_features`` call returned.

    Args:
        output: A tensor (transformers < 5) or a model output object (transformers >= 5, where
            ``pooler_output`` is overwritten with the projected embedding).
        embeds_name: ``"image_embeds"`` or ``"text_embeds"``, preferred when the object has it.

    Raises:
        TypeError: When no embedding tensor can be found.
    """
    if isinstance(output, Tensor):
        return output
    for name in (embeds_name, "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"Cannot find a CLIP embedding tensor in {type(output).__name__}")


class TensorCLIP(nn.Module):
    """A ``CLIPModel`` whose feature methods always return (N, projection_dim) tensors."""

    def __init__(self, model: CLIPModel) -> None:
        """Wraps the model (kept in eval mode).

        Args:
            model: A transformers ``CLIPModel``.
        """
        super().__init__()
        self.model = model.eval()

    @property
    def config(self) -> CLIPConfig:
        """The wrapped model's config (torchmetrics reads ``text_config.max_position_embeddings``)."""
        return self.model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings.

        Args:
            pixel_values: Processor output (N, 3, S, S).

        Returns:
            Tensor (N, projection_dim).
        """
        return _embedding(self.model.get_image_features(pixel_values=pixel_values), "image_embeds")

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Projected text embeddings.

        Args:
            input_ids: Token ids (N, L).
            attention_mask: Optional mask (N, L).

        Returns:
            Tensor (N, projection_dim).
        """
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _embedding(output, "text_embeds")


def load_clip(path: str) -> tuple[TensorCLIP, CLIPProcessor]:
    """Loads a CLIP model and its processor with ``from_pretrained``.

    Args:
        path: Local folder or hub id (e.g. ``openai/clip-vit-large-patch14``).
    """
    return TensorCLIP(CLIPModel.from_pretrained(path)), CLIPProcessor.from_pretrained(path)


def tiny_clip(
    tokenizer: CLIPTokenizer, image_size: int = 32, seed: int = 0
) -> tuple[TensorCLIP, CLIPProcessor]:
    """A small randomly initialised CLIP built from a config (for tests; nothing is downloaded).

    Args:
        tokenizer: The tokenizer the processor uses; its size sets the text vocabulary.
        image_size: Input resolution of the vision tower and the image processor.
        seed: Seed of the weight initialisation (the global RNG state is left untouched).
    """
    layers = {
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    text_config = {
        **layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**layers, "image_size": image_size, "patch_size": max(image_size // 4, 1)}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=TINY_PROJECTION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = TinyImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return TensorCLIP(model), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def check_pairs(images: Tensor, prompts: list[str], scorer: str) -> None:
    """Raise ``ValueError`` unless ``images`` is a float (N, 3, H, W) batch with one prompt each."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{scorer} images must be float (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if images.shape[0] != len(prompts) or not prompts:
        raise ValueError(
            f"Need one prompt per image, got {images.shape[0]} images and {len(prompts)} prompts"
        )


def to_uint8(images: Tensor) -> Tensor:
    """Converts float [0, 1] images to uint8 [0, 255] (rounded), as torchmetrics' CLIPScore expects.

    Args:
        images: Float images (N, 3, H, W).
    """
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def clip_scores(
    images: Tensor,
    prompts: list[str],
    model_and_processor: Callable[[], tuple[TensorCLIP, CLIPProcessor]],
    batch_size: int = 32,
) -> Tensor:
    """Per-image CLIP scores ``100 * cos(E_image, E_text)`` (N,), float32, as torchmetrics'
    ``CLIPScore`` computes them before averaging.

    Args:
        images: Float images (N, 3, H, W) in [0, 1].
        prompts: One prompt per image.
        model_and_processor: Zero-argument callable returning ``(model, processor)``, e.g.
            ``lambda: load_clip(path)``.
        batch_size: Image/prompt pairs per model call.

    Raises:
        ValueError: When the batch is malformed or the counts differ.
    """
    check_pairs(images, prompts, "CLIP score")
    metric = CLIPScore(model_name_or_path=model_and_processor)
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = to_uint8(images[start : start + batch_size])
        scores.append(
            _clip_score_update(batch, prompts[start : start + batch_size], metric.model, metric.processor)[0]
        )
    return torch.cat(scores)


def mean_clip_score(scores: Tensor, batch_size: int = 32) -> float:
    """``max(mean, 0)`` of per-image scores, summed batch by batch in float32 as ``CLIPScore`` does
    (so the number equals its ``compute()`` bit for bit).

    Args:
        scores: Per-image scores (N,) from :func:`clip_scores`.
        batch_size: The batch size they were computed with.
    """
    total = torch.zeros((), dtype=scores.dtype)
    for batch in scores.split(batch_size):
        total += batch.sum(0)
    return float(torch.max(total / scores.shape[0], torch.zeros_like(total)))


def clip_score(
    images: Tensor,
    prompts: list[str],
    model_and_processor: Callable[[], tuple[TensorCLIP, CLIPProcessor]],
    batch_size: int = 32,
) -> float:
    """Mean CLIP score ``max(100 * mean cos(E_image, E_text), 0)`` of images against their prompts.

    Args:
        images: Float images (N, 3, H, W) in [0, 1].
        prompts: One prompt per image.
        model_and_processor: Zero-argument callable returning ``(model, processor)``, e.g.
            ``lambda: load_clip(path)``.
        batch_size: Image/prompt pairs per model call.

    Raises:
        ValueError: When the batch is malformed or the counts differ.
    """
    return mean_clip_score(clip_scores(images, prompts, model_and_processor, batch_size), batch_size)
