"""SDXL and SD2.1 adapters (``UNet2DConditionModel``): the UNet's transformer blocks, shared cross K/V.

Blocks, in forward order, are the ``BasicTransformerBlock``s of every ``Transformer2DModel`` of the
down blocks, the mid block, then the up blocks (SDXL: 4 + 20 + 10 + 30 + 6 = 70; SD2.1: 16). Units
and structure are ``basic_block``'s: the cross-attention K/V of every selected block share one
Hessian (the text embedding is the same tensor in every block). ``proj_in`` / ``proj_out`` of each
``Transformer2DModel`` are optional targets (``pruner.targets``): a unit before its first block and
after its last; as a Conv2d (``use_linear_projection=false``, SD1.x) they are pruned in unfolded
form (``obsdiff.layers``).

The two families differ only in the pipeline (SDXL: two CLIP encoders, pooled embedding and size
ids; SD2.1: one) and share everything else. CFG doubles the batch of one call per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models import basic_block
from obsdiff.models.base import (
    ModelAdapter,
    Unit,
    encode_in_batches,
    not_available,
    random_inputs,
    torch_dtype,
)
from obsdiff.models.structure import StructureUnit

PROJ_TARGETS = ("proj_in", "proj_out")  # of each Transformer2DModel: optional


def _per_stage(value: Any, stages: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * stages


def transformer_depths(config: Mapping) -> list[int]:
    """Blocks of every ``Transformer2DModel`` of the UNet in forward order, from its config alone.

    Mirrors ``UNet2DConditionModel.__init__``: down block ``i`` has ``layers_per_block[i]``
    attentions of ``transformer_layers_per_block[i]`` blocks, the cross-attention mid block one of
    ``transformer_layers_per_block[-1]``, up block ``i`` ``layers_per_block`` (reversed) ``+ 1``
    attentions of the reversed depths (or ``reverse_transformer_layers_per_block``).
    """
    down, up = config["down_block_types"], config["up_block_types"]
    layers = _per_stage(config["layers_per_block"], len(down))
    depth = _per_stage(config.get("transformer_layers_per_block", 1), len(down))
    depths: list[int] = []
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            depths += [depth[i]] * layers[i]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        depths.append(depth[-1])
    reverse = config.get("reverse_transformer_layers_per_block")
    up_depth = reverse if reverse is not None else list(reversed(depth))
    for i, kind in enumerate(up):
        if "CrossAttn" in kind:
            per_layer = _per_stage(up_depth[i], layers[::-1][i] + 1)
            depths += per_layer
    return depths


def _cross_stages(config: Mapping, values: list | None = None) -> list:
    """A per-down-stage value (default: the channels) of every stage, down, mid and up, that holds
    transformer blocks."""
    values = list(config["block_out_channels"]) if values is None else values
    picked = [values[i] for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        picked.append(values[-1])
    reverse = values[::-1]
    picked += [reverse[i] for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind]
    return picked


class UNetAdapter(ModelAdapter):
    """What SDXL and SD2.1 share: blocks, targets, units, structure, sizes (no pipeline specifics)."""

    denoiser_class = "UNet2DConditionModel"
    denoiser_subfolder = "unet"
    default_targets = basic_block.BASIC_TARGETS
    optional_targets = PROJ_TARGETS
    pipeline_class = ""
    # The random-weight tiny model by model.path: its JSON (``tiny_unet.build_<path>_pipeline``).
    tiny_configs: Mapping[str, Path] = {}

    # -- config questions ------------------------------------------------------------------------

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path in self.tiny_configs:
            return json.loads(self.tiny_configs[model_cfg.path].read_text())["unet"]
        return super().denoiser_config(model_cfg)

    def num_blocks(self, config: Mapping) -> int:
        return sum(transformer_depths(config))

    def resolution_grid(self, model_cfg: Any, config: Mapping) -> tuple[int, int | None]:
        """Latents must halve cleanly at every downsampling stage: ``VAE factor × 2^(stages − 1)``."""
        return self.vae_scale_factor(model_cfg) * 2 ** (len(config["block_out_channels"]) - 1), None

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        """The gcd over stages of each target's input width (stages differ: N:M needs ``m`` to divide all)."""
        stages, cross = _cross_stages(config), config["cross_attention_dim"]
        cross = reduce(math.gcd, _per_stage(cross, 1))

        def width(target: str, c: int) -> int:
            return (
                cross
                if target in basic_block.CROSS_KV
                else basic_block.FFN_MULT * c
                if target == "ff.net.2"
                else c
            )

        return {t: reduce(math.gcd, (width(t, c) for c in stages)) for t in targets}

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        """The fewest heads of any stage with transformer blocks (the config's
        ``attention_head_dim`` is the head count, per down stage; mid and up mirror it)."""
        per_stage = config.get("num_attention_heads") or config["attention_head_dim"]
        heads = _per_stage(per_stage, len(config["down_block_types"]))
        stages = _cross_stages(config, heads)
        return {"attn1": min(stages), "attn2": min(stages)}

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        return [2] if guidance_scale > 1 else [1]  # CFG: one call on the doubled batch

    # -- the model -------------------------------------------------------------------------------

    def transformers(self, denoiser: nn.Module) -> list[str]:
        """Module paths of every ``Transformer2DModel``, in forward order (down, mid, up)."""
        paths = []
        for stage in ("down_blocks", "mid_block", "up_blocks"):
            parents = getattr(denoiser, stage)
            parents = enumerate(parents) if stage != "mid_block" else [(None, parents)]
            for i, parent in parents:
                prefix = stage if i is None else f"{stage}.{i}"
                for j, _ in enumerate(getattr(parent, "attentions", None) or []):
                    paths.append(f"{prefix}.attentions.{j}")
        return paths

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, int]]:
        """``(transformer path, j)`` of every block in forward order: block ``b`` of ``pruner.blocks``."""
        return [
            (path, j)
            for path in self.transformers(denoiser)
            for j in range(len(denoiser.get_submodule(path).transformer_blocks))
        ]

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        """The shared cross K/V unit, then per block in forward order (``proj_in`` before a
        transformer's first block, ``proj_out`` after its last, where targeted)."""
        order = self.blocks(denoiser)
        chosen = set(range(len(order)) if blocks is None else blocks)
        prefixes = [f"{path}.transformer_blocks.{j}" for b, (path, j) in enumerate(order) if b in chosen]
        units = basic_block.shared_cross_kv(denoiser, prefixes, targets)
        units = [units] if units else []
        for b, (path, j) in enumerate(order):
            if b not in chosen:
                continue
            depth = len(denoiser.get_submodule(path).transformer_blocks)
            if j == 0 and "proj_in" in targets:
                units.append([(f"{path}.proj_in",)])
            units += basic_block.block_units(denoiser, [f"{path}.transformer_blocks.{j}"], targets)
            if j == depth - 1 and "proj_out" in targets:
                units.append([(f"{path}.proj_out",)])
        return units

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        order = self.blocks(denoiser)
        selected = []
        for b in sorted(blocks):
            path, j = order[b]
            prefix = f"{path}.transformer_blocks.{j}"
            selected.append((b, prefix, denoiser.get_submodule(prefix)))
        return basic_block.structure_units(selected)

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        path, j = self.blocks(denoiser)[unit[0].block]
        block = denoiser.get_submodule(f"{path}.transformer_blocks.{j}")
        basic_block.remove_structure(denoiser, block, unit, removed)

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        arch = {}
        for b, (path, j) in enumerate(self.blocks(denoiser)):
            shape = basic_block.block_shape(denoiser.get_submodule(f"{path}.transformer_blocks.{j}"))
            if shape:
                arch[str(b)] = shape
        return arch

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        dtype = torch_dtype(model_cfg.torch_dtype)
        if model_cfg.path in self.tiny_configs:
            from obsdiff.models import tiny_unet

            pipe = getattr(tiny_unet, f"build_{model_cfg.path}_pipeline")()
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            import diffusers

            cls = getattr(diffusers, self.pipeline_class)
            try:
                pipe = cls.from_pretrained(
                    self.weights_location(model_cfg), dtype=dtype, **self.load_kwargs()
                )
            except OSError as err:
                raise not_available(model_cfg.path, err) from err
        pipe.set_progress_bar_config(disable=True)
        return self.place(pipe, model_cfg)

    def load_kwargs(self) -> dict:
        return {}

    def text_tokens(self, pipe: Any) -> int:
        return pipe.tokenizer.model_max_length  # CLIP: 77

    def planned_text_tokens(self, model_cfg: Any) -> int:
        return self.tokenizer_length(model_cfg)

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        cfg, p = denoiser.config, next(denoiser.parameters())
        rand = random_inputs(p, generator)
        inputs = {
            "sample": rand(batch, cfg.in_channels, latent_size, latent_size),
            "timestep": torch.full((batch,), 500.0, device=p.device, dtype=p.dtype),
            "encoder_hidden_states": rand(batch, text_tokens, cfg.cross_attention_dim),
        }
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size / crop ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
        return inputs


class SDXLAdapter(UNetAdapter):
    """``StableDiffusionXLPipeline`` (SDXL base 1.0, the tiny SDXL)."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    known_configs = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl_base.json"}
    tiny_configs = {"tiny_sdxl": Path(__file__).with_name("tiny_sdxl.json")}
    # obsdiff-bench --random: name -> (model.path, VAE downscale, prompt tokens)
    random_shapes = {
        "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 8, 77),
        "tiny_sdxl": ("tiny_sdxl", 2, 77),
    }

    def load_kwargs(self) -> dict:
        return {"add_watermarker": False}  # invisible-watermark is not a dependency; latents only

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        def encode(chunk: list[str]) -> dict:
            pe, npe, ppe, nppe = pipe.encode_prompt(
                prompt=chunk, device=pipe.text_encoder.device, do_classifier_free_guidance=guidance_scale > 1
            )
            return {
                "prompt_embeds": pe,
                "negative_prompt_embeds": npe,
                "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe,
            }

        return encode_in_batches(prompts, batch_size, encode)


class SD21Adapter(UNetAdapter):
    """``StableDiffusionPipeline`` with an SD2.1 UNet (SD2.1-base, the tiny SD2.1; SD1.x loads too)."""

    family = "sd21"
    pipeline_class = "StableDiffusionPipeline"
    known_configs = {"stabilityai/stable-diffusion-2-1-base": "sd21_base.json"}
    tiny_configs = {"tiny_sd21": Path(__file__).with_name("tiny_sd21.json")}
    random_shapes = {
        "sd21_base": ("stabilityai/stable-diffusion-2-1-base", 8, 77),
        "tiny_sd21": ("tiny_sd21", 2, 77),
    }

    def load_kwargs(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}  # latents only: nothing to check

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        def encode(chunk: list[str]) -> dict:
            pe, npe = pipe.encode_prompt(
                chunk, pipe.text_encoder.device, 1, do_classifier_free_guidance=guidance_scale > 1
            )
            return {"prompt_embeds": pe, "negative_prompt_embeds": npe}

        return encode_in_batches(prompts, batch_size, encode)
