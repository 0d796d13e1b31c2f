"""Stage 4: score the trained pipeline (prompt accuracy, FID to real digits, speed) and draw samples.png.

Generated images use held-out-style prompts: the captions of the 500 held-out digits (their colours
and templates drawn with the held-out seed), one seed per prompt. FID uses obsdiff's
EfficientNet-Lite0 features; the real-vs-real references bound what FID can show at these sizes.

Both families are scored alike. SD3 samples with CFG in one batch and one zero "T5" token; Flux
with true CFG (``true_cfg_scale``, ``negative_prompt=""``: two denoiser calls per step) when it has
no guidance embedding, else with embedded guidance, and the T5 tokenizer's 16 tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from obsdiff.evaluation.digits_classifier import DigitsClassifier, prompt_accuracy
from obsdiff.evaluation.features import load_efficientnet_lite0
from obsdiff.evaluation.fid import FidReference, fid, image_features
from obsdiff.models.digits_data import COLOURS, heldout_set, make_caption, render, split_indices

GRID_COLOURS = ((1, 0), (0, 1), (5, 4), (2, 6), (3, 7), (4, 5), (7, 3), (6, 2))  # (fg, bg) per column
SD3_SEQUENCE_LENGTH = 1  # zero "T5" tokens appended to SD3's CLIP tokens
DigitsPipeline = StableDiffusion3Pipeline | FluxPipeline


def default_sequence_length(pipe: DigitsPipeline) -> int:
    """The text length to sample with: SD3's one zero "T5" token, or the Flux T5 tokenizer's length."""
    if isinstance(pipe, FluxPipeline):
        return pipe.tokenizer_2.model_max_length
    return SD3_SEQUENCE_LENGTH


def uses_true_cfg(pipe: DigitsPipeline) -> bool:
    """Whether the pipeline guides with true CFG (Flux without a guidance embedding)."""
    return isinstance(pipe, FluxPipeline) and not pipe.transformer.config.guidance_embeds


def guidance_kwargs(pipe: DigitsPipeline, guidance_scale: float, count: int) -> dict:
    """The ``__call__`` arguments that guide ``count`` prompts at ``guidance_scale``.

    SD3 and Flux with a guidance embedding take ``guidance_scale``; Flux without one takes true CFG
    against the empty prompt, the caption dropped in training.
    """
    if uses_true_cfg(pipe):
        return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * count}
    return {"guidance_scale": guidance_scale}


@torch.no_grad()
def generate(
    pipe: DigitsPipeline,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 10,
    guidance_scale: float = 5.0,
    max_sequence_length: int | None = None,
    batch_size: int = 50,
) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] from the stock ``__call__``, one generator per prompt.

    Args:
        pipe: The pipeline.
        prompts: One prompt per image.
        seeds: One seed per image (results do not depend on ``batch_size``).
        num_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale (see :func:`guidance_kwargs`).
        max_sequence_length: SD3: zero "T5" tokens appended to the CLIP tokens (256 is the pipeline
            default); Flux: T5 tokens. ``None``: :func:`default_sequence_length`.
        batch_size: Prompts per call.
    """
    if max_sequence_length is None:
        max_sequence_length = default_sequence_length(pipe)
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start:stop]]
        out = pipe(
            prompts[start:stop],
            num_inference_steps=num_steps,
            **guidance_kwargs(pipe, guidance_scale, len(generators)),
            height=32,
            width=32,
            generator=generators,
            max_sequence_length=max_sequence_length,
            output_type="pt",
        )
        images.append(out.images.float().clamp(0, 1))
    return torch.cat(images)


def sample_grid(pipe: DigitsPipeline, path: str, seed: int = 0, **kwargs) -> None:
    """Saves a 10 × 8 grid (rows: digits 0–9; columns: fixed fg/bg pairs and templates), 2× upscaled."""
    prompts = [
        make_caption(digit, fg, bg, template=(digit + column) % 8).text
        for digit in range(10)
        for column, (fg, bg) in enumerate(GRID_COLOURS)
    ]
    images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], **kwargs)
    grid = images.view(10, 8, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(320, 256, 3)  # (rows·H, cols·W, 3)
    picture = Image.fromarray((grid * 255).round().byte().numpy())
    picture.resize((512, 640), Image.NEAREST).save(path)


def real_train_sample(count: int, seed: int = 77) -> torch.Tensor:
    """``count`` training digits with random colours: a same-size real reference for FID."""
    from obsdiff.models.digits_data import load_mnist

    images, _ = load_mnist()
    generator = torch.Generator().manual_seed(seed)
    train = split_indices("train")
    index = train[torch.randperm(len(train), generator=generator)[:count]]
    fg = torch.randint(len(COLOURS), (count,), generator=generator)
    bg = (fg + torch.randint(1, len(COLOURS), (count,), generator=generator)) % len(COLOURS)
    return render(images[index], fg, bg)


def generation_seconds(pipe: DigitsPipeline, repeats: int = 3, **kwargs) -> float:
    """Best wall time of generating 8 images × 10 steps (CFG, one call)."""
    prompts = [make_caption(d, 1, 0).text for d in range(8)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(pipe, prompts, list(range(8)), batch_size=8, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def sampler_record(pipe: DigitsPipeline) -> dict:
    """How a Flux pipeline was sampled (guidance mode, T5 tokens); SD3 records none."""
    if isinstance(pipe, StableDiffusion3Pipeline):
        return {}
    return {
        "guidance": "true_cfg" if uses_true_cfg(pipe) else "embedded",
        "max_sequence_length": default_sequence_length(pipe),
    }


def evaluate(pipe: DigitsPipeline, classifier: DigitsClassifier, guidance_scale: float) -> dict:
    """All numbers of the README: prompt accuracy (SD3: also with 256 zero tokens), FIDs, speed.

    Args:
        pipe: The trained pipeline.
        classifier: The trained digits classifier.
        guidance_scale: CFG scale of the generations.
    """
    real, captions = heldout_set()
    prompts = [c.text for c in captions]
    seeds = list(range(len(prompts)))
    fake = generate(pipe, prompts, seeds, guidance_scale=guidance_scale)
    sd3 = isinstance(pipe, StableDiffusion3Pipeline)
    features = load_efficientnet_lite0()
    train_real = real_train_sample(len(real))
    with torch.no_grad():
        vae = pipe.vae
        recon = (vae.decode(vae.encode(real * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    heldout = FidReference.from_images(real, features)  # one feature pass for the three FIDs to it

    def fid_to_heldout(images: torch.Tensor) -> float:
        return heldout.fid(image_features(images, features))

    def long_context(name: str, measure: Callable[[], object]) -> dict:
        return {f"{name}_max_seq_256": measure()} if sd3 else {}

    def long_accuracy() -> dict:
        fake_long = generate(
            pipe, prompts[::5], seeds[::5], guidance_scale=guidance_scale, max_sequence_length=256
        )
        return prompt_accuracy(fake_long, prompts[::5], classifier)

    return {
        "guidance_scale": guidance_scale,
        "num_steps": 10,
        **sampler_record(pipe),
        "accuracy_real_heldout": prompt_accuracy(real, prompts, classifier),
        "accuracy_generated": prompt_accuracy(fake, prompts, classifier),
        **long_context("accuracy_generated", long_accuracy),
        "fid_generated_vs_heldout_500": fid_to_heldout(fake),
        "fid_real_halves_250": fid(real[0::2], real[1::2], features),
        "fid_real_train_vs_heldout_500": fid_to_heldout(train_real),
        "fid_vae_reconstruction_vs_heldout_500": fid_to_heldout(recon),
        "vae_reconstruction_mse": (recon - real).square().mean().item(),
        "seconds_8_images_10_steps": generation_seconds(pipe, guidance_scale=guidance_scale),
        **long_context(
            "seconds_8_images_10_steps",
            lambda: generation_seconds(pipe, guidance_scale=guidance_scale, max_sequence_length=256),
        ),
    }


def guidance_sweep(pipe: DigitsPipeline, classifier: DigitsClassifier, scales: list[float]) -> dict:
    """Prompt accuracy of 200 training-style prompts per guidance scale (validation, not held-out)."""
    from obsdiff.models.digits_data import random_captions

    generator = torch.Generator().manual_seed(99)
    captions = random_captions(torch.arange(200) % 10, generator)
    prompts = [c.text for c in captions]
    seeds = [10_000 + i for i in range(len(prompts))]
    return {
        str(scale): prompt_accuracy(generate(pipe, prompts, seeds, guidance_scale=scale), prompts, classifier)
        for scale in scales
    }
