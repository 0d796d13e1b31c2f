"""CLIP score: TensorCLIP under transformers >= 5, torchmetrics integration, tiny-model determinism."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import Tensor

from obsdiff.evaluation.clip import TensorCLIP, _embedding, clip_score, tiny_clip, to_uint8

PROMPTS = ["a photo of a cat", "a red car on a road", "Ünïcode, punctuation & digits 123!"]


@pytest.fixture(scope="module")
def clip(tokenizer):
    return tiny_clip(tokenizer, image_size=32, seed=0)


def _images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


def test_tensor_clip_returns_projected_embeddings(clip):
    model, processor = clip
    raw = model.model
    pixels = processor(images=list(to_uint8(_images(2))), return_tensors="pt")["pixel_values"]
    text = processor(text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixels)
        text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])
        expected_image = raw.visual_projection(raw.vision_model(pixel_values=pixels).pooler_output)
        expected_text = raw.text_projection(raw.text_model(**text).pooler_output)
        raw_output = raw.get_image_features(pixel_values=pixels)
    assert isinstance(image_embeds, Tensor) and image_embeds.shape == (2, 32)
    assert isinstance(text_embeds, Tensor) and text_embeds.shape == (3, 32)
    torch.testing.assert_close(image_embeds, expected_image)
    torch.testing.assert_close(text_embeds, expected_text)
    if int(transformers.__version__.split(".")[0]) >= 5:  # the reason TensorCLIP exists
        assert not isinstance(raw_output, Tensor)
    assert model.config.text_config.max_position_embeddings == 77


def test_embedding_unwraps_tensors_and_output_objects():
    t = torch.ones(2, 4)
    assert _embedding(t, "image_embeds") is t
    assert _embedding(SimpleNamespace(image_embeds=t, pooler_output=t * 2), "image_embeds") is t
    assert _embedding(SimpleNamespace(pooler_output=t), "text_embeds") is t
    with pytest.raises(TypeError, match="embedding"):
        _embedding(SimpleNamespace(last_hidden_state=t), "text_embeds")


def test_clip_score_matches_manual_cosine_and_is_batch_independent(clip):
    model, processor = clip
    images = _images(3)
    score = clip_score(images, PROMPTS, lambda: clip, batch_size=2)
    pixels = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
    text = processor(text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        cos = torch.cosine_similarity(
            model.get_image_features(pixels),
            model.get_text_features(text["input_ids"], text["attention_mask"]),
        )
    assert isinstance(score, float) and 0 <= score <= 100
    assert score == pytest.approx(max(100 * float(cos.mean()), 0.0), abs=1e-3)
    assert clip_score(images, PROMPTS, lambda: clip, batch_size=2) == score
    assert clip_score(images, PROMPTS, lambda: clip, batch_size=3) == pytest.approx(score, abs=1e-3)


def test_tiny_clip_is_deterministic_and_leaves_global_rng_alone(tokenizer, clip):
    state = torch.get_rng_state()
    again, _ = tiny_clip(tokenizer, seed=0)
    other, _ = tiny_clip(tokenizer, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    weights = clip[0].model.visual_projection.weight
    assert torch.equal(again.model.visual_projection.weight, weights)
    assert not torch.equal(other.model.visual_projection.weight, weights)
    assert isinstance(again, TensorCLIP) and again.model.config.text_config.vocab_size == len(tokenizer)


def test_clip_score_rejects_mismatched_inputs(clip):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(_images(2), PROMPTS, lambda: clip)
    with pytest.raises(ValueError, match="float"):
        clip_score(to_uint8(_images(3)), PROMPTS, lambda: clip)
