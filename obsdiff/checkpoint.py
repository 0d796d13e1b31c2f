"""Resume by package: what a run keeps on disk after each finished package.

After package ``k`` the loop writes ``DIR/checkpoints/package-<k>.safetensors`` (every tensor of
the modules that pruning the package changed, as they are after it) and then
``package-<k>.json`` (the run hash, the package's ``layers.csv`` rows, the strategy's state, such
as the removed heads, and the tensor file's size). The JSON is written last and atomically, so it
marks a complete package. A rerun with the same run hash restores packages ``0 … k`` into the
dense model and calibrates package ``k + 1`` on exactly the model an uninterrupted run would
have had: the final weights are byte-identical. Nothing here is random; calibration seeds are
per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from obsdiff import faults
from obsdiff.fileio import atomic_write, write_json
from obsdiff.pruners.records import LayerRecord

log = logging.getLogger(__name__)


class PackageCheckpoints:
    """The finished packages of one run.

    Args:
        folder: ``DIR/checkpoints``.
        run_hash: the run's :func:`~obsdiff.provenance.run_hash`; checkpoints of another hash are
            never restored.
    """

    def __init__(self, folder: str | Path, run_hash: str):
        self.folder, self.run_hash = Path(folder), run_hash

    def _paths(self, k: int) -> tuple[Path, Path]:
        stem = self.folder / f"package-{k:03d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(
        self, k: int, denoiser: nn.Module, modules: list[str], records: list[LayerRecord], state: dict
    ) -> None:
        """Record package ``k`` as finished (its modules' tensors, rows and strategy state)."""
        tensors_path, record_path = self._paths(k)
        tensors = {
            f"{name}.{key}": value.detach().contiguous().cpu()
            for name in dict.fromkeys(modules)
            for key, value in denoiser.get_submodule(name).state_dict().items()
        }
        atomic_write(tensors_path, lambda tmp: save_file(tensors, str(tmp)))
        faults.reached(f"checkpoint:{k}")
        write_json(record_path, {
            "run_hash": self.run_hash,
            "package": k,
            "modules": list(dict.fromkeys(modules)),
            "records": [dataclasses.asdict(r) for r in records],
            "state": state,
            "tensor_bytes": tensors_path.stat().st_size,
        })  # fmt: skip

    def finished(self, num_packages: int) -> int:
        """How many leading packages are recorded, complete and of this run hash."""
        k = 0
        while k < num_packages and self._complete(k):
            k += 1
        return k

    def _complete(self, k: int) -> bool:
        tensors_path, record_path = self._paths(k)
        if not record_path.is_file() or not tensors_path.is_file():
            return False
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            log.warning("checkpoint %s is corrupt; package %d is redone", record_path, k)
            return False
        if record.get("run_hash") != self.run_hash:
            return False
        if record.get("tensor_bytes") != tensors_path.stat().st_size:
            log.warning("checkpoint %s is truncated; package %d is redone", tensors_path, k)
            return False
        return True

    def record(self, k: int) -> tuple[list[LayerRecord], dict]:
        """Package ``k``'s ``layers.csv`` rows and strategy state."""
        record = json.loads(self._paths(k)[1].read_text())
        return [LayerRecord(**r) for r in record["records"]], record["state"]

    def load(self, k: int, denoiser: nn.Module) -> None:
        """Load package ``k``'s tensors into the (already reshaped) modules.

        Raises:
            RuntimeError: If the tensor file cannot be read; a size mismatch (a checkpoint of
                another model) raises from ``load_state_dict``.
        """
        tensors_path, record_path = self._paths(k)
        record = json.loads(record_path.read_text())
        try:
            tensors = load_file(str(tensors_path))
        except SafetensorError as err:
            raise RuntimeError(
                f"checkpoint {tensors_path} cannot be read ({err}); rerun with resume=false"
            ) from err
        with torch.no_grad():
            for name in record["modules"]:
                module = denoiser.get_submodule(name)
                prefix = f"{name}."
                own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
                device = next(module.parameters()).device
                module.load_state_dict({key: value.to(device) for key, value in own.items()}, strict=True)

    def clear(self) -> None:
        """Delete every checkpoint (the run is done, or starts clean)."""
        shutil.rmtree(self.folder, ignore_errors=True)
