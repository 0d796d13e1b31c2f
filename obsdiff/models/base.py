"""What the pruning loop needs from a model family; one subclass per family."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# A basic unit: input groups (layers that see the same input) whose inputs are independent
# within one forward pass. Names are relative to the denoiser.
Unit = list[tuple[str, ...]]


@dataclass(frozen=True)
class StructuredUnit:
    """A structured-pruning unit: heads of one attention, or the neurons of a block's FFNs.

    Args:
        kind: ``"heads"`` (``layers`` lose the same heads jointly) or ``"ffn"`` (every layer
            loses its own neurons independently).
        block: the block index.
        layers: the OBS layers, each with its own Hessian: output projections (heads) or
            down-projections (FFN neurons = their input columns).
        head_dim: ``d_h`` for ``"heads"`` units (from the model config).
    """

    kind: str
    block: int
    layers: tuple[str, ...]
    head_dim: int = 0


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

    def weights_location(self, model_cfg: Any) -> str:
        """Where ``load`` reads weights from: a local folder, or a hub id (caches key on its files)."""
        return str(model_cfg.path)

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

    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        """Prompt tokens the denoiser attends to (for FLOP counts)."""
        raise NotImplementedError

    def empty_denoiser(self, config: dict, device: torch.device | str = "meta") -> nn.Module:
        """The denoiser class built from ``config`` without weights (``meta``: no memory)."""
        raise NotImplementedError

    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int,
        resolution: int,
        text_tokens: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Random keyword inputs of one denoiser forward (on the denoiser's device and dtype).

        Args:
            denoiser: the (possibly pruned, possibly ``meta``) denoiser.
            batch: denoiser batch (CFG doubles the prompts).
            latent_size: latent side (``resolution // pipe.vae_scale_factor``).
            text_tokens: prompt tokens the denoiser attends to.
            generator: CPU generator for the random values.
        """
        raise NotImplementedError

    # Structured pruning (METHOD.md §4): units, physical slicing, per-block architecture.

    def structured_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructuredUnit]:
        """Head and FFN units of ``blocks``, in forward order."""
        raise NotImplementedError

    def remove_structure(
        self, denoiser: nn.Module, unit: StructuredUnit, removed: dict[str, list[int]]
    ) -> None:
        """Physically delete heads (``removed[layer]`` = head indices, the same for every layer of
        a ``"heads"`` unit) or FFN neurons (per down-projection) from the denoiser."""
        raise NotImplementedError

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        """Per-block shapes that differ from the dense config (block index → field → size)."""
        raise NotImplementedError

    def reshape(self, denoiser: nn.Module, architecture: dict[str, dict[str, int]]) -> None:
        """Give a dense denoiser the shapes of ``architecture`` (weights to be loaded after)."""
        raise NotImplementedError


def keep_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` holding only output ``rows`` and input ``cols`` (weights and bias)."""
    W = linear.weight.data
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    out = nn.Linear(W.shape[1], W.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(W.contiguous(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.data if rows is None else linear.bias.data[rows]
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    return out


def slice_embeds(embeds: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor in a pre-encoded prompt batch."""
    return {k: (v[start:stop] if v is not None else None) for k, v in embeds.items()}
