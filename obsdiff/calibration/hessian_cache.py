"""Opt-in cache of the first package's Hessians (``pruner.hessian_cache=DIR``).

Package 1 is calibrated on the dense model, so its Hessians depend only on the model, the encoded
prompts, the seeds, the sampler settings, the α schedule and which layers are grouped: a sparsity
or method sweep calibrates it once. Later packages see the partly pruned model and are never
cached. An entry is keyed on all of those (the encoded prompt tensors are hashed, so prompts,
text encoders and their options are covered; the denoiser by its files' fingerprint and its model
config, as the dense-image cache does) and restores the accumulators bit for bit. Entries are
shared safely by concurrent runs (``evaluation.cache.load_or_build``: locked, atomic, rebuilt when
corrupt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from obsdiff.evaluation.cache import load_or_build
from obsdiff.fileio import atomic_write
from obsdiff.hessian import HessianAccumulator

Hessians = dict[str, HessianAccumulator]


class HessianCache:
    """First-package Hessians under ``folder``, keyed on ``model_key`` and the calibration.

    Args:
        folder: the cache folder (``pruner.hessian_cache``).
        model_key: what identifies the denoiser's weights and settings (files, model config, versions).
    """

    def __init__(self, folder: str | Path, model_key: str) -> None:
        self.folder, self.model_key = Path(folder).expanduser(), model_key

    def entry(self, groups: Sequence[tuple[str, ...]], calib: Any) -> Path:
        """The entry's file for these input groups and this calibration."""
        h = hashlib.sha256()
        sampler = [calib.num_steps, calib.guidance_scale, calib.resolution, calib.batch_size]
        settings = [self.model_key, [list(g) for g in groups], calib.seeds, sampler, calib.timestep_weights]
        h.update(json.dumps(settings).encode())
        for name in sorted(calib.embeds):  # the encoded prompts themselves
            tensor = calib.embeds[name].contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return self.folder / f"{h.hexdigest()[:16]}.safetensors"

    def get(
        self,
        groups: Sequence[tuple[str, ...]],
        calib: Any,
        devices: Sequence[torch.device],
        capture: Callable[[], Hessians],
    ) -> tuple[Hessians, bool]:
        """The package's Hessians (layer name → accumulator, shared within a group) and whether
        they came from the cache; ``capture()`` calibrates and is called on a miss only."""
        entry, hit = self.entry(groups, calib), True

        def load() -> Hessians | None:
            if not entry.is_file():
                return None
            tensors = load_file(str(entry))
            with open(entry, "rb") as f:  # safetensors' metadata: the scalars of every group
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            scalars = json.loads(header["__metadata__"]["scalars"])
            hessians: Hessians = {}
            for i, (group, device) in enumerate(zip(groups, devices, strict=True)):
                state = {k: tensors[f"{i}.{k}"] for k in ("H", "col_sum")}
                acc = HessianAccumulator.from_state(state, scalars[i], device)
                hessians |= dict.fromkeys(group, acc)
            return hessians

        def build() -> Hessians:
            nonlocal hit
            hit = False
            hessians = capture()
            tensors, scalars = {}, []
            for i, group in enumerate(groups):
                state, values = hessians[group[0]].state()
                tensors |= {f"{i}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
                scalars.append(values)
            metadata = {"scalars": json.dumps(scalars), "groups": json.dumps([list(g) for g in groups])}
            atomic_write(entry, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
            return hessians

        return load_or_build(entry, load, build, "package 1 Hessians"), hit
