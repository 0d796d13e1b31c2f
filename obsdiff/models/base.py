"""What the pruning loop, the config checks and the cost counters ask a model family.

One subclass of :class:`ModelAdapter` per family (``models/<family>.py``) answers every family
fact: block counts and the default block ranges, target names and their widths, basic units and
structure groups, the CFG rule (denoiser calls per sampler step), text-token counts, encoder
options, loading, encoding and the sampler call. Nothing outside ``models/`` holds such facts.

Config questions are answered from the denoiser's ``config.json`` alone (no torch import):
``torch`` is a :class:`~obsdiff.lazy.LazyModule` here and in the family modules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models.structure import HeadGroup, StructureUnit
from obsdiff.offload import Offload

# A basic unit: input groups (layers that see the same input) whose inputs are independent
# within one forward pass. Names are relative to the denoiser.
Unit = list[tuple[str, ...]]

DTYPES = ("float32", "float16", "bfloat16")
KNOWN_CONFIGS = Path(__file__).with_name("configs")


class ModelNotAvailableError(RuntimeError):
    """The configured weights cannot be found (offline and not cached, or a wrong path)."""


class ModelConfigError(ValueError):
    """A model option, block or target that this family cannot take."""


def resolve_device(device: str) -> Any:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16``."""
    return getattr(torch, name)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class ModelAdapter:
    """Model-family specifics; the pruning loop, configs and cost counters only use this interface.

    Args:
        options: the family's ``model.options`` (unknown keys are refused; missing ones take
            ``default_options``).
    """

    family: str = ""
    denoiser_class: str = ""  # the diffusers class of the denoiser (``empty_denoiser`` builds it)
    default_targets: tuple[str, ...] = ()
    optional_targets: tuple[str, ...] = ()  # allowed in ``pruner.targets``, not pruned by default
    supports_structured = True  # head / neuron groups (``structure_units``); refused before loading if not
    plans_before_load = True  # the memory plan needs the config only (else: right after loading)
    default_options: Mapping[str, Any] = {}
    denoiser_subfolder = "transformer"
    # Embedded pipelines by the name ``model.path`` gives them, and shipped denoiser configs of
    # hub models (so that experiments are checked offline before any download).
    embedded: Mapping[str, Path] = {}
    known_configs: Mapping[str, str] = {}
    latent_packing = 1  # latent cells per side in one token beyond ``patch_size`` (Flux: 2x2 packing)
    offload = Offload()  # model.offload of the loaded pipeline (``place`` sets it)

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise ModelConfigError(
                f"model.options: unknown {unknown} for family {self.family!r}; "
                f"allowed: {sorted(self.default_options) or 'none'}"
            )
        self.options = {**self.default_options, **options}
        self.check_options()

    def check_options(self) -> None:
        """Refuse option values the family cannot take (called on construction)."""

    # -- config questions (no weights, no torch) ------------------------------------------------

    def weights_location(self, model_cfg: Any) -> str:
        """Where ``load`` reads weights from: an embedded model's folder, else ``model.path``."""
        path = str(model_cfg.path)
        return str(self.embedded[path]) if path in self.embedded else path

    def denoiser_config(self, model_cfg: Any) -> dict:
        """The denoiser's ``config.json``: local folder, hub cache, shipped copy, or download."""
        location = self.weights_location(model_cfg)
        local = Path(location) / self.denoiser_subfolder / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
        if Path(location).is_dir():
            raise ModelNotAvailableError(
                f"model.path={model_cfg.path!r}: no {self.denoiser_subfolder}/config.json"
            )
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        filename = f"{self.denoiser_subfolder}/config.json"
        cached = try_to_load_from_cache(location, filename)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
        if location in self.known_configs:
            return json.loads((KNOWN_CONFIGS / self.known_configs[location]).read_text())
        try:
            return json.loads(Path(hf_hub_download(location, filename)).read_text())
        except Exception as err:  # offline, unknown repo, gated repo: one message with the fix
            raise not_available(str(model_cfg.path), err) from err

    def vae_scale_factor(self, model_cfg: Any) -> int:
        """Pixels per latent cell (the pipeline's ``vae_scale_factor``) without loading the VAE: from
        ``vae/config.json`` in the model's folder or the hub cache, else the factor the family lists
        for ``model.path`` (``random_shapes``), else 8 (the VAE of every SD3 and Flux.1 model)."""
        location = self.weights_location(model_cfg)
        file: Path | None = Path(location) / "vae" / "config.json"
        if not Path(location).is_dir():
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(location, "vae/config.json")
            except ValueError:  # not a hub id either: the listed factor or 8
                cached = None
            file = Path(cached) if isinstance(cached, str) else None
        if file is not None and file.is_file():
            return 2 ** (len(json.loads(file.read_text())["block_out_channels"]) - 1)
        listed = {path: scale for path, scale, _ in getattr(self, "random_shapes", {}).values()}
        return listed.get(str(model_cfg.path), 8)

    def resolution_grid(self, model_cfg: Any, config: Mapping) -> tuple[int, int | None]:
        """``(step, largest)``: the sampler takes resolutions that are multiples of ``step`` (VAE factor
        × patch size × latent packing) up to ``largest`` (a learned position embedding's reach,
        ``pos_embed_max_size`` patches; ``None``: no limit)."""
        step = self.vae_scale_factor(model_cfg) * config.get("patch_size", 1) * self.latent_packing
        reach = config.get("pos_embed_max_size")
        return step, (reach * step if reach else None)

    def num_blocks(self, config: Mapping) -> int:
        """Transformer blocks in forward order (the index space of ``pruner.blocks``)."""
        raise NotImplementedError

    def default_blocks(self, config: Mapping, structured: bool) -> list[int] | None:
        """``pruner.blocks=null``: every block; structured runs keep the first and last (``[1, L−1)``)."""
        return list(range(1, self.num_blocks(config) - 1)) if structured else None

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        """Input features of each target (N:M needs ``m`` to divide them)."""
        raise NotImplementedError

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        """Head count of each kind of attention that structured runs prune (``attn``: 24)."""
        raise NotImplementedError

    def check(self, model_cfg: Any, blocks: Sequence[int] | None, targets: Sequence[str]) -> dict[str, int]:
        """Validate blocks and targets against the denoiser config; return ``target -> in_features``."""
        config = self.denoiser_config(model_cfg)
        num = self.num_blocks(config)
        bad_blocks = [b for b in (blocks or []) if not 0 <= b < num]
        if bad_blocks:
            raise ModelConfigError(f"pruner.blocks: {bad_blocks} out of range for a model with {num} blocks")
        allowed = self.default_targets + self.optional_targets
        unknown = [t for t in targets if t not in allowed]
        if unknown:
            raise ModelConfigError(f"pruner.targets: unknown {unknown}; allowed: {list(allowed)}")
        return self.target_widths(config, targets)

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        """Rows of every denoiser call in one sampler step, per prompt (CFG doubled: ``[2]``)."""
        raise NotImplementedError

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        """Load the pipeline on the configured device and dtype."""
        raise NotImplementedError

    def place(self, pipe: Any, model_cfg: Any) -> Any:
        """Move the loaded pipeline to ``model.device``; with ``model.offload=group`` the denoiser
        stays on the CPU and its blocks visit the device only while a sampler runs (``self.offload``)."""
        device = resolve_device(model_cfg.device)
        self.offload = Offload.from_config(model_cfg, device)
        if not self.offload.enabled:
            return pipe.to(device)
        denoiser = self.denoiser(pipe)
        for component in pipe.components.values():
            if isinstance(component, nn.Module) and component is not denoiser:
                component.to(device)
        denoiser.to("cpu")
        return pipe

    def denoiser(self, pipe: Any) -> nn.Module:
        return getattr(pipe, self.denoiser_subfolder)

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        """Basic units of the target layers, block by block in forward order."""
        raise NotImplementedError

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        """Encode prompts once; tensors on the CPU, batched over prompts along dim 0."""
        raise NotImplementedError

    def denoise(
        self,
        pipe: Any,
        embeds: dict,
        generators: list,
        num_steps: int,
        guidance_scale: float,
        resolution: int,
        callback: Any = None,
        output_type: str = "latent",
    ) -> Any:
        """Run the sampler on pre-encoded prompts; ``output_type='latent'`` skips the VAE decode."""
        device = self.denoiser(pipe).device
        with torch.no_grad():
            out = pipe(
                **{k: v.to(device) for k, v in embeds.items()},
                **self.sampler_kwargs(pipe, guidance_scale),
                num_inference_steps=num_steps,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type=output_type,
                **self.step_callback(pipe, callback),
            )
        return out.images

    def step_callback(self, pipe: Any, callback: Any) -> dict:
        """The pipeline-call arguments that run ``callback`` (``callback_on_step_end`` signature)
        after every sampler step."""
        return {"callback_on_step_end": callback}

    def sampler_kwargs(self, pipe: Any, guidance_scale: float) -> dict:
        """The family's guidance arguments of the pipeline call (CFG scale, true CFG, token count)."""
        return {"guidance_scale": guidance_scale}

    def offload_text_encoders(self, pipe: Any) -> None:
        """Move the text encoders off the accelerator once prompts are encoded."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.to("cpu")

    def text_tokens(self, pipe: Any) -> int:
        """Prompt tokens the denoiser attends to (for FLOP counts)."""
        raise NotImplementedError

    def planned_text_tokens(self, model_cfg: Any) -> int:
        """:meth:`text_tokens` from the config alone (the memory plan, before the pipeline loads)."""
        raise NotImplementedError

    def tokenizer_length(self, model_cfg: Any) -> int:
        """The CLIP tokenizer's padded length, from the weights folder's ``tokenizer/`` (77, CLIP's,
        when the folder is not local)."""
        path = Path(self.weights_location(model_cfg)) / "tokenizer" / "tokenizer_config.json"
        return int(json.loads(path.read_text()).get("model_max_length", 77)) if path.is_file() else 77

    def empty_denoiser(self, config: dict, device: Any = "meta") -> nn.Module:
        """The denoiser class built from ``config`` without weights (``meta``: no memory)."""
        import diffusers

        with torch.device(device):
            return getattr(diffusers, self.denoiser_class).from_config(
                {k: v for k, v in config.items() if not k.startswith("_")}
            )

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        """Random keyword inputs of one denoiser forward (on the denoiser's device and dtype).

        Args:
            denoiser: the (possibly pruned, possibly ``meta``) denoiser.
            batch: rows of the denoiser call.
            latent_size: latent side (``resolution // pipe.vae_scale_factor``).
            text_tokens: prompt tokens the denoiser attends to.
            generator: CPU generator for the random values.
        """
        raise NotImplementedError

    # -- structured pruning (docs/METHOD.md §4) -------------------------------------------------------

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        """Head and neuron groups of ``blocks``, one unit per package entry, in forward order."""
        raise NotImplementedError

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        """Physically delete the removed heads / neurons (``removed[group.key]``, dense indexing)."""
        raise NotImplementedError

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        """Per-block shapes that differ from the dense config: block → group name → heads / width."""
        raise NotImplementedError

    def reshape(self, denoiser: nn.Module, architecture: Mapping[str, Mapping[str, int]]) -> None:
        """Give a dense denoiser the shapes of ``architecture`` (weights to be loaded after)."""
        for unit in self.structure_units(denoiser, sorted(int(b) for b in architecture)):
            shape = architecture[str(unit[0].block)]
            removed = {}
            for group in unit:
                size = group.num_heads if isinstance(group, HeadGroup) else group.width
                if group.name in shape:  # keep the first heads / neurons; weights are loaded after
                    removed[group.key] = list(range(shape[group.name], size))
            self.remove_structure(denoiser, unit, removed)


def check_max_sequence_length(options: Mapping[str, Any]) -> None:
    """``model.options.max_sequence_length``: the T5 tokens a prompt is padded to (1-512)."""
    msl = options["max_sequence_length"]
    if not isinstance(msl, int) or isinstance(msl, bool) or not 1 <= msl <= 512:
        raise ModelConfigError(f"model.options.max_sequence_length={msl!r}; allowed: an integer in [1, 512]")


def table_units(
    denoiser: nn.Module, blocks: Sequence[int], table_of: Callable[[int], tuple], targets: Sequence[str]
) -> list[Unit]:
    """Basic units of ``blocks`` from per-block unit tables, keeping the target linears that exist.

    Args:
        denoiser: the model.
        blocks: block indices in forward order.
        table_of: block index → ``(module prefix, units, tag)``: each unit a tuple of input groups
            of target names; ``tag`` is what those names carry before their module path in this
            kind of block (Flux single blocks: ``"single."``), else ``""``.
        targets: the wanted target names.
    """
    from obsdiff.layers import is_prunable  # torch: only once a model is loaded

    wanted, modules = set(targets), dict(denoiser.named_modules())
    units: list[Unit] = []
    for b in blocks:
        prefix, table, tag = table_of(b)
        for unit in table:
            groups = []
            for group in unit:
                names = tuple(f"{prefix}.{n.removeprefix(tag)}" for n in group if n in wanted)
                names = tuple(n for n in names if is_prunable(modules.get(n)))
                if names:
                    groups.append(names)
            if groups:
                units.append(groups)
    return units


def encode_in_batches(
    prompts: list[str], batch_size: int, encode: Callable[[list[str]], Mapping[str, Any]]
) -> dict:
    """Encode ``prompts`` ``batch_size`` at a time: ``encode(chunk)`` gives named tensors (``None``
    ones are dropped), kept on the CPU and concatenated along dim 0 (one row per prompt)."""
    parts: dict[str, list] = {}
    for start in range(0, len(prompts), batch_size):
        with torch.no_grad():
            out = encode(prompts[start : start + batch_size])
        for key, value in out.items():
            if value is not None:
                parts.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def random_inputs(reference: Any, generator: Any) -> Any:
    """``rand(*shape)``: random values on ``reference``'s device and dtype (``meta``: empty)."""

    def rand(*shape: int) -> Any:
        if reference.device.type == "meta":
            return torch.empty(shape, device="meta", dtype=reference.dtype)
        return torch.randn(shape, generator=generator).to(reference.device, reference.dtype)

    return rand


def not_available(path: str, err: Exception) -> ModelNotAvailableError:
    mode = "offline (HF_HUB_OFFLINE=1)" if offline() else "online"
    return ModelNotAvailableError(
        f"model.path={path!r}: weights not found ({mode}): {err}. Point model.path at a local "
        f"diffusers folder, or download it first (`hf download {path}`) on a machine "
        "with internet access and a Hugging Face token that has accepted the model licence."
    )


def slice_embeds(embeds: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor in a pre-encoded prompt batch."""
    return {k: (v[start:stop] if v is not None else None) for k, v in embeds.items()}
