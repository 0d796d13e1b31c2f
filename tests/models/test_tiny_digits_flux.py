"""The trained tiny digits Flux pipeline: stock offline loading and prompted digits (CPU, seconds)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from obsdiff.evaluation.digits_classifier import load_digits_classifier, prompt_accuracy
from obsdiff.models.digits_data import digits_captions

MODELS = Path(str(resources.files("obsdiff.models")))
MODEL_DIR = MODELS / "tiny_digits_flux"
# The recipe's sampler (experiments/tiny_digits/evaluate.py): 10 Euler steps, true CFG 5 against
# the empty prompt (two denoiser calls per step), 16 T5 tokens, 32×32.
SAMPLER = {
    "num_inference_steps": 10,
    "true_cfg_scale": 5.0,
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
    "output_type": "pt",
}
NUM_PROMPTS = 20  # the first held-out prompts, digits interleaved: every digit twice
DIGIT_FLOOR = 0.90  # measured: DIGIT_MEASURED on these prompts and seeds


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    pipeline = FluxPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_shipped_pipeline_loads_offline_with_stock_classes(pipe) -> None:
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel) and isinstance(pipe.tokenizer_2, T5TokenizerFast)
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) >= 2 and len(transformer.single_transformer_blocks) >= 2
    assert not transformer.config.guidance_embeds  # sampled with true CFG
    assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert 1.0e6 < sum(p.numel() for p in transformer.parameters()) < 1.6e6
    assert pipe.text_encoder_2.config.d_model == transformer.config.joint_attention_dim
    assert pipe.text_encoder.config.hidden_size == transformer.config.pooled_projection_dim
    # Every caption word is one T5 token of the project's own vocabulary.
    text = "the digit seven in yellow on black"
    assert pipe.tokenizer_2.tokenize(text) == [f"▁{word}" for word in text.split()]
    assert pipe.tokenizer_2.model_max_length == SAMPLER["max_sequence_length"]
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


def test_vae_is_the_sd3_digits_models(pipe) -> None:
    sd3_vae = AutoencoderKL.from_pretrained(MODELS / "tiny_digits" / "vae", local_files_only=True)
    ours, theirs = pipe.vae.state_dict(), sd3_vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.vae.config.scaling_factor == sd3_vae.config.scaling_factor
    assert pipe.vae.config.shift_factor == sd3_vae.config.shift_factor


def test_generations_show_the_prompted_digit(pipe) -> None:
    prompts = [c.text for c in digits_captions("heldout")[:NUM_PROMPTS]]
    generators = [torch.Generator().manual_seed(seed) for seed in range(NUM_PROMPTS)]
    images = pipe(prompts, negative_prompt=[""] * NUM_PROMPTS, generator=generators, **SAMPLER).images
    assert images.shape == (NUM_PROMPTS, 3, 32, 32)
    accuracy = prompt_accuracy(images.clamp(0, 1), prompts, load_digits_classifier())
    assert accuracy["digit"] >= DIGIT_FLOOR
    assert accuracy["fg"] >= DIGIT_FLOOR and accuracy["bg"] >= DIGIT_FLOOR
