"""Sizes and fresh (untrained) components of the tiny digits SD3 pipeline.

Every component is a stock class of ``StableDiffusion3Pipeline``: ``AutoencoderKL`` (32×32 RGB ↔
16×16×4 latents), ``SD3Transformer2DModel`` (4 MMDiT blocks, 4 heads of 24 = width 96, FFN 384,
patch 2: 64 image tokens), two ``CLIPTextModelWithProjection`` (width 32 each, concatenated to the
joint width 64; 16 tokens), one ``CLIPTokenizer`` in both slots whose vocabulary is built from the
captions the project writes (every caption word is one token), no T5,
``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from obsdiff.models.digits_data import caption_corpus
from obsdiff.models.tiny_sd3 import build_tokenizer, clip_text_config

LATENT_SIZE = 16
# CLIP context length: the longest caption is 12 tokens with <|startoftext|> and <|endoftext|>; the
# pipeline pads to the tokenizer's model_max_length, so 16 instead of 77 saves 61 padding tokens
# (every MMDiT block attends over them).
TEXT_TOKENS = 16
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 1,
    "sample_size": 32,
    "force_upcast": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TRANSFORMER_CONFIG = {
    "sample_size": LATENT_SIZE,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "joint_attention_dim": 64,
    "caption_projection_dim": 96,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": LATENT_SIZE // 2,
}
TEXT_ENCODER_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "projection_dim": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": TEXT_TOKENS,
    "hidden_act": "gelu",
}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}


def new_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of every project caption is a single token."""
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = build_tokenizer(caption_corpus(), Path(vocab_dir))
    tokenizer.model_max_length = TEXT_TOKENS
    return tokenizer


def new_vae(seed: int) -> AutoencoderKL:
    """A randomly initialised VAE (seeded)."""
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def new_transformer(seed: int) -> SD3Transformer2DModel:
    """A randomly initialised MMDiT denoiser (seeded) with DiT's adaLN-Zero initialisation.

    Every modulation layer and the output projection start at zero (Peebles & Xie 2023, §3.2), so
    each block starts as the identity and the network predicts zero velocity; this trains faster
    than the default initialisation of the stock class.
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    zeroed = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zeroed += [block.norm1.linear, block.norm1_context.linear]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


def new_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text encoder with the tokenizer's vocabulary and ids (seeded)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(clip_text_config(TEXT_ENCODER_CONFIG, tokenizer))


def assemble(
    vae: AutoencoderKL,
    transformer: SD3Transformer2DModel,
    text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
    tokenizer: CLIPTokenizer,
    shift: float = SCHEDULER_CONFIG["shift"],
) -> StableDiffusion3Pipeline:
    """The stock SD3 pipeline around the given components (no T5), in eval mode."""
    scheduler = FlowMatchEulerDiscreteScheduler(**{**SCHEDULER_CONFIG, "shift": shift})
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoders[0].eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1].eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | Path) -> StableDiffusion3Pipeline:
    """Loads a saved digits pipeline with the stock loader, offline, without T5."""
    pipe = StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
