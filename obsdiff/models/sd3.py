"""Stable Diffusion 3 / 3.5 (MMDiT) adapter: blocks, target layers, units, structure, sampler."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models.base import (
    ModelAdapter,
    ModelConfigError,
    ModelNotAvailableError,
    Unit,
    check_max_sequence_length,
    encode_in_batches,
    not_available,
    random_inputs,
    table_units,
    torch_dtype,
)
from obsdiff.models.structure import HeadGroup, NeuronGroup, StructureUnit, slice_unit

TINY_CONFIG = Path(__file__).with_name("tiny_sd3.json")
# The random-weight tiny models, by model.path: SD3-Medium's layout, and SD3.5-Medium's (attn2 in
# blocks 0-2 of 4, RMS q/k norms), both built deterministically from their JSON.
TINY_CONFIGS = {"tiny": TINY_CONFIG, "tiny_sd35": Path(__file__).with_name("tiny_sd35.json")}

# docs/METHOD.md §5: every linear layer of attention and FFN in a joint transformer block.
SD3_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
# SD3.5-Medium's dual-attention blocks add an image-only self-attention.
DUAL_ATTENTION_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

# docs/METHOD.md §3: basic units of an MMDiT block, each a list of input groups.
SD3_UNITS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    (("attn2.to_q", "attn2.to_k", "attn2.to_v"),),
    (("attn.to_out.0",), ("attn.to_add_out",)),
    (("attn2.to_out.0",),),
    (("ff.net.0.proj",), ("ff_context.net.0.proj",)),
    (("ff.net.2",), ("ff_context.net.2",)),
)
FFN_DOWN = ("ff.net.2", "ff_context.net.2")
# docs/METHOD.md §4: heads are scored on both output projections; Q/K/V rows follow without compensation.
HEAD_INPUTS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class SD3Adapter(ModelAdapter):
    """``StableDiffusion3Pipeline`` + ``SD3Transformer2DModel`` (SD3-Medium, SD3.5, the tiny models).

    Options: ``text_encoder_3`` (``null`` drops T5-XXL: the pipeline feeds zero T5 rows) and
    ``max_sequence_length`` (T5 tokens, zero rows without T5, as at inference).
    """

    family = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    default_targets = SD3_TARGETS + DUAL_ATTENTION_TARGETS
    default_options = {"text_encoder_3": "auto", "max_sequence_length": 256}
    embedded = {"tiny_digits": Path(__file__).with_name("tiny_digits")}
    known_configs = {
        "stabilityai/stable-diffusion-3-medium-diffusers": "sd3_medium.json",
        "stabilityai/stable-diffusion-3.5-large": "sd35_large.json",
        "stabilityai/stable-diffusion-3.5-medium": "sd35_medium.json",
    }
    # obsdiff-bench --random: name -> (model.path, VAE downscale, prompt tokens: 77 CLIP + T5)
    random_shapes = {
        "sd3_medium": ("stabilityai/stable-diffusion-3-medium-diffusers", 8, 77 + 256),
        "sd35_large": ("stabilityai/stable-diffusion-3.5-large", 8, 77 + 256),
        "tiny": ("tiny", 2, 77),
        "tiny_sd35": ("tiny_sd35", 2, 77),
    }

    def check_options(self) -> None:
        check_max_sequence_length(self.options)
        te3 = self.options["text_encoder_3"]
        if te3 not in ("auto", None):
            raise ModelConfigError(f"model.options.text_encoder_3={te3!r}; allowed: auto, null (drops T5)")

    # -- config questions ------------------------------------------------------------------------

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path in TINY_CONFIGS:
            return json.loads(TINY_CONFIGS[model_cfg.path].read_text())["transformer"]
        return super().denoiser_config(model_cfg)

    def num_blocks(self, config: Mapping) -> int:
        return config["num_layers"]

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        return {t: 4 * dim if t in FFN_DOWN else dim for t in targets}

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        heads = {"attn": config["num_attention_heads"]}
        if config.get("dual_attention_layers"):
            heads["attn2"] = config["num_attention_heads"]
        return heads

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        return [2] if guidance_scale > 1 else [1]  # CFG: one call on the doubled batch

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        dtype = torch_dtype(model_cfg.torch_dtype)
        if model_cfg.path in TINY_CONFIGS:
            from obsdiff.models.tiny_sd3 import build_tiny_sd3_pipeline

            pipe = build_tiny_sd3_pipeline(TINY_CONFIGS[model_cfg.path])
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            from diffusers import StableDiffusion3Pipeline

            kwargs: dict[str, Any] = {"dtype": dtype}
            if self.options["text_encoder_3"] is None:
                kwargs.update(text_encoder_3=None, tokenizer_3=None)
            try:
                pipe = StableDiffusion3Pipeline.from_pretrained(self.weights_location(model_cfg), **kwargs)
            except OSError as err:
                raise not_available(model_cfg.path, err) from err
        pipe.set_progress_bar_config(disable=True)
        return self.place(pipe, model_cfg)

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        indices = range(len(denoiser.transformer_blocks)) if blocks is None else sorted(blocks)
        return table_units(denoiser, indices, lambda b: (f"transformer_blocks.{b}", SD3_UNITS, ""), targets)

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        def encode(chunk: list[str]) -> dict:
            pe, npe, ppe, nppe = pipe.encode_prompt(
                prompt=chunk,
                prompt_2=None,
                prompt_3=None,
                device=pipe.text_encoder.device,
                do_classifier_free_guidance=guidance_scale > 1,
                max_sequence_length=self.options["max_sequence_length"],
            )
            return {
                "prompt_embeds": pe,
                "pooled_prompt_embeds": ppe,
                "negative_prompt_embeds": npe,
                "negative_pooled_prompt_embeds": nppe,
            }

        return encode_in_batches(prompts, batch_size, encode)

    def text_tokens(self, pipe: Any) -> int:
        # CLIP tokens + T5 tokens (zeros when T5 is dropped, still attended to).
        return pipe.tokenizer_max_length + self.options["max_sequence_length"]

    def planned_text_tokens(self, model_cfg: Any) -> int:
        return self.tokenizer_length(model_cfg) + self.options["max_sequence_length"]

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        cfg, p = denoiser.config, next(denoiser.parameters())
        rand = random_inputs(p, generator)

        return {
            "hidden_states": rand(batch, cfg.in_channels, latent_size, latent_size),
            "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
            "pooled_projections": rand(batch, cfg.pooled_projection_dim),
            "timestep": torch.full((batch,), 500.0, device=p.device, dtype=p.dtype),
        }

    # -- structured pruning ----------------------------------------------------------------------

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        head_dim = denoiser.config.attention_head_dim
        units: list[StructureUnit] = []
        for b in sorted(blocks):
            block, prefix = denoiser.transformer_blocks[b], f"transformer_blocks.{b}"
            if not block.context_pre_only:  # joint attention needs both output projections
                units.append((_heads(block.attn, b, "attn", prefix, ("to_out.0", "to_add_out"), head_dim),))
            if getattr(block, "attn2", None) is not None:  # SD3.5 dual attention: image-only
                units.append((_heads(block.attn2, b, "attn2", prefix, ("to_out.0",), head_dim),))
            ffns = [name for name in ("ff", "ff_context") if getattr(block, name, None) is not None]
            units.append(tuple(_neurons(getattr(block, name), b, name, prefix) for name in ffns))
        return units

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        slice_unit(denoiser, unit, removed)
        for group in unit:
            if isinstance(group, HeadGroup):
                attn = denoiser.transformer_blocks[group.block].get_submodule(group.name)
                attn.heads = group.num_heads - len(removed.get(group.key, []))  # processors read it
                attn.inner_dim = attn.inner_kv_dim = attn.heads * group.head_dim

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        cfg = denoiser.config
        dense_heads, dense_ff = cfg.num_attention_heads, 4 * cfg.num_attention_heads * cfg.attention_head_dim
        arch: dict[str, dict[str, int]] = {}
        for b, block in enumerate(denoiser.transformer_blocks):
            shape = {"attn": block.attn.heads, "ff": block.ff.net[2].in_features}
            if getattr(block, "attn2", None) is not None:
                shape["attn2"] = block.attn2.heads
            if block.ff_context is not None:
                shape["ff_context"] = block.ff_context.net[2].in_features
            changed = {
                k: v for k, v in shape.items() if v != (dense_heads if k.startswith("attn") else dense_ff)
            }
            if changed:
                arch[str(b)] = changed
        return arch


def _heads(
    attn: nn.Module, b: int, name: str, prefix: str, outputs: tuple[str, ...], head_dim: int
) -> HeadGroup:
    inputs = tuple(f"{prefix}.{name}.{n}" for n in HEAD_INPUTS if getattr(attn, n, None) is not None)
    return HeadGroup(
        block=b,
        name=name,
        outputs=tuple(f"{prefix}.{name}.{n}" for n in outputs),
        inputs=inputs,
        cols=(0, attn.heads * head_dim),
        head_dim=head_dim,
    )


def _neurons(ff: nn.Module, b: int, name: str, prefix: str) -> NeuronGroup:
    return NeuronGroup(
        block=b,
        name=name,
        down=f"{prefix}.{name}.net.2",
        up=(f"{prefix}.{name}.net.0.proj",),
        cols=(0, ff.net[2].in_features),
    )


__all__ = ["SD3Adapter", "ModelNotAvailableError"]
