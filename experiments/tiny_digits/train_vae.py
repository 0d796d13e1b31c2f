"""Stage 1: train the AutoencoderKL on coloured training digits and set its latent normalisation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from experiments.tiny_digits.components import new_vae
from obsdiff.models.digits_data import load_mnist, random_captions, render_captions, split_indices


@dataclass
class VaeSettings:
    """Optimisation settings of the VAE stage."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    stats_images: int = 2000
    seed: int = 0


def train_batches(batch_size: int, generator: torch.Generator):
    """Endless batches of coloured training digits and their captions (colours drawn per draw).

    Args:
        batch_size: Images per batch.
        generator: The random source of digit indices, colours and templates.

    Yields:
        Images (B, 3, 32, 32) in [0, 1] and the B captions.
    """
    images, labels = load_mnist()
    train = split_indices("train")
    while True:
        index = train[torch.randint(len(train), (batch_size,), generator=generator)]
        captions = random_captions(labels[index], generator)
        yield render_captions(images[index], captions), captions


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


@torch.no_grad()
def set_latent_normalisation(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> None:
    """Sets ``shift_factor``/``scaling_factor`` so that ``(z - shift) * scale`` has mean 0, std 1.

    Args:
        vae: The trained VAE.
        images: Training images (N, 3, 32, 32) in [0, 1].
        generator: The random source of posterior samples.
    """
    latents = torch.cat(
        [vae.encode(batch * 2 - 1).latent_dist.sample(generator) for batch in images.split(250)]
    )
    shift, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1 / std, 4))


def train_vae(settings: VaeSettings, log_every: int = 100) -> AutoencoderKL:
    """Trains the VAE with L1 + MSE reconstruction and a small KL term (pixels in [-1, 1]).

    Args:
        settings: Steps, batch size, learning rate, KL weight, seed.
        log_every: Print the running losses every this many steps.

    Returns:
        The trained VAE in eval mode, with latent normalisation set from training images.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    vae = new_vae(settings.seed).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    batches = train_batches(settings.batch_size, generator)
    start, running = time.time(), torch.zeros(2)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup)
        images, _ = next(batches)
        x = images * 2 - 1  # diffusers VAEs take [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        rec_loss = (recon - x).abs().mean() + (recon - x).square().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec_loss + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += torch.tensor([rec_loss.item(), kl.item()])
        if (step + 1) % log_every == 0:
            rec, kl_mean = (running / log_every).tolist()
            elapsed = time.time() - start
            print(f"vae step {step + 1}/{settings.steps} rec {rec:.4f} kl {kl_mean:.3f} {elapsed:.0f}s")
            running.zero_()
    vae.eval()
    stats_images, _ = next(train_batches(settings.stats_images, generator))
    set_latent_normalisation(vae, stats_images, generator)
    return vae
