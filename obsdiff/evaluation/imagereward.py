"""ImageReward v1.0 (Xu et al., 2023): a BLIP reward model of human preference, through transformers.

The authors' model (``THUDM/ImageReward``, ``ImageReward.pt``) is BLIP's ViT-L/16 at 224 px, whose
image tokens a BERT-base attends to by cross-attention after each self-attention, and a linear head
(768 → 1024 → 128 → 64 → 16 → 1, no activations, dropouts off in eval) on the [CLS] output::

    r = MLP(BERT(ids, mask, encoder_hidden_states=ViT(image)).last_hidden_state[:, 0])
    score = (r - 0.16717362830052426) / 1.0333394966054072    # the reference's constants

The checkpoint's BLIP layout (timm ViT, BLIP's ``med.py`` BERT) is converted key by key into
transformers' ``BlipVisionModel`` and ``BlipTextModel`` (:meth:`ImageRewardModel.from_original_state_dict`),
so neither the authors' package nor torchvision is needed. Prompts are tokenised as the reference
does (bert-base-uncased plus BLIP's ``[DEC]`` and ``[ENC]`` tokens, padded and truncated to 35
tokens, [CLS] kept first). Images are preprocessed in torch (:func:`preprocess`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    PreTrainedTokenizerBase,
)

from obsdiff.evaluation.clip import check_pairs, to_uint8

IMAGEREWARD_MODEL = "THUDM/ImageReward"  # hub repo of ImageReward v1.0
IMAGEREWARD_FILE = "ImageReward.pt"  # its state dict
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # BLIP's tokenizer, before its two added tokens
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # the reference's normalisation
MAX_PROMPT_TOKENS = 35  # the reference pads and truncates every prompt to 35 tokens
VISION_HEADS, TEXT_HEADS = 16, 12  # ViT-L/16 and BERT-base (not recoverable from weight shapes)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1, None, None)  # after each linear layer (a no-op in eval mode)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Original key (fullmatch) -> key of ImageRewardModel; a text-encoder key keeps its name (transformers'
# BlipTextModel is a port of BLIP's med.py). The projections to the contrastive space and med.py's
# position_ids buffer are in the checkpoint but unused by the score.
_VIT = r"blip\.visual_encoder\."
_KEY_RULES = [
    (_VIT + r"cls_token", "vision.embeddings.class_embedding"),
    (_VIT + r"pos_embed", "vision.embeddings.position_embedding"),
    (_VIT + r"patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (_VIT + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm\2.\3"),
    (_VIT + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (_VIT + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (_VIT + r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (_VIT + r"norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    (r"blip\.text_encoder\.(embeddings\.(?:word|position)_embeddings\.weight)", r"text.\1"),
    (r"blip\.text_encoder\.(embeddings\.LayerNorm\.(?:weight|bias))", r"text.\1"),
    (r"blip\.text_encoder\.(encoder\.layer\.\d+\..+\.(?:weight|bias))", r"text.\1"),
    (r"mlp\.layers\.(\d+)\.(weight|bias)", r"mlp.\1.\2"),
]
_UNUSED_KEYS = (
    r"blip\.(?:vision_proj|text_proj)\.(?:weight|bias)|blip\.text_encoder\.embeddings\.position_ids"
)


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + the reward head; ``forward`` gives normalised rewards.

    Args:
        vision_config: The ViT (``layer_norm_eps=1e-6`` for BLIP's).
        text_config: The BERT (``is_decoder=True`` builds the cross-attention layers; it is run
            bidirectionally, as BLIP's multimodal encoder; ``encoder_hidden_size`` = ViT width).
    """

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        layers: list[nn.Module] = []
        width = text_config.hidden_size
        for out, dropout in zip(HEAD_WIDTHS, HEAD_DROPOUTS, strict=True):
            layers.append(nn.Linear(width, out))
            layers += [nn.Dropout(dropout)] if dropout else []
            width = out
        self.mlp = nn.Sequential(*layers)  # indices as the reference's mlp.layers
        self.eval()

    @property
    def image_size(self) -> int:
        """The ViT's input resolution (224 for v1.0)."""
        return self.vision.config.image_size

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised rewards (B,) of preprocessed images (B, 3, S, S) for tokenised prompts (B, L)."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + P, Dv)
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state  # (B, L, Dt); every image token is attended to
        reward = self.mlp(text[:, 0].float()).squeeze(-1)  # (B,) from [CLS]
        return (reward - REWARD_MEAN) / REWARD_STD

    @classmethod
    def from_original_state_dict(
        cls, state_dict: dict[str, Tensor], vision_heads: int = VISION_HEADS, text_heads: int = TEXT_HEADS
    ) -> ImageRewardModel:
        """Builds the model from a state dict in the reference's layout (``ImageReward.pt``).

        Sizes (widths, depths, image size, patch size, vocabulary) are read from the weight shapes.

        Args:
            state_dict: ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``.
            vision_heads: Attention heads of the ViT.
            text_heads: Attention heads of the BERT.

        Raises:
            ValueError: When a key has no place in the model, a weight is missing or a shape differs.
        """
        converted, unmatched = {}, []
        for key, value in state_dict.items():
            new_key = _convert_key(key)
            if new_key is None:
                unmatched += [] if re.fullmatch(_UNUSED_KEYS, key) else [key]
            else:
                converted[new_key] = value
        model = cls(*_configs(state_dict, vision_heads, text_heads))
        expected = model.state_dict()
        unexpected = [key for key in converted if key not in expected]
        missing = [key for key in expected if key not in converted]
        wrong = [
            f"{key} {tuple(converted[key].shape)} (model {tuple(value.shape)})"
            for key, value in expected.items()
            if key in converted and converted[key].shape != value.shape
        ]
        if unmatched or unexpected or missing or wrong:
            raise ValueError(
                "Not an ImageReward v1.0 state dict: "
                + "; ".join(
                    f"{what}: {', '.join(keys[:20])}{' …' if len(keys) > 20 else ''}"
                    for what, keys in (
                        ("unmatched keys", unmatched),
                        ("keys the model lacks", unexpected),
                        ("missing weights", missing),
                        ("wrong shapes", wrong),
                    )
                    if keys
                )
            )
        model.load_state_dict(converted)
        return model


def _convert_key(key: str) -> str | None:
    """The model's name for an original key, or ``None`` when no rule matches."""
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _shape(state_dict: dict[str, Tensor], key: str) -> torch.Size:
    if key not in state_dict:
        raise ValueError(f"Not an ImageReward v1.0 state dict: missing weights: {key}")
    return state_dict[key].shape


def _depth(state_dict: dict[str, Tensor], pattern: str) -> int:
    """Number of layers: 1 + the largest index ``(\\d+)`` of ``pattern`` among the keys."""
    indices = [int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))]
    return max(indices, default=-1) + 1


def _configs(
    state_dict: dict[str, Tensor], vision_heads: int, text_heads: int
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """The ViT and BERT configs of an original-layout state dict (sizes from its shapes)."""
    vit, bert = "blip.visual_encoder.", "blip.text_encoder."
    patch_size = _shape(state_dict, vit + "patch_embed.proj.weight")[-1]
    num_patches = _shape(state_dict, vit + "pos_embed")[1] - 1
    vision_width = _shape(state_dict, vit + "cls_token")[-1]
    vision = BlipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=_shape(state_dict, vit + "blocks.0.mlp.fc1.weight")[0],
        num_hidden_layers=_depth(state_dict, re.escape(vit) + r"blocks\.(\d+)\.norm1\.weight"),
        num_attention_heads=vision_heads,
        image_size=math.isqrt(num_patches) * patch_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,  # BLIP's ViT; transformers' default is 1e-5
    )
    vocab_size, text_width = _shape(state_dict, bert + "embeddings.word_embeddings.weight")
    layer0 = bert + "encoder.layer.0."
    text = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_width,
        encoder_hidden_size=_shape(state_dict, layer0 + "crossattention.self.key.weight")[1],
        intermediate_size=_shape(state_dict, layer0 + "intermediate.dense.weight")[0],
        num_hidden_layers=_depth(
            state_dict, re.escape(bert) + r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight"
        ),
        num_attention_heads=text_heads,
        max_position_embeddings=_shape(state_dict, bert + "embeddings.position_embeddings.weight")[0],
        layer_norm_eps=1e-12,  # med_config.json
        is_decoder=True,  # builds the cross-attention layers; forward runs it bidirectionally
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


def load_blip_tokenizer(path: str = IMAGEREWARD_TOKENIZER) -> PreTrainedTokenizerBase:
    """BERT's tokenizer with BLIP's added tokens (``[DEC]`` as bos, ``[ENC]``), as the reference builds it.

    Args:
        path: A tokenizer folder or hub id (``HF_HUB_OFFLINE=1`` needs it in the HF cache).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def checkpoint_file(path: str) -> Path:
    """The local ``ImageReward.pt``: ``path`` itself, ``path/ImageReward.pt``, or the hub file of
    repo ``path`` (downloaded, or read from the HF cache; ``HF_HUB_OFFLINE=1`` never downloads)."""
    if Path(path).is_file():
        return Path(path)
    if Path(path).is_dir():
        return Path(path) / IMAGEREWARD_FILE
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(path, IMAGEREWARD_FILE))


def load_imagereward(
    path: str = IMAGEREWARD_MODEL, tokenizer: str = IMAGEREWARD_TOKENIZER, device: str | torch.device = "cpu"
) -> tuple[ImageRewardModel, PreTrainedTokenizerBase]:
    """Loads ImageReward v1.0 (``ImageReward.pt``, a plain state dict) and its tokenizer.

    Args:
        path: The ``.pt`` file, a folder holding ``ImageReward.pt``, or the hub repo id.
        tokenizer: The BERT tokenizer (folder or hub id); BLIP's tokens are added to it.
        device: Where the model goes.

    Raises:
        ValueError: When the file is not an ImageReward state dict, or the tokenizer has more
            tokens than the model's vocabulary.
    """
    state_dict = torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)
    model = ImageRewardModel.from_original_state_dict(state_dict)
    blip_tokenizer = load_blip_tokenizer(tokenizer)
    if len(blip_tokenizer) > model.text.config.vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer!r} has {len(blip_tokenizer)} tokens, the ImageReward text encoder "
            f"{model.text.config.vocab_size}: use the tokenizer it was trained with (bert-base-uncased)"
        )
    return model.to(device), blip_tokenizer


def preprocess(images: Tensor, size: int) -> Tensor:
    """The reference's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, ``ToTensor``, ``Normalize``
    on 8-bit images, in torch.

    The reference reads 8-bit PIL images and PIL resizes them in two passes (width, then height),
    rounding to 8 bits after each. This does the same with ``F.interpolate(mode="bicubic",
    antialias=True)`` (PIL's kernel, a = -0.5, widened when downscaling) in float64: every value is
    within 1/255 of PIL's; on 1024² → 224² about 1 in 100,000 differs, on 320×256 → 280×224 about 1
    in 1,000 (PIL's fixed-point weights). One pass without the rounding between differs by up to
    2/255 in about 1 value in 10. The shorter side becomes ``size`` (the longer
    ``int(size * long / short)``), the centre crop starts at ``round((side - size) / 2)``, as
    torchvision's.

    Args:
        images: Float images (N, 3, H, W) in [0, 1] (rounded to 8 bits first).
        size: The model's resolution.

    Returns:
        Normalised pixels (N, 3, size, size), float32.
    """
    pixels = to_uint8(images).double() / 255
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    resized = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
    for shape in ((height, resized[1]), resized):  # width pass, then height pass
        if tuple(pixels.shape[-2:]) != shape:
            pixels = F.interpolate(pixels, size=shape, mode="bicubic", align_corners=False, antialias=True)
            pixels = (pixels.clamp(0, 1) * 255).round() / 255
    top, left = round((resized[0] - size) / 2), round((resized[1] - size) / 2)
    pixels = pixels[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels - mean) / std).float()


@torch.no_grad()
def imagereward(
    images: Tensor,
    prompts: list[str],
    model: ImageRewardModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 16,
) -> Tensor:
    """Per-image ImageReward v1.0 scores of images for their prompts.

    Args:
        images: Float images (N, 3, H, W) in [0, 1].
        prompts: One prompt per image.
        model: The reward model (:func:`load_imagereward`).
        tokenizer: Its tokenizer (:func:`load_blip_tokenizer`).
        batch_size: Image/prompt pairs per model call (the scores do not depend on it).

    Returns:
        Scores (N,), float32 on the CPU (about 0 for an average generated image, higher is better).

    Raises:
        ValueError: When the batch is malformed or the counts differ.
    """
    check_pairs(images, prompts, "ImageReward")
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(prompts), batch_size):
        pixels = preprocess(images[start : start + batch_size].to(device), model.image_size)
        text = tokenizer(
            prompts[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        )
        scores.append(model(pixels, text["input_ids"].to(device), text["attention_mask"].to(device)))
    return torch.cat(scores).float().cpu()
