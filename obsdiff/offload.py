"""Group offloading of the denoiser (``model.offload=group``): diffusers' hooks, only while a sampler runs.

With ``model.offload=group`` the denoiser's weights live on the CPU; for every sampler run (a
package's calibration, the dense or pruned evaluation images) diffusers' ``enable_group_offload``
(block level, one block per group) moves each block to the run device for its forward and back
after it, and the hooks are removed when the run ends.

Why only while the sampler runs: with ``use_stream=True`` diffusers keeps the pinned CPU copy it
took when offloading was applied and restores that copy after every forward, so a weight written
on the device is lost, and structured slicing makes new parameters the kept copy does not know.
Outside a sampler run the denoiser is a plain module whose weights are the CPU tensors: pruning,
slicing, checkpoint restores and saving change those, and the next application copies them. The
price is one pass over the weights per sampler run (pinning them, streams only).

Hessians and solves run on the run device: the package's layers are moved there for the solve
(:meth:`Offload.onload`) and back to the CPU after it (:meth:`Offload.offload`). The Hessian
pre-hooks on inner layers fire after their block is onloaded (diffusers wraps the block's
``forward``; a layer's pre-hook runs inside it) and read only the layer's input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the first use, not by the config checks
    import torch
    from torch import nn

OFFLOAD_DEVICE = "cpu"


@dataclass(frozen=True)
class Offload:
    """Where the denoiser runs and where its weights wait (``model.offload``).

    Args:
        onload_device: the run device of an offloaded denoiser; ``None``: no offloading.
        use_stream: overlap transfers and compute on a CUDA stream (``model.offload_stream``).
    """

    onload_device: torch.device | None = None
    use_stream: bool = False

    @classmethod
    def from_config(cls, model_cfg: Any, device: torch.device) -> Offload:
        """The offloading ``model.offload`` / ``model.offload_stream`` ask for on ``device``."""
        if model_cfg.get("offload", "none") != "group":
            return cls()
        return cls(device, bool(model_cfg.get("offload_stream", False)))

    @property
    def enabled(self) -> bool:
        return self.onload_device is not None

    def sampling(self, denoiser: nn.Module) -> Any:
        """Context manager: group offloading hooks on ``denoiser`` inside the block (no-op if disabled)."""
        if not self.enabled:
            return nullcontext()
        return _group_offloaded(denoiser, self.onload_device, self.use_stream)

    def onload(self, denoiser: nn.Module, names: Sequence[str]) -> None:
        """Move the named layers to the run device (a package's solve)."""
        self._move(denoiser, names, self.onload_device)

    def offload(self, denoiser: nn.Module, names: Sequence[str]) -> None:
        """Move the named layers back to the CPU, where the next sampler run copies them from."""
        self._move(denoiser, names, OFFLOAD_DEVICE)

    def _move(self, denoiser: nn.Module, names: Sequence[str], device: torch.device | str | None) -> None:
        if self.enabled:
            for name in dict.fromkeys(names):
                denoiser.get_submodule(name).to(device)


@contextmanager
def _group_offloaded(denoiser: nn.Module, onload_device: torch.device, use_stream: bool) -> Iterator[None]:
    """``enable_group_offload`` on entry; on exit its hooks removed and every weight on the CPU."""
    denoiser.enable_group_offload(
        onload_device=onload_device,
        offload_device=OFFLOAD_DEVICE,
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=use_stream,
    )
    try:
        yield
    finally:
        remove_group_offload(denoiser)


def remove_group_offload(denoiser: nn.Module) -> None:
    """Remove diffusers' group offloading hooks; the weights end on the CPU (the copy offloading kept)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    denoiser.to(OFFLOAD_DEVICE)  # a run stopped mid-forward leaves onloaded blocks
