"""Stage 2, Flux family: train the Flux denoiser jointly with its CLIP and T5 text encoders.

The objective is the SD3 recipe's (rectified flow, logit-normal ``t``, velocity target ``ε − x_0``;
see :mod:`experiments.tiny_digits.train_denoiser`), in Flux's layout: latents are packed into 2×2
patches (64 tokens of 16 channels) with the pipeline's own ``_pack_latents`` and position ids, the
T5 sequence is the joint attention's text, CLIP's pooled vector joins the timestep embedding, and
the timestep is passed as ``t`` in [0, 1] (the transformer scales it by 1000, as the pipeline
expects). Captions go through the pipeline's own ``encode_prompt`` (with gradients).

Guidance: no guidance embedding; 10 % of captions are replaced by the empty prompt, so sampling
uses true classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``).

Caption probe: Flux gives its text tokens no positions (``txt_ids`` are zeros), so the joint
attention sees the T5 tokens as a set, and the first recipe learned the two colours of a caption
but not which is the foreground (fg/bg accuracy 50 %, digit 65.6 % after 6,000 steps): CLIP's
pooled vector, the one input that reads the caption in order, moved by 0.01 when the colours were
swapped against 3.7 when the digit changed. Linear heads on the pooled CLIP vector and on the
mean T5 token now predict digit, foreground and background (cross-entropy, weight
``probe_weight``), so both encoders must say which colour is which. The heads are trained with the
pipeline and thrown away; the denoiser's objective is unchanged.
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
from obsdiff.models.digits_data import COLOUR_NAMES, NUM_DIGITS, Caption


@dataclass
class FluxDenoiserSettings(DenoiserSettings):
    """The SD3 stage's settings with the Flux schedule (``long_context_prob`` is not used)."""

    steps: int = 6000
    probe_weight: float = 0.1  # weight of the caption probe's cross-entropy (0: no probe)


# Label smoothing keeps the probe's softmax away from 0 and 1: once the heads were confident, the
# wrong classes' probabilities (about e^-90) made subnormal gradients, and a backward pass through
# the text encoders slowed from 0.3 s to minutes on CPU.
PROBE_SMOOTHING = 0.1


class CaptionProbe(torch.nn.Module):
    """Linear heads reading digit, foreground and background from the text encoders' outputs."""

    def __init__(self, clip_width: int, t5_width: int):
        """Two heads of ``NUM_DIGITS + 2 × len(COLOUR_NAMES)`` logits: pooled CLIP, mean T5 token."""
        super().__init__()
        outputs = NUM_DIGITS + 2 * len(COLOUR_NAMES)
        self.clip, self.t5 = torch.nn.Linear(clip_width, outputs), torch.nn.Linear(t5_width, outputs)

    def loss(
        self, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, captions: list[Caption]
    ) -> torch.Tensor:
        """Summed cross-entropy of digit, fg and bg, averaged over both heads and the captions.

        Args:
            pooled: CLIP's pooled vectors (B, clip width) of the captions.
            tokens: T5's token states (B, L, t5 width).
            mask: Which of the L tokens are not padding (B, L).
            captions: What each caption asks for.
        """
        mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        targets = torch.tensor([[c.digit, c.fg, c.bg] for c in captions])
        splits = [NUM_DIGITS, len(COLOUR_NAMES), len(COLOUR_NAMES)]
        total, cross_entropy = pooled.new_zeros(()), torch.nn.functional.cross_entropy
        for logits in (self.clip(pooled), self.t5(mean)):
            for part, column in zip(logits.split(splits, dim=1), targets.T, strict=True):
                total = total + cross_entropy(part, column, label_smoothing=PROBE_SMOOTHING)
        return total / 2


def flux_flow_loss(
    pipe: FluxPipeline,
    z0: torch.Tensor,
    texts: list[str],
    generator: torch.Generator,
    probe: CaptionProbe | None = None,
    captions: list[Caption] | None = None,
    probe_weight: float = 0.0,
) -> torch.Tensor:
    """Rectified-flow velocity loss of one batch of normalised latents (B, 4, 16, 16).

    With a ``probe``, ``probe_weight`` times its loss on the captions not dropped is added.
    """
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
    loss = (velocity - target).square().mean()
    kept = [i for i, text in enumerate(texts) if text]
    if probe is None or not kept:
        return loss
    ids = pipe.tokenizer_2(
        [texts[i] for i in kept], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    mask = (ids != pipe.tokenizer_2.pad_token_id).to(prompt_embeds.dtype)
    probe_loss = probe.loss(pooled[kept], prompt_embeds[kept], mask, [captions[i] for i in kept])
    return loss + probe_weight * probe_loss


def train_flux_denoiser(
    vae: AutoencoderKL,
    settings: FluxDenoiserSettings,
    log_every: int = 100,
    snapshot_every: int = 0,
    snapshot_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> FluxPipeline:
    """Trains the Flux transformer, CLIP and T5; returns the pipeline with averaged weights.

    Args:
        vae: The trained VAE of the SD3 digits model (frozen), with latent normalisation set.
        settings: Steps, batch size, learning rate, dropout, EMA, seed.
        log_every: Print the running loss every this many steps.
        snapshot_every: Save the averaged weights every this many steps (0: never) ...
        snapshot_dir: ... as ``snapshot_dir/step<N>`` (diffusers folders).
        checkpoint: Resumable training state (see :func:`~experiments.tiny_digits.train_denoiser.optimise`).

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

    probe = None
    if settings.probe_weight:
        torch.manual_seed(settings.seed + 4)
        probe = CaptionProbe(pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.d_model)

    def step_loss(z0: torch.Tensor, texts: list[str], captions: list[Caption]) -> torch.Tensor:
        return flux_flow_loss(pipe, z0, texts, generator, probe, captions, settings.probe_weight)

    optimise(
        pipe, vae, step_loss, settings, generator, log_every, snapshot_every, snapshot_dir, checkpoint,
        auxiliary=probe,
    )  # fmt: skip
    return pipe
