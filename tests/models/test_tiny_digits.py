"""The trained tiny digits SD3 pipeline, its captions and its classifier (CPU, offline, seconds)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from obsdiff.evaluation.digits_classifier import (
    classifier_record,
    load_digits_classifier,
    prompt_accuracy,
)
from obsdiff.models.digits_data import (
    COLOUR_NAMES,
    TEMPLATES,
    caption_corpus,
    heldout_set,
    load_mnist,
    make_caption,
    parse_caption,
    split_indices,
)

MODEL_DIR = Path(str(resources.files("obsdiff.models").joinpath("tiny_digits")))
# (digit, fg, bg, template, seed): every digit shape class, varied colours and templates.
CASES = ((0, 1, 4, 0, 0), (1, 2, 0, 1, 1), (3, 5, 4, 2, 2), (4, 0, 1, 3, 3), (7, 3, 7, 4, 4), (8, 6, 2, 5, 5))


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        MODEL_DIR, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_every_caption_parses_back_exactly() -> None:
    corpus = caption_corpus()
    assert (
        len(corpus) == len(set(corpus)) == len(TEMPLATES) * 10 * len(COLOUR_NAMES) * (len(COLOUR_NAMES) - 1)
    )
    for template in range(len(TEMPLATES)):
        for digit, fg, bg in ((0, 0, 1), (7, 2, 4), (9, 7, 6)):
            caption = make_caption(digit, fg, bg, template)
            assert parse_caption(caption.text) == caption
            assert parse_caption("  " + caption.text.upper() + " ")[1:] == caption[1:]
    for bad in ("", "a corgi surfing a wave", "a red handwritten 7 on a red"):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="differ"):
        make_caption(3, 2, 2)


def test_heldout_split_is_disjoint_balanced_and_fixed() -> None:
    _, labels = load_mnist()
    train, heldout = split_indices("train"), split_indices("heldout")
    assert len(train) == 4500 and len(heldout) == 500
    assert not set(train.tolist()) & set(heldout.tolist())
    assert torch.bincount(labels[heldout], minlength=10).tolist() == [50] * 10
    first, captions = heldout_set()
    second, again = heldout_set()
    assert torch.equal(first, second) and captions == again
    assert first.shape == (500, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert all(c.fg != c.bg for c in captions)


def test_shipped_pipeline_loads_offline_with_stock_classes(pipe) -> None:
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert (
        isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    )
    config = pipe.transformer.config
    assert config.num_layers >= 4 and config.num_attention_heads >= 4 and config.attention_head_dim % 8 == 0
    assert pipe.transformer.transformer_blocks[0].ff.net[0].proj.out_features % 4 == 0
    # Every caption word is one token of the project's own vocabulary.
    assert pipe.tokenizer.tokenize("the digit seven in yellow on black") == [
        f"{w}</w>" for w in "the digit seven in yellow on black".split()
    ]
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


@pytest.mark.slow  # a sampler run (seconds on an idle CPU, tens under load)
def test_generations_show_the_prompted_digit(pipe, classifier) -> None:
    prompts = [make_caption(d, fg, bg, t).text for d, fg, bg, t, _ in CASES]
    generators = [torch.Generator().manual_seed(seed) for *_, seed in CASES]
    images = pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=generators,
        max_sequence_length=1,
        output_type="pt",
    ).images
    assert images.shape == (len(CASES), 3, 32, 32)
    predicted = classifier.predict(images.clamp(0, 1))
    assert (predicted["digit"] == torch.tensor([c[0] for c in CASES])).sum() >= 4
    assert (predicted["bg"] == torch.tensor([c[2] for c in CASES])).sum() >= 4


def test_classifier_heldout_accuracy_is_above_its_recorded_floor(classifier) -> None:
    images, captions = heldout_set()
    accuracy = prompt_accuracy(images, [c.text for c in captions], classifier)
    floors = classifier_record()["heldout_floor"]
    assert set(floors) == {"digit", "fg", "bg"}
    for head, floor in floors.items():
        assert accuracy[head] >= floor >= 0.9, head
    assert accuracy["all"] >= floors["digit"] - 0.05


def test_prompt_accuracy_scores_disagreement_and_checks_inputs(classifier) -> None:
    images, captions = heldout_set()
    images, captions = images[::50], captions[::50]  # one image per digit
    wrong = [
        make_caption((c.digit + 1) % 10, c.bg, c.fg).text for c in captions
    ]  # digit off, colours swapped
    scores = prompt_accuracy(images, wrong, classifier)
    assert scores["digit"] <= 0.3 and scores["fg"] <= 0.3 and scores["all"] == 0.0
    with pytest.raises(ValueError, match="prompts"):
        prompt_accuracy(images, wrong[:-1], classifier)
