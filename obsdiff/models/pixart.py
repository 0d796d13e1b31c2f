"""PixArt-Σ adapter (``PixArtSigmaPipeline`` + ``PixArtTransformer2DModel``): PixArt-Σ-XL, the tiny model.

Blocks are the ``transformer_blocks``: diffusers' ``BasicTransformerBlock`` with AdaLN-single
modulation (PixArt-Σ-XL: 28 blocks, 16 heads × d_h 72 = 1152, FFN 4608, tanh-GELU, not gated).
Units, structure groups and shapes are the shared ones of :mod:`obsdiff.models.basic_block`: the
cross-attention K/V of every block read the same tensor (the caption projection of the T5
embedding), so they are one input group, the first unit of the model.

Sampler (FAMILIES.md): ``guidance_scale > 1`` runs CFG on one doubled batch per step (uncond
first), against the empty prompt. The pipeline reports steps through the legacy
``callback(step, t, latents)``, not ``callback_on_step_end``: ``denoise`` adapts the tracker's
hook. Resolution binning is off, so the sampler runs at exactly the configured resolution.
Prompts are lower-cased and stripped by the pipeline (``clean_caption=False``: the caption cleaner
needs ``bs4`` and ``ftfy``, not dependencies here).

The shipped ``configs/pixart_sigma.json`` is the transformer config of
``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` as diffusers' ``convert_pixart_sigma_to_diffusers.py``
builds it for 1024 px (``interpolation_scale`` 2, no micro-conditions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from obsdiff.lazy import nn, torch
from obsdiff.models import basic_block
from obsdiff.models.base import (
    ModelAdapter,
    Unit,
    check_max_sequence_length,
    encode_in_batches,
    not_available,
    random_inputs,
    torch_dtype,
)
from obsdiff.models.structure import StructureUnit

TINY_CONFIG = Path(__file__).with_name("tiny_pixart.json")
BLOCKS = "transformer_blocks"
PIPELINE_HEIGHT_MULTIPLE = 8  # PixArtSigmaPipeline.check_inputs: height and width divisible by 8


class PixArtAdapter(ModelAdapter):
    """``PixArtSigmaPipeline`` + ``PixArtTransformer2DModel`` (PixArt-Σ-XL-2-1024-MS, the tiny model).

    Options: ``max_sequence_length`` (T5 tokens a prompt is padded to; PixArt-Σ was trained with
    300, the pipeline's default; the pipeline does not cap it, so :func:`check_max_sequence_length`
    bounds it as for the other T5 families).
    """

    family = "pixart"
    denoiser_class = "PixArtTransformer2DModel"
    default_targets = basic_block.BASIC_TARGETS
    default_options = {"max_sequence_length": 300}
    known_configs = {"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "pixart_sigma.json"}
    # obsdiff-bench --random: name -> (model.path, VAE downscale, T5 tokens)
    random_shapes = {
        "pixart_sigma": ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 8, 300),
        "tiny_pixart": ("tiny", 2, 16),
    }

    def check_options(self) -> None:
        check_max_sequence_length(self.options)

    # -- config questions ------------------------------------------------------------------------

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path == "tiny":
            return json.loads(TINY_CONFIG.read_text())["transformer"]
        return super().denoiser_config(model_cfg)

    def resolution_grid(self, model_cfg: Any, config: Mapping) -> tuple[int, int | None]:
        """Multiples of VAE factor × patch size that the pipeline also takes (divisible by 8); the
        sin-cos position embedding is recomputed for any size: no upper limit."""
        step, largest = super().resolution_grid(model_cfg, config)
        return math.lcm(step, PIPELINE_HEIGHT_MULTIPLE), largest

    def num_blocks(self, config: Mapping) -> int:
        return config["num_layers"]

    def target_widths(self, config: Mapping, targets: Sequence[str]) -> dict[str, int]:
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        wide = {"ff.net.2": basic_block.FFN_MULT * dim}
        wide |= {t: config["cross_attention_dim"] for t in basic_block.CROSS_KV}
        return {t: wide.get(t, dim) for t in targets}

    def attention_heads(self, config: Mapping) -> dict[str, int]:
        return {"attn1": config["num_attention_heads"], "attn2": config["num_attention_heads"]}

    def denoiser_calls(self, guidance_scale: float, config: Mapping) -> list[int]:
        return [2] if guidance_scale > 1 else [1]  # CFG: one call on the doubled batch

    # -- the pipeline ----------------------------------------------------------------------------

    def load(self, model_cfg: Any) -> Any:
        dtype = torch_dtype(model_cfg.torch_dtype)
        if model_cfg.path == "tiny":
            from obsdiff.models.tiny_pixart import build_tiny_pixart_pipeline

            pipe = build_tiny_pixart_pipeline(TINY_CONFIG)
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            from diffusers import PixArtSigmaPipeline

            try:
                pipe = PixArtSigmaPipeline.from_pretrained(self.weights_location(model_cfg), dtype=dtype)
            except OSError as err:
                raise not_available(model_cfg.path, err) from err
        pipe.set_progress_bar_config(disable=True)
        return self.place(pipe, model_cfg)

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        indices = range(len(getattr(denoiser, BLOCKS))) if blocks is None else sorted(blocks)
        return basic_block.basic_units(denoiser, [f"{BLOCKS}.{b}" for b in indices], targets)

    def encode(self, pipe: Any, prompts: list[str], guidance_scale: float, batch_size: int) -> dict:
        def encode(chunk: list[str]) -> dict:
            pe, mask, npe, nmask = pipe.encode_prompt(
                prompt=chunk,
                do_classifier_free_guidance=guidance_scale > 1,
                negative_prompt="",
                device=pipe.text_encoder.device,
                clean_caption=False,
                max_sequence_length=self.options["max_sequence_length"],
            )
            return {
                "prompt_embeds": pe,
                "prompt_attention_mask": mask,
                "negative_prompt_embeds": npe,
                "negative_prompt_attention_mask": nmask,
            }

        return encode_in_batches(prompts, batch_size, encode)

    def step_callback(self, pipe: Any, callback: Any) -> dict:
        """PixArtSigmaPipeline takes only the legacy ``callback(step, t, latents)`` (it swallows
        ``callback_on_step_end``): each step calls ``callback(pipe, step, t, {"latents": latents})``."""
        if callback is None:
            return {}

        def legacy(step: int, timestep: Any, latents: Any) -> None:
            callback(pipe, step, timestep, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1}

    def sampler_kwargs(self, pipe: Any, guidance_scale: float) -> dict:
        return {
            "guidance_scale": guidance_scale,
            "negative_prompt": None,  # the default "" clashes with pre-encoded negative_prompt_embeds
            "max_sequence_length": self.options["max_sequence_length"],
            "use_resolution_binning": False,  # binning would move 512 px to a 1024 px bin
        }

    def text_tokens(self, pipe: Any) -> int:
        return self.options["max_sequence_length"]  # the cross-attention reads the padded T5 tokens

    def planned_text_tokens(self, model_cfg: Any) -> int:
        return self.options["max_sequence_length"]

    def example_inputs(
        self, denoiser: nn.Module, batch: int, latent_size: int, text_tokens: int, generator: Any = None
    ) -> dict:
        cfg, p = denoiser.config, next(denoiser.parameters())
        rand = random_inputs(p, generator)

        return {
            "hidden_states": rand(batch, cfg.in_channels, latent_size, latent_size),
            "encoder_hidden_states": rand(batch, text_tokens, cfg.caption_channels),
            "timestep": torch.full((batch,), 500.0, device=p.device, dtype=p.dtype),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    # -- structured pruning ----------------------------------------------------------------------

    def structure_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructureUnit]:
        layers = getattr(denoiser, BLOCKS)
        return basic_block.structure_units([(b, f"{BLOCKS}.{b}", layers[b]) for b in sorted(blocks)])

    def remove_structure(
        self, denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
    ) -> None:
        block = getattr(denoiser, BLOCKS)[unit[0].block]
        basic_block.remove_structure(denoiser, block, unit, removed)

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        shapes = {str(b): basic_block.block_shape(block) for b, block in enumerate(getattr(denoiser, BLOCKS))}
        return {b: shape for b, shape in shapes.items() if shape}


__all__ = ["PixArtAdapter"]
