"""The generic adapter (``model.family=generic``): try a new architecture before writing an adapter.

It knows no family by name. ``model.options`` say where things are: the pipeline class (or
``auto``: ``DiffusionPipeline.from_pretrained``), the denoiser's pipeline attribute, the dotted
path(s) of its block lists, target regexes (on a Linear's name relative to its block) and the CFG
rule. Input groups are found by one probe: ``load`` runs one sampler step and records the
denoiser call's inputs; ``units`` replays that call with a pre-hook on every Linear of the blocks,
and layers whose input is the same tensor object share a group (one Hessian). Each group is a
unit, in order of first use. A group may span blocks (Sana's cross-attention K/V read the caption
in every block). Config questions are answered on the denoiser built on ``meta`` from its config.

Unstructured and N:M only: head and neuron groups need a family adapter. The pipeline encodes the
prompts itself in every call (``encode`` keeps the strings), so text encoders stay on the device.
See docs/GENERIC.md.
"""

from __future__ import annotations

import inspect
import json
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models.base import (
    ModelAdapter,
    ModelConfigError,
    Unit,
    not_available,
    random_inputs,
    resolve_device,
    torch_dtype,
)
from obsdiff.models.structure import StructureUnit

# Embedded pipelines by model.path: the tiny Sana (a family no adapter knows by name).
TINY_CONFIGS = {"tiny_generic": Path(__file__).with_name("tiny_generic.json")}
CFG_RULES = ("batch", "calls", "none")
# What ``denoise`` passes itself; ``call_kwargs`` may not set these.
SAMPLER_ARGS = (
    "prompt", "num_inference_steps", "height", "width", "guidance_scale", "generator", "output_type",
    "callback_on_step_end",
)  # fmt: skip
STRUCTURED_REFUSAL = (
    "sparsity=structured needs a family adapter; the generic adapter prunes unstructured and N:M only"
)
PROBE_PROMPT = "a photo"
IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


class GenericAdapter(ModelAdapter):
    """Any diffusers text-to-image pipeline whose denoiser keeps its blocks in module lists.

    Options: ``pipeline`` (class name or ``auto``), ``denoiser`` (pipeline attribute), ``denoiser_class``
    (``null``: the config's ``_class_name``), ``blocks`` (dotted path or list of paths, concatenated
    in forward order), ``targets`` (regexes, full match on the name relative to a block), ``cfg``
    (``batch``: CFG doubles one call's batch; ``calls``: two calls per step; ``none``),
    ``drop_components`` (loaded as ``None``) and ``call_kwargs`` (extra pipeline-call arguments).
    """

    family = "generic"
    supports_structured = False
    plans_before_load = False  # units and inputs come from probing the loaded pipeline
    default_options = {
        "pipeline": "auto",
        "denoiser": "transformer",
        "denoiser_class": None,
        "blocks": "transformer_blocks",
        "targets": [".*"],
        "cfg": "batch",
        "drop_components": [],
        "call_kwargs": {},
    }

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.denoiser_subfolder = self.options["denoiser"]
        self.default_targets = tuple(self.options["targets"])
        self._skeletons: dict[str, nn.Module] = {}  # config JSON -> meta denoiser
        self._probe: dict | None = None  # the recorded denoiser call of ``load``
        self._groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check_options(self) -> None:
        o = self.options
        for key in ("pipeline", "denoiser"):
            _identifier(key, o[key])
        if o["denoiser_class"] is not None:
            _identifier("denoiser_class", o["denoiser_class"])
        if isinstance(o["blocks"], str):
            o["blocks"] = [o["blocks"]]
        if isinstance(o["targets"], str):
            o["targets"] = [o["targets"]]
        for key in ("blocks", "targets", "drop_components"):
            if not isinstance(o[key], list) or not all(isinstance(v, str) for v in o[key]):
                raise ModelConfigError(f"model.options.{key}={o[key]!r}; allowed: a list of strings")
        if not o["blocks"] or not o["targets"]:
            raise ModelConfigError("model.options.blocks and model.options.targets must not be empty")
        for path in o["blocks"]:
            _identifier("blocks", path)
        compile_targets(o["targets"], "model.options.targets")
        if o["cfg"] not in CFG_RULES:
            raise ModelConfigError(f"model.options.cfg={o['cfg']!r}; allowed: {list(CFG_RULES)}")
        kwargs = o["call_kwargs"]
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ModelConfigError(
                f"model.options.call_kwargs={kwargs!r}; allowed: a mapping of argument names"
            )
        reserved = sorted(set(kwargs) & set(SAMPLER_ARGS))
        if reserved:
            raise ModelConfigError(
                f"model.options.call_kwargs: {reserved} are set by obsdiff (calibration / eval)"
            )

    # -- config questions (the denoiser on ``meta``) ------------------------------------------------

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path in TINY_CONFIGS:
            return json.loads(TINY_CONFIGS[model_cfg.path].read_text())["transformer"]
        return super().denoiser_config(model_cfg)

    def vae_scale_factor(self, model_cfg: Any) -> int:
        """From ``vae/config.json``: ``block_out_channels`` (AutoencoderKL) or ``encoder_block_out_channels``
        (Sana's AutoencoderDC); 8 when the file is neither local nor cached."""
        if model_cfg.path in TINY_CONFIGS:
            vae = json.loads(TINY_CONFIGS[model_cfg.path].read_text())["vae"]
        else:
            vae = _read_json(self.weights_location(model_cfg), "vae/config.json") or {}
        levels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
        return 2 ** (len(levels) - 1) if levels else 8

    def num_blocks(self, config: Mapping) -> int:
        return len(self._blocks(self._skeleton(config)))

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        return _widths(self._linears(self._skeleton(config), None, targets))

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        raise ModelConfigError(STRUCTURED_REFUSAL)

    def check(self, model_cfg: Any, blocks: Sequence[int] | None, targets: Sequence[str]) -> dict[str, int]:
        """Blocks in range, every target regex matching a Linear of the selected blocks, ``call_kwargs``
        taken by the pipeline's ``__call__``; returns ``layer name relative to a block -> in_features``."""
        config = self.denoiser_config(model_cfg)
        skeleton, num = self._skeleton(config), self.num_blocks(config)
        bad_blocks = [b for b in (blocks or []) if not 0 <= b < num]
        if bad_blocks:
            raise ModelConfigError(f"pruner.blocks: {bad_blocks} out of range for a model with {num} blocks")
        layers = self._linears(skeleton, blocks, [".*"])
        names = sorted({rel for _, rel, _ in layers})
        for target, regex in zip(targets, compile_targets(targets, "pruner.targets"), strict=True):
            if not any(regex.fullmatch(rel) for rel in names):
                raise ModelConfigError(
                    f"pruner.targets / model.options.targets: {target!r} matches no nn.Linear of the "
                    f"selected blocks of {type(skeleton).__name__}; their names (in a block): {names}"
                )
        self._check_call_kwargs(model_cfg)
        return _widths(self._linears(skeleton, blocks, targets))

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        cfg = self.options["cfg"] if guidance_scale > 1 else "none"
        return {"batch": [2], "calls": [1, 1], "none": [1]}[cfg]

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        """Load the pipeline, then probe one sampler step at ``model.sampler`` (resolution, guidance)."""
        device, dtype = resolve_device(model_cfg.device), torch_dtype(model_cfg.torch_dtype)
        if model_cfg.path in TINY_CONFIGS:
            from obsdiff.models.tiny_generic import build_tiny_generic_pipeline

            pipe = build_tiny_generic_pipeline(TINY_CONFIGS[model_cfg.path])
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            cls = self._pipeline_class()
            kwargs = {"dtype": dtype, **dict.fromkeys(self.options["drop_components"])}
            try:
                pipe = cls.from_pretrained(self.weights_location(model_cfg), **kwargs)
            except OSError as err:
                raise not_available(model_cfg.path, err) from err
        denoiser = getattr(pipe, self.denoiser_subfolder, None)
        if not isinstance(denoiser, nn.Module):
            raise ModelConfigError(
                f"model.options.denoiser={self.denoiser_subfolder!r}: {type(pipe).__name__} has no such "
                f"model; its components: {sorted(pipe.components)}"
            )
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        sampler = model_cfg.get("sampler")
        if sampler is None:
            raise ModelConfigError("model.sampler: the generic adapter probes one step at its resolution")
        self.probe(pipe, int(sampler.resolution), float(sampler.guidance_scale))
        return pipe

    def probe(self, pipe: Any, resolution: int, guidance_scale: float) -> None:
        """Run one sampler step; keep the first denoiser call's inputs and check the CFG rule.

        ``load`` calls it; call it on a pipeline built another way before ``units``.
        """
        denoiser = self.denoiser(pipe)
        signature = inspect.signature(denoiser.forward)
        calls: list[dict] = []

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(dict(signature.bind(*args, **kwargs).arguments))

        with _hooks([(denoiser, record)], with_kwargs=True):
            self.denoise(pipe, {"prompt": [PROBE_PROMPT]}, [torch.Generator("cpu").manual_seed(0)], 1,
                         guidance_scale, resolution)  # fmt: skip
        expected = self.denoiser_calls(guidance_scale, dict(denoiser.config))
        inputs = calls[0] if calls else {}
        rows = next((int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 0)
        if len(calls) != len(expected) or rows != expected[0]:
            raise ModelConfigError(
                f"model.options.cfg={self.options['cfg']!r} expects {len(expected)} denoiser call(s) of "
                f"{expected[0]} row(s) per prompt and step at guidance_scale={guidance_scale}; the probe saw "
                f"{len(calls)} of {rows}: set cfg to batch (CFG doubles the batch), calls (two calls) or none"
            )
        self._probe = {
            "denoiser": denoiser,
            "inputs": inputs,
            "rows": rows,
            "latent_size": resolution // pipe.vae_scale_factor,
        }
        self._groups.clear()

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        """One unit per input group of the target Linears of ``blocks``, in order of first use."""
        if denoiser not in self._groups:
            self._groups[denoiser] = self._probe_groups(denoiser)
        wanted = {name for name, _, _ in self._linears(denoiser, blocks, targets)}
        groups = [tuple(n for n in group if n in wanted) for group in self._groups[denoiser]]
        return [[group] for group in groups if group]

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        """The prompts themselves: the pipeline encodes them in every call."""
        return {"prompt": list(prompts)}

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
        with torch.no_grad():
            out = pipe(
                prompt=embeds["prompt"],
                num_inference_steps=num_steps,
                height=resolution,
                width=resolution,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type=output_type,
                callback_on_step_end=callback,
                **self.options["call_kwargs"],
            )
        return out.images

    def offload_text_encoders(self, pipe: Any) -> None:
        """Kept on the device: the pipeline encodes the prompts in every call."""

    def text_tokens(self, pipe: Any) -> int:
        """Tokens of the probed call's ``encoder_hidden_states`` (0 when the denoiser takes none)."""
        text = self._recorded()["inputs"].get("encoder_hidden_states")
        return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0

    def planned_text_tokens(self, model_cfg: Any) -> int:
        return self.text_tokens(None)  # the probe's (the plan comes after loading)

    def empty_denoiser(self, config: dict, device: Any = "meta") -> nn.Module:
        import diffusers

        probed = type(self._probe["denoiser"]).__name__ if self._probe else None  # a live config
        name = self.options["denoiser_class"] or config.get("_class_name") or probed
        cls = getattr(diffusers, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise ModelConfigError(
                f"model.options.denoiser_class={name!r} is not a diffusers model class; set it to the "
                "denoiser's class (e.g. SanaTransformer2DModel) when its config.json has no _class_name"
            )
        with torch.device(device):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        """The probed call's inputs with ``batch`` rows and ``latent_size`` latents: random floats,
        timesteps as probed, masks of ones (``text_tokens`` is the probed count)."""
        probe, p = self._recorded(), next(denoiser.parameters())
        rand, inputs = random_inputs(p, generator), {}
        for key, value in probe["inputs"].items():
            if not isinstance(value, torch.Tensor):
                inputs[key] = value
                continue
            shape = list(value.shape)
            if shape and shape[0] == probe["rows"]:
                shape[0] = batch
            if len(shape) == 4 and shape[-2:] == [probe["latent_size"]] * 2:
                shape[-2:] = [latent_size, latent_size]
            if not value.is_floating_point():
                inputs[key] = torch.ones(shape, dtype=value.dtype, device=p.device)
            elif value.dim() == 1:  # timesteps
                inputs[key] = torch.full(shape, float(value.flatten()[0]), dtype=p.dtype, device=p.device)
            else:
                inputs[key] = rand(*shape)
        return inputs

    # -- structured pruning: refused (config resolution refuses it first) ---------------------------

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        raise ModelConfigError(STRUCTURED_REFUSAL)

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        raise ModelConfigError(STRUCTURED_REFUSAL)

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        return {}  # shapes never change

    def reshape(self, denoiser: nn.Module, architecture: Mapping[str, Mapping[str, int]]) -> None:
        if architecture:
            raise ModelConfigError(STRUCTURED_REFUSAL)

    # -- helpers -----------------------------------------------------------------------------------

    def _skeleton(self, config: Mapping) -> nn.Module:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._skeletons:
            self._skeletons[key] = self.empty_denoiser(dict(config))
        return self._skeletons[key]

    def _blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(prefix, block)`` over ``model.options.blocks``, concatenated in forward order."""
        blocks = []
        for path in self.options["blocks"]:
            try:
                blocklist = denoiser.get_submodule(path)
            except AttributeError:
                blocklist = None
            if not isinstance(blocklist, nn.ModuleList | nn.Sequential):
                lists = [n for n, m in denoiser.named_modules() if isinstance(m, nn.ModuleList) and n]
                raise ModelConfigError(
                    f"model.options.blocks: {path!r} is not a module list of {type(denoiser).__name__}; "
                    f"its module lists: {lists}"
                )
            blocks += [(f"{path}.{i}", block) for i, block in enumerate(blocklist)]
        return blocks

    def _linears(
        self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]
    ) -> list[tuple[str, str, nn.Module]]:
        """``(name, name relative to its block, layer)`` of the Linears of ``blocks`` matching ``targets``."""
        regexes = compile_targets(targets, "pruner.targets")
        all_blocks = self._blocks(denoiser)
        chosen = range(len(all_blocks)) if blocks is None else sorted(blocks)
        found = []
        for b in chosen:
            prefix, block = all_blocks[b]
            for rel, module in block.named_modules():
                if isinstance(module, nn.Linear) and any(r.fullmatch(rel) for r in regexes):
                    found.append((f"{prefix}.{rel}", rel, module))
        return found

    def _pipeline_class(self) -> type:
        import diffusers

        name = self.options["pipeline"]
        cls = diffusers.DiffusionPipeline if name == "auto" else getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise ModelConfigError(
                f"model.options.pipeline={name!r} is not a diffusers pipeline class (or auto)"
            )
        return cls

    def _check_call_kwargs(self, model_cfg: Any) -> None:
        """The pipeline's ``__call__`` takes ``call_kwargs`` and the sampler arguments (known class only)."""
        name = self.options["pipeline"]
        if model_cfg.path in TINY_CONFIGS:
            name = json.loads(TINY_CONFIGS[model_cfg.path].read_text())["pipeline"]
        elif name == "auto":
            name = (_read_json(self.weights_location(model_cfg), "model_index.json") or {}).get("_class_name")
            if name is None:
                return  # not local, not cached: checked by the probe at load
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ModelConfigError(
                f"model.options.pipeline={name!r} is not a diffusers pipeline class (or auto)"
            )
        params = inspect.signature(cls.__call__).parameters
        unknown = [k for k in (*SAMPLER_ARGS, *self.options["call_kwargs"]) if k not in params]
        if unknown:
            raise ModelConfigError(
                f"model.options.call_kwargs / the sampler call: {name}.__call__ takes no {unknown}; "
                f"it takes: {[p for p in params if p != 'self']}"
            )

    def _recorded(self) -> dict:
        if self._probe is None:
            raise RuntimeError("the generic adapter needs the probe of its load(): load the pipeline with it")
        return self._probe

    def _probe_groups(self, denoiser: nn.Module) -> list[tuple[str, ...]]:
        """Replay the probed call (on a ``meta`` copy: inputs of its shapes); Linears of the blocks
        whose input is the same tensor form a group.

        Groups are in order of first use; a Linear called more than once per forward is a group of
        its own (its hook then sees every call).
        """
        seen: dict[int, tuple[weakref.ref, int]] = {}  # id(input) -> (the input, group index)
        groups: list[list[str]] = []
        calls: dict[str, int] = {}

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:
                    return
                x = args[0]
                ref, index = seen.get(id(x), (None, -1))
                if ref is None or ref() is not x:  # a new tensor (or a dead one's reused id)
                    index = len(groups)
                    seen[id(x)] = (weakref.ref(x), index)
                    groups.append([])
                groups[index].append(name)

            return hook

        hooks = [(layer, make_hook(name)) for name, _, layer in self._linears(denoiser, None, [".*"])]
        probe = self._recorded()
        inputs = probe["inputs"]
        if next(denoiser.parameters()).device.type == "meta":  # the memory plan's copy: meta inputs
            inputs = self.example_inputs(
                denoiser, probe["rows"], probe["latent_size"], self.text_tokens(None)
            )
        with torch.no_grad(), _hooks(hooks):
            denoiser(**inputs)
        out: list[tuple[str, ...]] = []
        for group in groups:
            shared = tuple(n for n in group if calls[n] == 1)
            out += ([shared] if shared else []) + [(n,) for n in group if calls[n] > 1]
        return out


@contextmanager
def _hooks(hooks: Sequence[tuple[nn.Module, Any]], with_kwargs: bool = False) -> Iterator[None]:
    """Forward pre-hooks of the probe, removed in ``finally`` (Hessian hooks live in ``capture.py``)."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def compile_targets(targets: Sequence[str], field: str) -> list[re.Pattern]:
    """Target regexes, compiled; a bad pattern names the field."""
    try:
        return [re.compile(t) for t in targets]
    except re.error as err:
        raise ModelConfigError(f"{field}: {err.pattern!r} is not a regular expression: {err}") from err


def _identifier(key: str, value: Any) -> None:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ModelConfigError(f"model.options.{key}={value!r}; allowed: a (dotted) Python name")


def _widths(layers: list[tuple[str, str, Any]]) -> dict[str, int]:
    """``in_features`` by name relative to a block; by full name where blocks disagree on one."""
    by_rel: dict[str, dict[str, int]] = {}
    for name, rel, layer in layers:
        by_rel.setdefault(rel, {})[name] = layer.in_features
    widths: dict[str, int] = {}
    for rel, per_layer in by_rel.items():
        widths |= {rel: next(iter(per_layer.values()))} if len(set(per_layer.values())) == 1 else per_layer
    return widths


def _read_json(location: str, filename: str) -> dict | None:
    """``filename`` of a local folder or of the hub cache; ``None`` when neither has it."""
    local = Path(location) / filename
    if local.is_file():
        return json.loads(local.read_text())
    if Path(location).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(location, filename)
    except ValueError:  # not a hub id either
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


__all__ = ["GenericAdapter", "STRUCTURED_REFUSAL"]
