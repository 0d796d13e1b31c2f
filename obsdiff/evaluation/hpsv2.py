"""Human Preference Score v2 / v2.1 (Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on human
preferences, run through transformers' ``CLIPModel`` (no open_clip, no torchvision).

The authors' scorer (``hpsv2/img_score.py``) loads ``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt`` (hub repo ``xswu/HPSv2``, an open_clip state dict under
``'state_dict'``) and scores an image for its prompt as ``cos(E_image, E_text)``: open_clip's
``output_dict`` forward returns normalised features and the score is their dot product, with no
``logit_scale`` (about 0.2–0.3 for real images). :func:`clip_from_open_clip_state_dict` maps those
weights onto a ``CLIPModel``; :func:`preprocess` repeats the reference's image transform in torch.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from obsdiff.evaluation.clip import TensorCLIP, check_pairs, to_uint8

HPS_REPO = "xswu/HPSv2"
HPSV2_FILE = f"{HPS_REPO}/HPS_v2_compressed.pt"
HPSV21_FILE = f"{HPS_REPO}/HPS_v2.1_compressed.pt"
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP BPE of the CLIP-H it was tuned from
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's ViT-H-14 (model_configs/ViT-H-14.json): heads = width // head_width; the vision tower
# sets head_width 80 (1280 / 80 = 16 heads), the text tower keeps 64 (1024 / 64 = 16 heads).
VISION_HEAD_WIDTH, TEXT_HEAD_WIDTH = 80, 64

# open_clip name → CLIPModel name, outside the residual blocks; (W, E) projections are transposed.
_TOP_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED_KEYS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_KEYS = {  # inside transformer.resblocks.<i>. (attn.in_proj_* is split into q, k, v)
    f"{open_clip}.{kind}": f"{hf}.{kind}"
    for open_clip, hf in {
        "ln_1": "layer_norm1",
        "attn.out_proj": "self_attn.out_proj",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }.items()
    for kind in ("weight", "bias")
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _layers(state_dict: dict[str, Tensor], prefix: str) -> int:
    """Residual blocks under ``prefix`` (their indices must run 0 … L-1)."""
    indices = {int(m[2]) for k in state_dict if (m := _BLOCK.match(k)) and (m[1] or "") == prefix}
    if indices != set(range(len(indices))) or not indices:
        tower = "vision" if prefix else "text"
        raise ValueError(f"open_clip state dict: {tower} blocks {sorted(indices)} are not 0 … L-1")
    return len(indices)


def _config(state_dict: dict[str, Tensor], vision_head_width: int, text_head_width: int) -> CLIPConfig:
    """A ``CLIPConfig`` with the sizes the open_clip weights have (heads = width // head width)."""
    blocks = [f"{tower}transformer.resblocks.0.mlp.c_fc.weight" for tower in ("visual.", "")]
    required = [*_TOP_KEYS, *_TRANSPOSED_KEYS, *blocks]
    if missing := [k for k in required if k not in state_dict]:
        raise ValueError(f"Not an open_clip ViT CLIP state dict: missing {missing}")
    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape  # (W, 3, P, P)
    positions = state_dict["visual.positional_embedding"].shape[0]  # class token + grid²
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{positions} vision positions are not a square grid plus the class token")
    vocab, text_width = state_dict["token_embedding.weight"].shape
    vision_layers, text_layers = _layers(state_dict, "visual."), _layers(state_dict, "")
    widths = {"vision": (vision_width, vision_head_width), "text": (text_width, text_head_width)}
    for tower, (width, head_width) in widths.items():
        if width % head_width:
            raise ValueError(f"{tower} width {width} is not a multiple of the head width {head_width}")
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5}  # nn.GELU (not QuickGELU), LayerNorm eps
    vision = {
        **common,
        "hidden_size": vision_width,
        "intermediate_size": state_dict[blocks[0]].shape[0],
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_width // vision_head_width,
        "patch_size": patch,
        "image_size": patch * grid,
    }
    # open_clip pools the text at ids.argmax(-1): the first EOT, the highest id of its vocabulary.
    # HF pools at the first ``eos_token_id``: the same token when that is ``vocab - 1``.
    text = {
        **common,
        "hidden_size": text_width,
        "intermediate_size": state_dict[blocks[1]].shape[0],
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_width // text_head_width,
        "vocab_size": vocab,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0,  # open_clip pads with 0 after the EOT (never attended to by the EOT)
    }
    projection_dim = state_dict["text_projection"].shape[1]
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _is_causal_mask(value: Tensor) -> bool:
    """Whether ``value`` is open_clip's (L, L) causal mask buffer (-inf above the diagonal)."""
    if value.ndim != 2 or value.shape[0] != value.shape[1]:
        return False
    upper = torch.ones(value.shape, dtype=torch.bool).triu(1)
    return bool(value[upper].isneginf().all() and (value[~upper] == 0).all())


def _mapped(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The weights under ``CLIPModel`` names (float32), and the open_clip keys that map to none."""
    out, unmatched = {}, []
    for key, value in state_dict.items():
        value = value.float()
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key in _TRANSPOSED_KEYS:
            out[_TRANSPOSED_KEYS[key]] = value.t().contiguous()  # x @ proj == Linear(weight=proj.T)
        elif match := _BLOCK.match(key):
            tower, index, name = match.groups()
            layer = f"{'vision' if tower else 'text'}_model.encoder.layers.{index}"
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):  # q, k, v stacked along dim 0
                kind = name.rpartition("_")[2]
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{layer}.self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            elif name in _BLOCK_KEYS:
                out[f"{layer}.{_BLOCK_KEYS[name]}"] = value
            else:
                unmatched.append(key)
        elif not (key.endswith("attn_mask") and _is_causal_mask(value)):  # rebuilt by HF
            unmatched.append(key)
    return out, unmatched


def clip_from_open_clip_state_dict(
    state_dict: dict[str, Tensor],
    vision_head_width: int = VISION_HEAD_WIDTH,
    text_head_width: int = TEXT_HEAD_WIDTH,
) -> CLIPModel:
    """A ``CLIPModel`` (float32, eval mode) holding the weights of an open_clip ViT CLIP.

    Sizes come from the tensor shapes; the head counts (not visible in the shapes) from the head
    widths (open_clip ViT-H-14: 80 for the vision tower, 64 for the text tower).

    Args:
        state_dict: open_clip keys (``visual.conv1.weight``, ``transformer.resblocks.0.attn.
            in_proj_weight``, ``text_projection``, ...), without a ``module.`` prefix.
        vision_head_width: Channels per vision attention head.
        text_head_width: Channels per text attention head.

    Raises:
        ValueError: When keys are missing or left over (all are listed), or sizes do not fit.
    """
    config = _config(state_dict, vision_head_width, text_head_width)
    weights, unmatched = _mapped(state_dict)
    if unmatched:
        raise ValueError(f"open_clip keys with no CLIPModel counterpart: {unmatched}")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the RNG as it was
        model = CLIPModel(config)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"open_clip weights do not fill the CLIPModel: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model.eval()


def open_clip_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model weights of a checkpoint: its ``'state_dict'`` if it has one, ``module.`` stripped."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"An HPS checkpoint holds a state dict, not a {type(checkpoint).__name__}")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _checkpoint_file(location: str) -> Path:
    """A local file, or ``<owner>/<repo>/<file>`` on the hub (``HF_HUB_OFFLINE=1``: the HF cache)."""
    if Path(location).is_file():
        return Path(location)
    parts = location.split("/")
    if len(parts) < 3 or Path(location).is_absolute() or location.startswith("."):
        raise ValueError(f"HPS checkpoint {location!r} is neither a file nor '<owner>/<repo>/<file>'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError as err:  # offline (or unreachable) and not in the HF cache
        raise ValueError(
            f"HPS checkpoint {location!r} is not in the HF cache and cannot be downloaded: fetch it "
            f"once online (hf download {repo} {filename}) or point the config at a local file"
        ) from err


def _read(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """A checkpoint's contents: safetensors, or a torch file unpickled with ``weights_only``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            raise
        raise ValueError(
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses. "
            "If you trust the file, load it once with load_hpsv2(..., trust_pickle=True) (this runs "
            "the pickle's code) and save its state_dict with safetensors.torch.save_file; point the "
            f"config at the .safetensors file. ({err})"
        ) from err


def load_hpsv2(
    checkpoint: str | Path = HPSV21_FILE,
    tokenizer: str | CLIPTokenizer = HPS_TOKENIZER,
    trust_pickle: bool = False,
) -> tuple[TensorCLIP, CLIPTokenizer]:
    """Loads an HPS v2 / v2.1 checkpoint into a wrapped ``CLIPModel``, with its tokenizer.

    Args:
        checkpoint: A local ``.pt`` / ``.safetensors`` file, or ``<owner>/<repo>/<file>`` on the hub
            (:data:`HPSV2_FILE`, :data:`HPSV21_FILE`; ``HF_HUB_OFFLINE=1`` needs it in the HF cache).
        tokenizer: A CLIP tokenizer, or its folder / hub id (``CLIPTokenizer.from_pretrained``).
        trust_pickle: Unpickle arbitrary objects (``weights_only=False``): only for trusted files.

    Raises:
        ValueError: When the file is not an open_clip ViT CLIP, or the tokenizer does not fit it.
    """
    path = _checkpoint_file(str(checkpoint))
    model = TensorCLIP(clip_from_open_clip_state_dict(open_clip_state_dict(_read(path, trust_pickle))))
    if isinstance(tokenizer, str):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
    _check_tokenizer(model, tokenizer)
    return model, tokenizer


def _check_tokenizer(model: TensorCLIP, tokenizer: CLIPTokenizer) -> None:
    """The tokenizer's EOT must be the token the model pools at, and its ids must fit the vocabulary."""
    text_config = model.config.text_config
    if tokenizer.eos_token_id != text_config.eos_token_id or len(tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"The tokenizer (EOT id {tokenizer.eos_token_id}, {len(tokenizer)} tokens) does not fit the "
            f"HPS model (EOT id {text_config.eos_token_id}, vocabulary {text_config.vocab_size})"
        )


def preprocess(images: Tensor, size: int) -> Tensor:
    """The reference's image transform (open_clip ``ResizeMaxSize`` + normalise), in torch.

    The authors' scorer reads 8-bit images, turns them into [0, 1] floats, resizes the longest side
    to ``size`` (bicubic on the float tensor, sides ``round(side * scale)``, no clamping), pads the
    short side with zeros (centred, the odd pixel right/bottom) and normalises with OpenAI's CLIP
    mean/std. Not the shortest-side resize + centre crop of plain CLIP; square images get the same.
    The resize is antialiased, as torchvision >= 0.17 resizes tensors (0.15/0.16 did not); an image
    whose longest side already is ``size`` is padded too (the reference would leave it non-square).

    Args:
        images: Float images (N, 3, H, W) in [0, 1]; quantised to 8 bits first, as a saved PNG is.
        size: The model's input side (224 for ViT-H-14).

    Returns:
        Normalised pixels (N, 3, size, size), float32.
    """
    pixels = to_uint8(images).float() / 255  # (N, 3, H, W)
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_size = (round(height * scale), round(width * scale))
        pixels = F.interpolate(pixels, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - pixels.shape[-2], size - pixels.shape[-1]
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def hps_score(
    images: Tensor, prompts: list[str], model: TensorCLIP, tokenizer: CLIPTokenizer, batch_size: int = 16
) -> Tensor:
    """Per-image HPS of images against their prompts: ``cos(E_image, E_text)`` (no logit scale).

    Args:
        images: Float images (N, 3, H, W) in [0, 1].
        prompts: One prompt per image.
        model: A wrapped HPS CLIP (:func:`load_hpsv2`).
        tokenizer: Its CLIP tokenizer (truncates to the model's 77 positions, keeping the EOT).
        batch_size: Image/prompt pairs per model call (the scores do not depend on it).

    Returns:
        Scores (N,), float32 on the CPU.

    Raises:
        ValueError: When the batch is malformed, the counts differ or the tokenizer does not fit.
    """
    check_pairs(images, prompts, "HPS")
    _check_tokenizer(model, tokenizer)
    parameter = next(model.parameters())
    device = parameter.device
    size, context = model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(prompts), batch_size):
        pixels = preprocess(images[start : start + batch_size], size).to(parameter)
        text = tokenizer(
            prompts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=context,
            return_tensors="pt",
        )
        image_embeds = F.normalize(model.get_image_features(pixels), dim=-1)
        text_embeds = model.get_text_features(text["input_ids"].to(device), text["attention_mask"].to(device))
        text_embeds = F.normalize(text_embeds, dim=-1)
        scores.append((image_embeds * text_embeds).sum(-1))  # (B,)
    return torch.cat(scores).float().cpu()
