"""Stable Diffusion 3 / 3.5 (MMDiT) adapter: blocks, target layers, basic units, sampler."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from obsdiff.models.base import (
    DTYPES,
    ModelAdapter,
    ModelNotAvailableError,
    StructuredUnit,
    Unit,
    keep_linear,
    offline,
    resolve_device,
)

TINY_CONFIG = Path(__file__).with_name("tiny_sd3.json")
# Trained pipelines shipped in the package, by the name ``model.path`` gives them.
EMBEDDED = {"tiny_digits": Path(__file__).with_name("tiny_digits")}

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
# METHOD.md §4: heads are scored on both output projections; Q/K/V rows follow without compensation.
HEAD_OUTPUTS = ("attn.to_out.0", "attn.to_add_out")
HEAD_INPUTS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def local_path(path: str) -> str:
    """The packaged folder of an embedded model's name (``tiny_digits``); any other path unchanged."""
    return str(EMBEDDED[path]) if path in EMBEDDED else path


class SD3Adapter(ModelAdapter):
    """``StableDiffusion3Pipeline`` + ``SD3Transformer2DModel`` (SD3-Medium, SD3.5, the tiny model)."""

    family = "sd3"
    default_targets = SD3_TARGETS + DUAL_ATTENTION_TARGETS

    def weights_location(self, model_cfg: Any) -> str:
        """The packaged folder of an embedded model, else ``model.path``."""
        return local_path(model_cfg.path)

    def denoiser_config(self, model_cfg: Any) -> dict:
        if model_cfg.path == "tiny":
            return json.loads(TINY_CONFIG.read_text())["transformer"]
        from diffusers import SD3Transformer2DModel

        try:
            return dict(
                SD3Transformer2DModel.load_config(self.weights_location(model_cfg), subfolder="transformer")
            )
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
                pipe = StableDiffusion3Pipeline.from_pretrained(self.weights_location(model_cfg), **kwargs)
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

    def text_tokens(self, pipe: Any, max_sequence_length: int) -> int:
        # CLIP tokens + T5 tokens (zeros when T5 is dropped, still attended to).
        return pipe.tokenizer_max_length + max_sequence_length

    def empty_denoiser(self, config: dict, device: torch.device | str = "meta") -> nn.Module:
        from diffusers import SD3Transformer2DModel

        with torch.device(device):
            return SD3Transformer2DModel.from_config(
                {k: v for k, v in config.items() if not k.startswith("_")}
            )

    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int,
        latent_size: int,
        text_tokens: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg, p = denoiser.config, next(denoiser.parameters())

        def rand(*shape: int) -> torch.Tensor:
            if p.device.type == "meta":
                return torch.empty(shape, device="meta", dtype=p.dtype)
            return torch.randn(shape, generator=generator).to(p.device, p.dtype)

        return {
            "hidden_states": rand(batch, cfg.in_channels, latent_size, latent_size),
            "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
            "pooled_projections": rand(batch, cfg.pooled_projection_dim),
            "timestep": torch.full((batch,), 500.0, device=p.device, dtype=p.dtype),
        }

    def structured_units(self, denoiser: nn.Module, blocks: Sequence[int]) -> list[StructuredUnit]:
        head_dim = denoiser.config.attention_head_dim
        units = []
        for b in sorted(blocks):
            block = denoiser.transformer_blocks[b]
            if not block.context_pre_only:  # joint attention needs both output projections
                units.append(
                    StructuredUnit(
                        "heads", b, tuple(f"transformer_blocks.{b}.{n}" for n in HEAD_OUTPUTS), head_dim
                    )
                )
            ffns = [n for n in FFN_DOWN if getattr(block, n.split(".")[0]) is not None]
            units.append(StructuredUnit("ffn", b, tuple(f"transformer_blocks.{b}.{n}" for n in ffns)))
        return units

    def remove_structure(
        self, denoiser: nn.Module, unit: StructuredUnit, removed: dict[str, list[int]]
    ) -> None:
        block = denoiser.transformer_blocks[unit.block]
        if unit.kind == "heads":
            heads = sorted(set(removed[unit.layers[0]]))
            _remove_heads(block.attn, heads, unit.head_dim)
        else:
            for layer, cols in removed.items():
                ff = getattr(block, layer.split(".")[-3])  # transformer_blocks.{b}.<ff|ff_context>.net.2
                keep = _complement(ff.net[2].in_features, cols)
                ff.net[0].proj = keep_linear(ff.net[0].proj, rows=keep)  # up-projection rows + bias
                ff.net[2] = keep_linear(ff.net[2], cols=keep)  # down-projection input columns

    def architecture(self, denoiser: nn.Module) -> dict[str, dict[str, int]]:
        cfg = denoiser.config
        dense = {"heads": cfg.num_attention_heads, "ff": 4 * cfg.num_attention_heads * cfg.attention_head_dim}
        arch: dict[str, dict[str, int]] = {}
        for b, block in enumerate(denoiser.transformer_blocks):
            shape = {"heads": block.attn.heads, "ff": block.ff.net[2].in_features}
            if block.ff_context is not None:
                shape["ff_context"] = block.ff_context.net[2].in_features
            changed = {k: v for k, v in shape.items() if v != dense["heads" if k == "heads" else "ff"]}
            if changed:
                arch[str(b)] = changed
        return arch

    def reshape(self, denoiser: nn.Module, architecture: dict[str, dict[str, int]]) -> None:
        head_dim = denoiser.config.attention_head_dim
        for b, shape in architecture.items():
            block = denoiser.transformer_blocks[int(b)]
            if "heads" in shape:  # keep the first heads / neurons; the weights are loaded after
                _remove_heads(block.attn, list(range(shape["heads"], block.attn.heads)), head_dim)
            removed = {
                f"transformer_blocks.{b}.{name}.net.2": list(
                    range(shape[name], getattr(block, name).net[2].in_features)
                )
                for name in ("ff", "ff_context")
                if name in shape
            }
            self.remove_structure(denoiser, StructuredUnit("ffn", int(b), tuple(removed)), removed)


def _complement(size: int, removed: Sequence[int]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[list(removed)] = False
    return keep.nonzero().flatten()


def _remove_heads(attn: nn.Module, heads: Sequence[int], head_dim: int) -> None:
    """Delete ``heads`` of a joint attention: Q/K/V (+ context Q/K/V) rows, output columns."""
    if not heads:
        return
    keep_heads = _complement(attn.heads, heads)
    keep = (keep_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # kept channels
    for name in HEAD_INPUTS:
        if getattr(attn, name, None) is not None:
            setattr(attn, name, keep_linear(getattr(attn, name), rows=keep))
    attn.to_out[0] = keep_linear(attn.to_out[0], cols=keep)
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = keep_linear(attn.to_add_out, cols=keep)
    attn.heads = len(keep_heads)  # the stock processors read the head count from here
    attn.inner_dim = attn.inner_kv_dim = len(keep)
