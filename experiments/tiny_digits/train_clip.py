"""Stage 4: train the digits CLIP (image and text towers) contrastively on coloured training digits.

Each batch draws training digits in a few colour pairs, one pair per group of images, with a
fresh caption template per image and the classifier's augmentations. Inside a group only the digit
separates the captions; with colours drawn per image (as the other stages do) colours alone tell
almost every pair in a batch apart and the digits got no gradient (12 % zero-shot digit accuracy
after 300 steps, colours 100 %). Two pairs that show the same digit and colours are both
positives: the targets spread evenly over them, so no caption is pushed away from an image it
describes.

Label probes. Random colours hold back the vision transformer: supervised on digit labels it
stayed at chance for about 200 steps (white-on-black digits: 80 % after 100), and contrastive
training alone was still at chance after 600 steps. Linear heads on both towers' embeddings
predict digit, foreground and background (cross-entropy, label smoothing 0.1); they are trained
with the model and thrown away, as the Flux twin's caption probe. Zero-shot accuracy is measured
on the 500 held-out digits (:func:`obsdiff.evaluation.digits_clip.zero_shot_accuracy`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from experiments.tiny_digits.train_classifier import augment
from experiments.tiny_digits.train_vae import lr_factor
from obsdiff.evaluation.clip import TensorCLIP
from obsdiff.evaluation.digits_clip import (
    digits_clip_config,
    digits_processor,
    load_tokenizer,
    pixel_values,
    zero_shot_accuracy,
)
from obsdiff.models.digits_data import (
    COLOUR_NAMES,
    COLOURS,
    NUM_DIGITS,
    TEMPLATES,
    heldout_set,
    load_mnist,
    make_caption,
    render_captions,
    split_indices,
)


@dataclass
class ClipSettings:
    """Optimisation settings and sizes of the CLIP stage."""

    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    intermediate: int = 128
    patch: int = 4
    projection: int = 64
    group: int = 16  # images per colour pair
    probe_weight: float = 1.0  # cross-entropy weight of the label probes
    seed: int = 0

    def architecture(self) -> dict[str, int]:
        """The sizes :func:`obsdiff.evaluation.digits_clip.digits_clip_config` takes."""
        names = ("hidden", "layers", "heads", "intermediate", "patch", "projection")
        return {name: getattr(self, name) for name in names}


def grouped_batches(batch_size: int, group: int, generator: torch.Generator):
    """Endless batches of coloured training digits, ``group`` consecutive images per colour pair.

    Args:
        batch_size: Images per batch (a multiple of ``group``).
        group: Images that share one foreground / background pair.
        generator: The random source of digit indices, colours and templates.

    Yields:
        Images (B, 3, 32, 32) in [0, 1] and the B captions.
    """
    images, labels = load_mnist()
    train = split_indices("train")
    num_colours = len(COLOUR_NAMES)
    while True:
        index = train[torch.randint(len(train), (batch_size,), generator=generator)]
        fg = torch.randint(num_colours, (batch_size // group,), generator=generator)
        bg = (fg + torch.randint(1, num_colours, fg.shape, generator=generator)) % num_colours
        template = torch.randint(len(TEMPLATES), (batch_size,), generator=generator)
        captions = [
            make_caption(int(d), int(f), int(b), int(t))
            for d, f, b, t in zip(
                labels[index], fg.repeat_interleave(group), bg.repeat_interleave(group), template, strict=True
            )
        ]
        yield render_captions(images[index], captions), captions


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, same: torch.Tensor, scale: torch.Tensor):
    """Symmetric cross-entropy of scaled cosine similarities, every matching pair a positive.

    Args:
        image: Image embeddings (B, D).
        text: Text embeddings (B, D), pair ``i`` with image ``i``.
        same: Bool (B, B): pair ``i`` and pair ``j`` show the same digit and colours.
        scale: The logit scale (a scalar).
    """
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    targets = same.float() / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def label_probes(width: int) -> torch.nn.ModuleList:
    """Linear heads reading digit, foreground and background from an embedding (thrown away)."""
    return torch.nn.ModuleList(torch.nn.Linear(width, n) for n in (NUM_DIGITS, len(COLOURS), len(COLOURS)))


def probe_loss(probes: torch.nn.ModuleList, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy of the label probes on both towers' embeddings (label smoothing 0.1).

    Args:
        probes: The digit, fg and bg heads.
        image: Image embeddings (B, D).
        text: Text embeddings (B, D).
        labels: (B, 3) digit, fg, bg.
    """
    return sum(
        F.cross_entropy(head(x), labels[:, part], label_smoothing=0.1)
        for part, head in enumerate(probes)
        for x in (image, text)
    )


@torch.no_grad()
def heldout_zero_shot(model: TensorCLIP, processor) -> dict[str, float]:
    """Zero-shot digit / fg / bg accuracy on the 500 held-out digits (fixed colours)."""
    images, captions = heldout_set()
    return zero_shot_accuracy(model, processor, images, captions)


def train_clip(settings: ClipSettings, log_every: int = 100) -> TensorCLIP:
    """Trains both towers, the projections and the logit scale with AdamW.

    Args:
        settings: Steps, batch size, learning rate, sizes, seed.
        log_every: Print the running loss every this many steps.

    Returns:
        The trained CLIP, wrapped, in eval mode.
    """
    generator = torch.Generator().manual_seed(settings.seed + 11)
    torch.manual_seed(settings.seed + 11)
    tokenizer = load_tokenizer()
    processor = digits_processor(tokenizer)
    model = CLIPModel(digits_clip_config(tokenizer, **settings.architecture()))
    clip = TensorCLIP(model).train()
    probes = label_probes(settings.projection)
    parameters = [*model.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    batches = grouped_batches(settings.batch_size, settings.group, generator)
    start, running = time.time(), 0.0
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup)
        images, captions = next(batches)
        tokens = tokenizer([c.text for c in captions], return_tensors="pt", padding=True)
        image = clip.get_image_features(pixel_values(augment(images, generator), processor))
        text = clip.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        labels = torch.tensor([(c.digit, c.fg, c.bg) for c in captions])
        same = (labels[:, None] == labels[None]).all(-1)
        loss = contrastive_loss(image, text, same, model.logit_scale.exp().clamp(max=100))
        loss = loss + settings.probe_weight * probe_loss(probes, image, text, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            print(f"clip step {step + 1}/{settings.steps} loss {running / log_every:.4f} {elapsed:.0f}s")
            running = 0.0
    return clip.eval()
