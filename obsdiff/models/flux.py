"""Flux.1 adapter (``FluxPipeline`` + ``FluxTransformer2DModel``): FLUX.1-dev / schnell, the tiny models.

Blocks, in forward order, are the double-stream blocks (``transformer_blocks``, MMDiT-like: an
image and a text stream with joint attention) then the single-stream blocks
(``single_transformer_blocks``): block ``b`` of ``pruner.blocks`` is double block ``b`` while
``b < num_layers``, else single block ``b - num_layers`` (FLUX.1-dev: 19 + 38 = 57).

In a single block ``attn.to_q/k/v`` and ``proj_mlp`` read the same normalised input (one unit, one
Hessian for four layers) and ``proj_out`` reads ``[attention (heads · d_h) | gelu(proj_mlp) (m)]``:
its head columns and MLP columns are two structure groups of one layer, compensated jointly.

Guidance (FAMILIES.md): a guidance-distilled denoiser (``guidance_embeds``: FLUX.1-dev) takes
``guidance_scale`` as an embedding — one call per step, batch not doubled — and runs true CFG
(two calls per step) only with ``model.options.true_cfg_scale > 1``. Without the embedding
(schnell, the trained tiny digits Flux) ``guidance_scale > 1`` means true CFG against the empty
prompt. Either way the step tracker counts sampler steps, not denoiser calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models.base import (
    ModelAdapter,
    ModelConfigError,
    Unit,
    check_max_sequence_length,
    encode_in_batches,
    not_available,
    random_inputs,
    table_units,
    torch_dtype,
)
from obsdiff.models.structure import HeadGroup, NeuronGroup, StructureUnit, slice_unit

TINY_CONFIG = Path(__file__).with_name("tiny_flux.json")
DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"

DOUBLE_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
# Single-block targets carry a ``single.`` prefix: ``attn.to_q`` exists in both kinds of block.
SINGLE_TARGETS = (
    "single.attn.to_q",
    "single.attn.to_k",
    "single.attn.to_v",
    "single.proj_mlp",
    "single.proj_out",
)
DOUBLE_UNITS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    (("attn.to_out.0",), ("attn.to_add_out",)),
    (("ff.net.0.proj",), ("ff_context.net.0.proj",)),
    (("ff.net.2",), ("ff_context.net.2",)),
)
SINGLE_UNITS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("single.attn.to_q", "single.attn.to_k", "single.attn.to_v", "single.proj_mlp"),),
    (("single.proj_out",),),
)
HEAD_INPUTS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
MLP_RATIO = 4  # FeedForward and the single block's MLP: 4 × width


class FluxAdapter(ModelAdapter):
    """Flux.1 double- and single-stream blocks.

    Options: ``max_sequence_length`` (T5 tokens; the model cards: dev 512, schnell 256) and
    ``true_cfg_scale`` (guidance-distilled models only: > 1 adds a second, unconditional call
    per step against the empty prompt).
    """

    family = "flux"
    denoiser_class = "FluxTransformer2DModel"
    default_targets = DOUBLE_TARGETS + SINGLE_TARGETS
    default_options = {"max_sequence_length": 512, "true_cfg_scale": 1.0}
    latent_packing = 2  # the pipeline packs 2x2 latent cells into one token
    embedded = {"tiny_digits_flux": Path(__file__).with_name("tiny_digits_flux")}
    known_configs = {
        "black-forest-labs/FLUX.1-dev": "flux_dev.json",
        "black-forest-labs/FLUX.1-schnell": "flux_schnell.json",
    }
    # obsdiff-bench --random: name -> (model.path, VAE downscale, T5 tokens)
    random_shapes = {
        "flux_dev": ("black-forest-labs/FLUX.1-dev", 8, 512),
        "flux_schnell": ("black-forest-labs/FLUX.1-schnell", 8, 256),
        "tiny_flux": ("tiny", 2, 16),
    }

    def check_options(self) -> None:
        check_max_sequence_length(self.options)
        true_cfg = self.options["true_cfg_scale"]
        if not isinstance(true_cfg, int | float) or not 0 <= true_cfg < float("inf"):
            raise ModelConfigError(
                f"model.options.true_cfg_scale={true_cfg!r}; allowed: a finite number >= 0"
            )

    # -- config questions ------------------------------------------------------------------------

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path == "tiny":
            return json.loads(TINY_CONFIG.read_text())["transformer"]
        return super().denoiser_config(model_cfg)

    def num_blocks(self, config: Mapping) -> int:
        return config["num_layers"] + config["num_single_layers"]

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        wide = {
            "ff.net.2": MLP_RATIO * dim,
            "ff_context.net.2": MLP_RATIO * dim,
            "single.proj_out": (1 + MLP_RATIO) * dim,
        }
        return {t: wide.get(t, dim) for t in targets}

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        return {"attn": config["num_attention_heads"]}

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        return [1, 1] if self._true_cfg(guidance_scale, config) > 1 else [1]

    def _true_cfg(self, guidance_scale: float, config: Mapping) -> float:
        """The true-CFG scale the pipeline runs with (> 1: two calls per step)."""
        return self.options["true_cfg_scale"] if config.get("guidance_embeds") else guidance_scale

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        dtype = torch_dtype(model_cfg.torch_dtype)
        if model_cfg.path == "tiny":
            from obsdiff.models.tiny_flux import build_tiny_flux_pipeline

            pipe = build_tiny_flux_pipeline()
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            from diffusers import FluxPipeline

            try:
                pipe = FluxPipeline.from_pretrained(self.weights_location(model_cfg), dtype=dtype)
            except OSError as err:
                raise not_available(model_cfg.path, err) from err
        pipe.set_progress_bar_config(disable=True)
        return self.place(pipe, model_cfg)

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        num_double = len(denoiser.transformer_blocks)
        num = num_double + len(denoiser.single_transformer_blocks)
        indices = range(num) if blocks is None else sorted(blocks)

        def table_of(b: int) -> tuple:
            if b < num_double:
                return _prefix(b, num_double), DOUBLE_UNITS, ""
            return _prefix(b, num_double), SINGLE_UNITS, "single."  # single-block targets carry a tag

        return table_units(denoiser, indices, table_of, targets)

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        config = pipe.transformer.config
        true_cfg = self._true_cfg(guidance_scale, config) > 1
        device = pipe.text_encoder.device

        def encode(chunk: list[str]) -> dict:
            out = dict(
                zip(("prompt_embeds", "pooled_prompt_embeds"), self._encode(pipe, chunk, device), strict=True)
            )
            if true_cfg:  # the unconditional branch: the empty prompt
                neg = self._encode(pipe, [""] * len(chunk), device)
                out |= dict(
                    zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"), neg, strict=True)
                )
            return out

        return encode_in_batches(prompts, batch_size, encode)

    def _encode(self, pipe: Any, prompts: list[str], device: Any) -> tuple:
        with torch.no_grad():
            pe, ppe, _ = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=device,
                max_sequence_length=self.options["max_sequence_length"],
            )
        return pe, ppe

    def sampler_kwargs(self, pipe: Any, guidance_scale: float) -> dict:
        return {
            "true_cfg_scale": self._true_cfg(guidance_scale, pipe.transformer.config),
            "guidance_scale": guidance_scale,  # the embedding of guidance-distilled models
            "max_sequence_length": self.options["max_sequence_length"],
        }

    def text_tokens(self, pipe: Any) -> int:
        return self.options["max_sequence_length"]  # the joint attention reads the T5 tokens only

    def planned_text_tokens(self, model_cfg: Any) -> int:
        return self.options["max_sequence_length"]

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        cfg, p = denoiser.config, next(denoiser.parameters())
        tokens = (latent_size // 2) ** 2  # 2×2 latent patches are packed into one token
        rand = random_inputs(p, generator)

        inputs = {
            "hidden_states": rand(batch, tokens, cfg.in_channels),
            "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
            "pooled_projections": rand(batch, cfg.pooled_projection_dim),
            "timestep": torch.full((batch,), 0.5, device=p.device, dtype=p.dtype),
            "img_ids": torch.zeros(tokens, 3, device=p.device, dtype=p.dtype),
            "txt_ids": torch.zeros(text_tokens, 3, device=p.device, dtype=p.dtype),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=p.device, dtype=p.dtype)
        return inputs

    # -- structured pruning ----------------------------------------------------------------------

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        head_dim, num_double = denoiser.config.attention_head_dim, len(denoiser.transformer_blocks)
        units: list[StructureUnit] = []
        for b in sorted(blocks):
            prefix = _prefix(b, num_double)
            block = _block(denoiser, b)
            inputs = tuple(
                f"{prefix}.attn.{n}" for n in HEAD_INPUTS if getattr(block.attn, n, None) is not None
            )
            attn_cols = (0, block.attn.heads * head_dim)
            if b < num_double:  # joint attention: both output projections, then both FFNs
                outputs = (f"{prefix}.attn.to_out.0", f"{prefix}.attn.to_add_out")
                units.append((HeadGroup(b, "attn", outputs, inputs, attn_cols, head_dim),))
                units.append(tuple(
                    NeuronGroup(b, name, f"{prefix}.{name}.net.2", (f"{prefix}.{name}.net.0.proj",),
                                (0, getattr(block, name).net[2].in_features))
                    for name in ("ff", "ff_context")
                ))  # fmt: skip
            else:  # proj_out = [heads | MLP]: heads first, then neurons, on one Hessian
                mlp = (attn_cols[1], attn_cols[1] + block.proj_mlp.out_features)
                units.append((
                    HeadGroup(b, "attn", (f"{prefix}.proj_out",), inputs, attn_cols, head_dim),
                    NeuronGroup(b, "mlp", f"{prefix}.proj_out", (f"{prefix}.proj_mlp",), mlp),
                ))  # fmt: skip
        return units

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        slice_unit(denoiser, unit, removed)
        block = _block(denoiser, unit[0].block)
        for group in unit:
            if isinstance(group, HeadGroup):  # processors infer heads from head_dim; IP-adapters read these
                block.attn.heads = group.num_heads - len(removed.get(group.key, []))
                block.attn.inner_dim = block.attn.heads * group.head_dim
        if hasattr(block, "proj_mlp"):
            block.mlp_hidden_dim = block.proj_mlp.out_features

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        cfg = denoiser.config
        dense_heads, dense_ff = (
            cfg.num_attention_heads,
            MLP_RATIO * cfg.num_attention_heads * cfg.attention_head_dim,
        )
        num_double, arch = len(denoiser.transformer_blocks), {}
        for b in range(self.num_blocks(cfg)):
            block = _block(denoiser, b)
            shape = {"attn": block.attn.heads}
            if b < num_double:
                shape |= {
                    "ff": block.ff.net[2].in_features,
                    "ff_context": block.ff_context.net[2].in_features,
                }
            else:
                shape["mlp"] = block.proj_mlp.out_features
            changed = {k: v for k, v in shape.items() if v != (dense_heads if k == "attn" else dense_ff)}
            if changed:
                arch[str(b)] = changed
        return arch


def _prefix(b: int, num_double: int) -> str:
    return f"{DOUBLE}.{b}" if b < num_double else f"{SINGLE}.{b - num_double}"


def _block(denoiser: nn.Module, b: int) -> nn.Module:
    num_double = len(denoiser.transformer_blocks)
    return (
        denoiser.transformer_blocks[b]
        if b < num_double
        else denoiser.single_transformer_blocks[b - num_double]
    )
