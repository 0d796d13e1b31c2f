"""Sizes and fresh (untrained) components of the tiny digits Flux pipeline.

Every component is a stock class of ``FluxPipeline``: the SD3 digits model's trained
``AutoencoderKL`` (32×32 RGB ↔ 16×16×4 latents, reused as is), a ``FluxTransformer2DModel`` (2
double-stream and 4 single-stream blocks, 4 heads of 24 = width 96, MLP 384, no guidance embedding;
Flux packs 2×2 latent patches, so 64 image tokens of 16 channels), a ``CLIPTextModel`` (width 32;
Flux reads only its pooled vector), a ``T5EncoderModel`` (width 64; its 16 tokens are all the
joint attention sees of the prompt), the SD3 model's CLIP tokenizer and a T5 tokenizer over the
same caption words, and ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's
resolution-dependent shift.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from experiments.tiny_digits.components import TEXT_ENCODER_CONFIG
from obsdiff.models.digits_data import caption_corpus
from obsdiff.models.tiny_flux import build_t5_tokenizer, new_clip_text_encoder, new_t5_encoder

# T5 context length: the longest caption is 11 words plus a comma and </s>; the pipeline pads
# every prompt to max_sequence_length (pass 16 when sampling: its default is 512).
MAX_SEQUENCE_LENGTH = 16
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels × a packed 2×2 patch
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 10, 10),  # (unused text/image axis, rows, columns); sums to the head dim
}
# The SD3 model's CLIP encoders without their projection: Flux's CLIPTextModel pools to the width.
CLIP_CONFIG = {key: value for key, value in TEXT_ENCODER_CONFIG.items() if key != "projection_dim"}
T5_CONFIG = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 3,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": MAX_SEQUENCE_LENGTH,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


def new_t5_tokenizer() -> T5TokenizerFast:
    """A word-level T5 tokenizer in which every word of every project caption is a single token."""
    return build_t5_tokenizer(caption_corpus(), MAX_SEQUENCE_LENGTH)


def new_transformer(seed: int) -> FluxTransformer2DModel:
    """A randomly initialised Flux denoiser (seeded) with DiT's adaLN-Zero initialisation.

    The modulation layers of every block (image and text streams of the double blocks, the joint
    stream of the single blocks), the final modulation and the output projection start at zero, as
    in the SD3 recipe: every block starts as the identity and the network predicts zero velocity.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    zeroed = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zeroed += [block.norm1.linear, block.norm1_context.linear]
    zeroed += [block.norm.linear for block in transformer.single_transformer_blocks]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


def new_clip_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder with the tokenizer's vocabulary and ids (seeded)."""
    torch.manual_seed(seed)
    return new_clip_text_encoder(CLIP_CONFIG, tokenizer)


def new_t5(tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    """A randomly initialised T5 encoder with the tokenizer's vocabulary and ids (seeded)."""
    torch.manual_seed(seed)
    return new_t5_encoder(T5_CONFIG, tokenizer)


def assemble(
    vae: AutoencoderKL,
    transformer: FluxTransformer2DModel,
    text_encoders: tuple[CLIPTextModel, T5EncoderModel],
    tokenizers: tuple[CLIPTokenizer, T5TokenizerFast],
) -> FluxPipeline:
    """The stock Flux pipeline around the given components, in eval mode."""
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoders[0].eval(),
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1].eval(),
        tokenizer_2=tokenizers[1],
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | Path) -> FluxPipeline:
    """Loads a saved digits Flux pipeline with the stock loader, offline."""
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
