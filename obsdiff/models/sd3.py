"""Stable Diffusion 3 / 3.5 (MMDiT) adapter: blocks, target layers, basic units, sampler."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from obsdiff.models.base import DTYPES, ModelAdapter, ModelNotAvailableError, Unit, offline, resolve_device

TINY_CONFIG = Path(__file__).with_name("tiny_sd3.json")

# METHOD.md §5: every linear layer of attention and FFN in a joint transformer block.
SD3_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
# SD3.5-Medium's dual-attention blocks add an image-only self-attention.
DUAL_ATTENTION_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

# METHOD.md §3: basic units of an MMDiT block, each a list of input groups.
SD3_UNITS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    (("attn2.to_q", "attn2.to_k", "attn2.to_v"),),
    (("attn.to_out.0",), ("attn.to_add_out",)),
    (("attn2.to_out.0",),),
    (("ff.net.0.proj",), ("ff_context.net.0.proj",)),
    (("ff.net.2",), ("ff_context.net.2",)),
)
FFN_DOWN = ("ff.net.2", "ff_context.net.2")


class SD3Adapter(ModelAdapter):
    """``StableDiffusion3Pipeline`` + ``SD3Transformer2DModel`` (SD3-Medium, SD3.5, the tiny model)."""

    family = "sd3"
    default_targets = SD3_TARGETS + DUAL_ATTENTION_TARGETS

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path == "tiny":
            return json.loads(TINY_CONFIG.read_text())["transformer"]
        from diffusers import SD3Transformer2DModel

        try:
            return dict(SD3Transformer2DModel.load_config(model_cfg.path, subfolder="transformer"))
        except (OSError, ValueError) as err:
            raise self._not_available(model_cfg.path, err) from err

    def check(self, model_cfg: Any, blocks: Sequence[int] | None, targets: Sequence[str]) -> dict[str, int]:
        config = self.denoiser_config(model_cfg)
        num_layers = config["num_layers"]
        bad_blocks = [b for b in (blocks or []) if not 0 <= b < num_layers]
        if bad_blocks:
            raise ValueError(f"pruner.blocks: {bad_blocks} out of range for a model with {num_layers} blocks")
        unknown = [t for t in targets if t not in self.default_targets]
        if unknown:
            raise ValueError(f"pruner.targets: unknown {unknown}; allowed: {list(self.default_targets)}")
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        return {t: 4 * dim if t in FFN_DOWN else dim for t in targets}

    def load(self, model_cfg: Any) -> Any:
        device = resolve_device(model_cfg.device)
        dtype = DTYPES[model_cfg.torch_dtype]
        if model_cfg.path == "tiny":
            from obsdiff.models.tiny_sd3 import build_tiny_sd3_pipeline

            pipe = build_tiny_sd3_pipeline()
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            from diffusers import StableDiffusion3Pipeline

            kwargs: dict[str, Any] = {"torch_dtype": dtype}
            if model_cfg.text_encoder_3 is None:
                kwargs.update(text_encoder_3=None, tokenizer_3=None)
            try:
                pipe = StableDiffusion3Pipeline.from_pretrained(model_cfg.path, **kwargs)
            except OSError as err:
                raise self._not_available(model_cfg.path, err) from err
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    @staticmethod
    def _not_available(path: str, err: Exception) -> ModelNotAvailableError:
        mode = "offline (HF_HUB_OFFLINE=1)" if offline() else "online"
        return ModelNotAvailableError(
            f"model.path={path!r}: weights not found ({mode}): {err}. Point model.path at a local "
            f"diffusers folder, or download it first (`huggingface-cli download {path}`) on a machine "
            "with internet access and a Hugging Face token that has accepted the model licence."
        )

    def denoiser(self, pipe: Any) -> nn.Module:
        return pipe.transformer

    def units(self, denoiser: nn.Module, blocks: Sequence[int] | None, targets: Sequence[str]) -> list[Unit]:
        wanted = set(targets)
        modules = dict(denoiser.named_modules())
        indices = range(len(denoiser.transformer_blocks)) if blocks is None else sorted(blocks)
        units: list[Unit] = []
        for b in indices:
            for unit in SD3_UNITS:
                groups = []
                for group in unit:
                    names = tuple(f"transformer_blocks.{b}.{n}" for n in group if n in wanted)
                    names = tuple(n for n in names if isinstance(modules.get(n), nn.Linear))
                    if names:
                        groups.append(names)
                if groups:
                    units.append(groups)
        return units

    def encode(
        self,
        pipe: Any,
        prompts: list[str],
        guidance_scale: float,
        batch_size: int,
        max_sequence_length: int = 256,
    ) -> dict:
        do_cfg = guidance_scale > 1
        device = pipe.text_encoder.device
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            with torch.no_grad():
                pe, npe, ppe, nppe = pipe.encode_prompt(
                    prompt=chunk,
                    prompt_2=None,
                    prompt_3=None,
                    device=device,
                    do_classifier_free_guidance=do_cfg,
                    max_sequence_length=max_sequence_length,
                )
            out = {
                "prompt_embeds": pe,
                "pooled_prompt_embeds": ppe,
                "negative_prompt_embeds": npe,
                "negative_pooled_prompt_embeds": nppe,
            }
            for key, value in out.items():
                if value is not None:
                    parts.setdefault(key, []).append(value.cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

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
        device = pipe.transformer.device
        with torch.no_grad():
            out = pipe(
                **{k: v.to(device) for k, v in embeds.items()},
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type=output_type,
                callback_on_step_end=callback,
            )
        return out.images

    def offload_text_encoders(self, pipe: Any) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.to("cpu")
