"""What the pruning loop needs from a model family; one subclass per family."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# A basic unit: input groups (layers that see the same input) whose inputs are independent
# within one forward pass. Names are relative to the denoiser.
Unit = list[tuple[str, ...]]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailableError(RuntimeError):
    """The configured weights cannot be found (offline and not cached, or a wrong path)."""


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class ModelAdapter:
    """Model-family specifics: loading, layer layout, prompt encoding and the sampler call.

    Subclasses define ``family``, ``default_targets`` and the methods below; the pruning loop
    only talks to this interface.
    """

    family: str = ""
    default_targets: tuple[str, ...] = ()

    def denoiser_config(self, model_cfg: Any) -> dict:
        """The denoiser's config (no weights loaded), for validating a run before loading."""
        raise NotImplementedError

    def check(self, model_cfg: Any, blocks: Sequence[int] | None, targets: Sequence[str]) -> dict[str, int]:
        """Validate blocks and targets against the config; return ``target -> in_features``."""
        raise NotImplementedError

    def load(self, model_cfg: Any) -> Any:
        """Load the pipeline on the configured device and dtype."""
        raise NotImplementedError

    def denoiser(self, pipe: Any) -> nn.Module:
        raise NotImplementedError

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        """Basic units of the target layers, block by block in forward order."""
        raise NotImplementedError

    def encode(
        self,
        pipe: Any,
        prompts: list[str],
        guidance_scale: float,
        batch_size: int,
        max_sequence_length: int = 256,
    ) -> dict:
        """Encode prompts once; tensors on the CPU, batched over prompts along dim 0."""
        raise NotImplementedError

    def denoise(
        self,
        pipe: Any,
        embeds: dict,
        generators: list[torch.Generator],
        num_steps: int,
        guidance_scale: float,
        resolution: int,
        callback: Any = None,
        output_type: str = "latent",
    ) -> torch.Tensor:
        """Run the sampler on pre-encoded prompts; ``output_type='latent'`` skips the VAE decode."""
        raise NotImplementedError

    def offload_text_encoders(self, pipe: Any) -> None:
        """Move the text encoders off the accelerator once prompts are encoded."""
        raise NotImplementedError


def slice_embeds(embeds: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor in a pre-encoded prompt batch."""
    return {k: (v[start:stop] if v is not None else None) for k, v in embeds.items()}
