"""Stage 2, Flux family: train the Flux denoiser jointly with its CLIP and T5 text encoders.

The objective is the SD3 recipe's (rectified flow, logit-normal ``t``, velocity target ``ε − x_0``;
see :mod:`experiments.tiny_digits.train_denoiser`), in Flux's layout: latents are packed into 2×2
patches (64 tokens of 16 channels) with the pipeline's own ``_pack_latents`` and position ids, the
T5 sequence is the joint attention's text, CLIP's pooled vector joins the timestep embedding, and
the timestep is passed as ``t`` in [0, 1] (the transformer scales it by 1000, as the pipeline
expects). Captions go through the pipeline's own ``encode_prompt`` (with gradients).

Guidance: no guidance embedding; 10 % of captions are replaced by the empty prompt, so sampling
uses true classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline

from experiments.tiny_digits.components import new_tokenizer
from experiments.tiny_digits.components_flux import (
    MAX_SEQUENCE_LENGTH,
    assemble,
    new_clip_encoder,
    new_t5,
    new_t5_tokenizer,
    new_transformer,
)
from experiments.tiny_digits.train_denoiser import DenoiserSettings, optimise


@dataclass
class FluxDenoiserSettings(DenoiserSettings):
    """The SD3 stage's settings with the Flux schedule (``long_context_prob`` is not used)."""

    steps: int = 6000


def flux_flow_loss(
    pipe: FluxPipeline, z0: torch.Tensor, texts: list[str], generator: torch.Generator
) -> torch.Tensor:
    """Rectified-flow velocity loss of one batch of normalised latents (B, 4, 16, 16)."""
    batch, channels, height, width = z0.shape
    t = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(z0.shape, generator=generator)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * z0 + t_ * noise
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=texts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, z0.device, z0.dtype)
    velocity = pipe.transformer(
        hidden_states=pipe._pack_latents(x_t, batch, channels, height, width),
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids,
        txt_ids=text_ids,
    ).sample
    target = pipe._pack_latents(noise - z0, batch, channels, height, width)
    return (velocity - target).square().mean()


def train_flux_denoiser(
    vae: AutoencoderKL,
    settings: FluxDenoiserSettings,
    log_every: int = 100,
    snapshot_every: int = 0,
    snapshot_dir: Path | None = None,
) -> FluxPipeline:
    """Trains the Flux transformer, CLIP and T5; returns the pipeline with averaged weights.

    Args:
        vae: The trained VAE of the SD3 digits model (frozen), with latent normalisation set.
        settings: Steps, batch size, learning rate, dropout, EMA, seed.
        log_every: Print the running loss every this many steps.
        snapshot_every: Save the averaged weights every this many steps (0: never) ...
        snapshot_dir: ... as ``snapshot_dir/step<N>`` (diffusers folders).

    Returns:
        A ``FluxPipeline`` holding the EMA weights, in eval mode.
    """
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tokenizers = (new_tokenizer(), new_t5_tokenizer())
    text_encoders = (
        new_clip_encoder(tokenizers[0], settings.seed + 1),
        new_t5(tokenizers[1], settings.seed + 2),
    )
    transformer = new_transformer(settings.seed + 3)
    pipe = assemble(vae.requires_grad_(False), transformer, text_encoders, tokenizers)

    def step_loss(z0: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return flux_flow_loss(pipe, z0, texts, generator)

    optimise(pipe, vae, step_loss, settings, generator, log_every, snapshot_every, snapshot_dir)
    return pipe
