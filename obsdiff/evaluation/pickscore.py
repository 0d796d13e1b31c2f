"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on human preferences, through transformers.

The score of an image for its prompt is ``logit_scale.exp() * cos(E_image, E_text)`` (about 20–23
for good images), as in the authors' reference code. Only transformers is needed (no
torchvision); :class:`~obsdiff.evaluation.clip.TensorCLIP` unwraps the output objects that
``get_*_features`` return from transformers 5 on. Tests use a random CLIP (``clip.tiny_clip``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel, CLIPProcessor

from obsdiff.evaluation.clip import TensorCLIP, check_pairs, to_uint8

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore_v1 ships no processor: the authors use the one of the CLIP-H it was fine-tuned from.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_pickscore(
    model_path: str = PICKSCORE_MODEL, processor_path: str = PICKSCORE_PROCESSOR
) -> tuple[TensorCLIP, CLIPProcessor]:
    """Loads the PickScore model and its processor with ``from_pretrained`` (local folders or hub ids).

    Args:
        model_path: The PickScore_v1 weights (a folder, or the hub id; ``HF_HUB_OFFLINE=1`` needs
            them in the HF cache).
        processor_path: The CLIP-H processor (tokenizer + image preprocessing).
    """
    return TensorCLIP(CLIPModel.from_pretrained(model_path)), CLIPProcessor.from_pretrained(processor_path)


@torch.no_grad()
def pickscore(
    images: Tensor, prompts: list[str], model: TensorCLIP, processor: CLIPProcessor, batch_size: int = 16
) -> Tensor:
    """Per-image PickScore of images against their prompts.

    Args:
        images: Float images (N, 3, H, W) in [0, 1].
        prompts: One prompt per image.
        model: A wrapped CLIP model (:func:`load_pickscore`).
        processor: Its processor.
        batch_size: Image/prompt pairs per model call (the scores do not depend on it).

    Returns:
        Scores (N,), float32 on the CPU: ``logit_scale.exp() * cos(E_image, E_text)``.

    Raises:
        ValueError: When the batch is malformed or the counts differ.
    """
    check_pairs(images, prompts, "PickScore")
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(prompts), batch_size):
        pixels = processor.image_processor(
            list(to_uint8(images[start : start + batch_size])), return_tensors="pt"
        )
        text = processor.tokenizer(
            prompts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        image_embeds = F.normalize(model.get_image_features(pixels["pixel_values"].to(device)), dim=-1)
        text_embeds = F.normalize(
            model.get_text_features(text["input_ids"].to(device), text["attention_mask"].to(device)), dim=-1
        )
        scores.append(model.model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1))  # (B,)
    return torch.cat(scores).float().cpu()
