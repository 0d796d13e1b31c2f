"""The tiny random Flux.1 pipeline: sizes, tokenizers, determinism, both guidance modes, save and reload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from obsdiff.models.tiny_flux import build_t5_tokenizer, build_tiny_flux_pipeline, load_tiny_flux_config

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
SAMPLE_KWARGS = {
    "num_inference_steps": 2,
    "guidance_scale": 3.5,
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
    "output_type": "pt",
}


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    """One tiny pipeline shared by the read-only tests of this module."""
    pipeline = build_tiny_flux_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline: FluxPipeline, prompt: str = "a red 7", seed: int = 0, **kwargs) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] for ``prompt`` with one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompt, generator=generator, **{**SAMPLE_KWARGS, **kwargs}).images


def assert_same_weights(first: FluxPipeline, second: FluxPipeline) -> None:
    """Every component of two pipelines has bit-identical parameters and buffers."""
    for name in COMPONENTS:
        left, right = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key}"


def test_sizes_match_the_config(pipe) -> None:
    config = load_tiny_flux_config()
    transformer = pipe.transformer
    assert isinstance(transformer, FluxTransformer2DModel) and transformer.config.guidance_embeds
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 2
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim == 16
    # Flux packs 2×2 latent patches: 4 latent channels become 16 token channels.
    assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 2
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert pipe.text_encoder_2.config.d_model == transformer.config.joint_attention_dim == 32
    assert pipe.text_encoder.config.hidden_size == transformer.config.pooled_projection_dim == 32
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer_2.model_max_length == config["max_sequence_length"] == 16


def test_single_block_reads_one_input_for_attention_and_mlp(pipe) -> None:
    block = pipe.transformer.single_transformer_blocks[0]
    heads, head_dim = pipe.transformer.config.num_attention_heads, pipe.transformer.config.attention_head_dim
    assert block.proj_out.in_features == heads * head_dim + block.mlp_hidden_dim
    assert block.mlp_hidden_dim == 4 * heads * head_dim
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: getattr(block.attn, name) for name in ("to_q", "to_k", "to_v")}
    layers["proj_mlp"] = block.proj_mlp
    handles = [
        layer.register_forward_pre_hook(lambda _, args, name=name: inputs.setdefault(name, args[0]))
        for name, layer in layers.items()
    ]
    try:
        sample(pipe, num_inference_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert set(inputs) == set(layers)
    for name in ("to_k", "to_v", "proj_mlp"):
        assert torch.equal(inputs[name], inputs["to_q"]), name
    # One joint sequence: 16 text tokens then 8×8 image tokens.
    assert inputs["to_q"].shape == (1, 16 + 64, heads * head_dim)


def test_t5_tokenizer_words_are_single_tokens(pipe) -> None:
    tokenizer = pipe.tokenizer_2
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.tokenize("a red 7, on blue") == ["▁a", "▁red", "▁7", ",", "▁on", "▁blue"]
    ids = tokenizer("a red 7", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[3] == tokenizer.eos_token_id and set(ids[4:]) == {tokenizer.pad_token_id}
    assert pipe.text_encoder_2.config.vocab_size == len(tokenizer)
    spelled = tokenizer.tokenize("Zebra 42")
    assert spelled == ["▁Z", "e", "b", "r", "a", "▁4", "2"]
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(spelled)
    again = build_t5_tokenizer(reversed(["zebra", "a red 7"]), 8)
    assert again.get_vocab() == build_t5_tokenizer(["a red 7", "zebra"], 8).get_vocab()


def test_build_is_deterministic_and_fast(pipe) -> None:
    start = time.perf_counter()
    again = build_tiny_flux_pipeline()
    assert time.perf_counter() - start < 2.0
    assert_same_weights(pipe, again)
    assert again.tokenizer_2.get_vocab() == pipe.tokenizer_2.get_vocab()


TRUE_CFG = {"true_cfg_scale": 2.0, "negative_prompt": ""}


@pytest.mark.parametrize("guidance", [{}, TRUE_CFG], ids=["embedded", "true_cfg"])
def test_sampling_runs_in_both_guidance_modes(pipe, guidance) -> None:
    images = sample(pipe, **guidance)
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.01
    assert torch.equal(images, sample(pipe, **guidance))
    assert (images - sample(pipe, "a black cat sleeping on a blue sofa", **guidance)).abs().mean() > 1e-4


def test_true_cfg_changes_the_sample(pipe) -> None:
    plain = sample(pipe)
    guided = sample(pipe, **TRUE_CFG)
    assert (plain - guided).abs().mean() > 1e-4


@pytest.mark.slow  # sampler-heavy: full tier only
def test_save_and_reload_offline(pipe, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "tiny_flux")
    reloaded = FluxPipeline.from_pretrained(tmp_path / "tiny_flux", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert_same_weights(pipe, reloaded)
    prompt = ["a fox sitting in autumn leaves, Zebra"]
    for tokenizer in ("tokenizer", "tokenizer_2"):
        assert getattr(reloaded, tokenizer)(prompt).input_ids == getattr(pipe, tokenizer)(prompt).input_ids
    # Same weights; memory-mapped tensors are not 64-byte aligned, so CPU kernels may sum in another order.
    for guidance in ({}, TRUE_CFG):
        assert torch.allclose(
            sample(reloaded, prompt, **guidance), sample(pipe, prompt, **guidance), atol=1e-5
        )
