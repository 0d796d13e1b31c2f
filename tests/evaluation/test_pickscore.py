"""PickScore on a random CLIP built from a config: shape, finiteness, determinism, the formula,
and loading from local folders (nothing downloads)."""

import pytest
import torch

from obsdiff.evaluation.clip import tiny_clip
from obsdiff.evaluation.pickscore import load_pickscore, pickscore
from obsdiff.models.tiny_sd3 import build_tokenizer

PROMPTS = [
    "a photo of a cat",
    "a red car on a road",
    "two dogs on a beach",
    "a bowl of fruit",
    "a city at night",
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tokenizer = build_tokenizer(PROMPTS, tmp_path_factory.mktemp("tokenizer"))
    return tiny_clip(tokenizer, image_size=32, seed=0)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_one_finite_score_per_image_whatever_the_batch(clip):
    scores = pickscore(_images(5), PROMPTS, *clip)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(pickscore(_images(5), PROMPTS, *clip), scores, rtol=0, atol=0)
    torch.testing.assert_close(pickscore(_images(5), PROMPTS, *clip, batch_size=2), scores)


def test_score_is_the_scaled_cosine_of_the_matched_pair(clip):
    model, processor = clip
    inputs = processor(
        text=PROMPTS, images=list(_images(5).mul(255).round().byte()), padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model.model(**inputs).logits_per_image  # logit_scale.exp() * cos, every pair
    torch.testing.assert_close(pickscore(_images(5), PROMPTS, model, processor), logits.diagonal())


def test_counts_must_match(clip):
    with pytest.raises(ValueError, match="one prompt per image"):
        pickscore(_images(2), PROMPTS, *clip)


def test_loads_from_local_folders(clip, tmp_path):
    model, processor = clip
    model.model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    loaded = load_pickscore(str(tmp_path / "model"), str(tmp_path / "processor"))
    torch.testing.assert_close(
        pickscore(_images(3), PROMPTS[:3], *loaded), pickscore(_images(3), PROMPTS[:3], *clip)
    )


def test_the_pickscore_metric_scores_through_the_registry(clip, tmp_path):
    from omegaconf import OmegaConf

    from obsdiff.evaluation.metrics.base import METRICS, EvalContext

    model, processor = clip
    model.model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    metric = METRICS["pickscore"]()
    ecfg = OmegaConf.create(
        {"pickscore_model": str(tmp_path / "model"), "pickscore_processor": str(tmp_path / "processor")}
    )
    assert metric.enabled(ecfg) is None and metric.higher_is_better
    metric.build(ecfg, EvalContext(ecfg))
    score = metric.score(_images(5), PROMPTS, EvalContext(ecfg))
    direct = pickscore(_images(5), PROMPTS, model, processor)
    assert score.values["pickscore"] == pytest.approx(float(direct.double().mean()))
    assert score.samples.shape == (5,)
    assert metric.weights() == [str(tmp_path / "model"), str(tmp_path / "processor")]
    assert metric.enabled(OmegaConf.create({"pickscore_model": None})) == "eval.pickscore_model is null"
