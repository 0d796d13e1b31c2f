"""Stage 3: train the digit / foreground / background classifier on coloured training digits.

Augmentations make it robust to generated images: ±2 px shifts, per-channel colour gain/offset,
light blur and pixel noise. Its held-out accuracy is measured on the 500 held-out digits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from experiments.tiny_digits.train_vae import lr_factor, train_batches
from obsdiff.evaluation.digits_classifier import HEADS, DigitsClassifier, prompt_accuracy
from obsdiff.models.digits_data import heldout_set


@dataclass
class ClassifierSettings:
    """Optimisation settings of the classifier stage."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    seed: int = 0


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (±2 px), colour gain/offset, blur and noise; images stay in [0, 1].

    Args:
        images: Float images (B, 3, 32, 32) in [0, 1].
        generator: The random source.
    """
    batch = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")  # (B, 3, 36, 36)
    dy, dx = torch.randint(5, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + 32, dx : dx + 32]
    gain = 1 + 0.15 * (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5)
    offset = 0.1 * (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5)
    x = x * gain + offset
    blur = torch.rand(batch, 1, 1, 1, generator=generator) * 0.6
    x = (1 - blur) * x + blur * F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + 0.03 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


@torch.no_grad()
def heldout_accuracy(net: DigitsClassifier) -> dict[str, float]:
    """Per-head accuracy on the 500 held-out digits (fixed colours)."""
    images, captions = heldout_set()
    accuracy = prompt_accuracy(images, [c.text for c in captions], net)
    return {head: accuracy[head] for head in HEADS}


def train_classifier(settings: ClassifierSettings, log_every: int = 200) -> DigitsClassifier:
    """Trains the three heads with summed cross-entropy.

    Args:
        settings: Steps, batch size, learning rate, sizes, seed.
        log_every: Print the running loss every this many steps.

    Returns:
        The trained classifier in eval mode.
    """
    generator = torch.Generator().manual_seed(settings.seed + 7)
    torch.manual_seed(settings.seed + 7)
    net = DigitsClassifier(settings.widths, settings.hidden).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    batches = train_batches(settings.batch_size, generator)
    start, running = time.time(), 0.0
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup)
        images, captions = next(batches)
        logits = net(augment(images, generator))
        loss = sum(
            F.cross_entropy(logits[head], torch.tensor([getattr(c, head) for c in captions]))
            for head in HEADS
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            print(
                f"classifier step {step + 1}/{settings.steps} loss {running / log_every:.4f} {elapsed:.0f}s"
            )
            running = 0.0
    return net.eval()
