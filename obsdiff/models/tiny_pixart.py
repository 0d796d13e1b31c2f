"""A tiny, randomly initialised PixArt-Σ pipeline built offline from ``tiny_pixart.json``.

Stock diffusers/transformers classes only: a ``PixArtTransformer2DModel`` (``BasicTransformerBlock``s
with self-attention, cross-attention on the projected T5 caption and a tanh-GELU FFN; AdaLN-single
modulation; 8 output channels, the learned variance of PixArt-Σ), an ``AutoencoderKL``, a
``T5EncoderModel`` with the project-built T5 tokenizer (:func:`obsdiff.models.tiny_flux.build_t5_tokenizer`)
and ``DPMSolverMultistepScheduler`` (DPM-Solver++ order 2, as the PixArt-Σ checkpoints ship).
Nothing is downloaded and every build is bit-identical.

The head dim is 12 (3 heads × 12 = 36): not a power of two, as PixArt-Σ's 72. With a VAE of scale
factor 2 and patch 2, a 32×32 image is a 16×16×4 latent, 8×8 = 64 tokens. Pass
``max_sequence_length=16`` (the config's) to the pipeline: its default, 300 T5 tokens, works but is
slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)

from obsdiff.models.tiny_flux import build_t5_tokenizer, new_t5_encoder
from obsdiff.models.tiny_sd3 import read_tiny_config, tiny_vocabulary_words

CONFIG_FILE = "tiny_pixart.json"
SECTIONS = {"transformer", "vae", "text_encoder", "scheduler", "seed", "max_sequence_length"}


def load_tiny_pixart_config(config_path: Path | None = None) -> dict[str, Any]:
    """Read the tiny PixArt config (the packaged ``tiny_pixart.json`` by default).

    Args:
        config_path: Optional path to a JSON file with the same sections.

    Returns:
        The config with sections ``transformer``, ``vae``, ``text_encoder`` (T5), ``scheduler``,
        ``seed`` and ``max_sequence_length``.
    """
    return read_tiny_config(CONFIG_FILE, config_path, SECTIONS, "PixArt")


def build_tiny_pixart_pipeline(config_path: Path | None = None) -> PixArtSigmaPipeline:
    """Build the tiny PixArt-Σ pipeline; identical weights on every call.

    Components are created in a fixed order, each right after ``torch.manual_seed(seed)``. The T5
    tokenizer knows the words of the tiny prompts (lower-cased as the pipeline does, so prompts
    are single tokens per word after its ``lower()``).

    Args:
        config_path: Optional JSON config; the packaged ``tiny_pixart.json`` by default.

    Returns:
        A ``PixArtSigmaPipeline`` on CPU in float32, in eval mode.
    """
    config = load_tiny_pixart_config(config_path)
    seed = int(config["seed"])
    words = tiny_vocabulary_words()
    tokenizer = build_t5_tokenizer(words + [w.lower() for w in words], int(config["max_sequence_length"]))
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**config["transformer"]).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config["vae"]).eval()
    torch.manual_seed(seed)
    text_encoder = new_t5_encoder(config["text_encoder"], tokenizer).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**config["scheduler"]),
    )
