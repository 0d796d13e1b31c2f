"""The metric registry: every metric on small inputs, the Scorer loop against the direct calls it
replaced, fidelity to dense (SSIM, PSNR), bootstrap intervals, and eval.metrics checks."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

import obsdiff.evaluation.metrics.fid as fid_metrics
from obsdiff.config import ConfigError, check_fields
from obsdiff.evaluation.clip import tiny_clip, to_uint8
from obsdiff.evaluation.digits_classifier import load_digits_classifier, prompt_accuracy
from obsdiff.evaluation.evaluate import Scorer
from obsdiff.evaluation.fid import FidReference, image_features
from obsdiff.evaluation.metrics.base import METRICS, EvalContext
from obsdiff.evaluation.metrics.bootstrap import bootstrap_interval
from obsdiff.evaluation.metrics.fid import fid_of_features
from obsdiff.evaluation.metrics.psnr_dense import PSNR_CAP_DB
from obsdiff.models.digits_data import heldout_set, interleaved

# Every registered metric and the test below that checks it.
TESTED = {
    "fid_real": "test_fid_metrics_score_their_own_reference",
    "fid_dense": "test_fid_metrics_score_their_own_reference",
    "prompt_accuracy": "test_scorer_loop_gives_the_values_of_the_direct_calls",
    "clip_score": "test_scorer_loop_gives_the_values_of_the_direct_calls",
    "ssim_dense": "test_ssim_and_psnr_of_identical_images_are_1_and_the_cap",
    "psnr_dense": "test_ssim_and_psnr_of_identical_images_are_1_and_the_cap",
    "pickscore": "tests/evaluation/test_pickscore.py::test_the_pickscore_metric_scores_through_the_registry",
    "hpsv2": "tests/evaluation/test_hpsv2.py::test_the_hps_metrics_score_through_the_registry",
    "hpsv21": "tests/evaluation/test_hpsv2.py::test_the_hps_metrics_score_through_the_registry",
    "imagereward": (
        "tests/evaluation/test_imagereward.py::"
        "test_the_imagereward_metric_scores_through_the_registry_and_the_scorer"
    ),
}


def _features_net() -> nn.Module:
    """A small fixed feature network (16-d features) standing in for EfficientNet."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16)).requires_grad_(False)


@pytest.fixture
def tiny_eval(monkeypatch):
    monkeypatch.setattr(fid_metrics, "get_feature_net", lambda name, weights=None: _features_net())
    return OmegaConf.merge(OmegaConf.load("conf/eval/tiny.yaml"), {"resolution": 32})


@pytest.fixture(scope="module")
def digits():
    real, captions = heldout_set()
    order = interleaved(50)[:24]
    return real[order], [captions[i].text for i in order.tolist()]


def test_every_metric_is_registered_once_with_a_label_an_arrow_and_a_test():
    assert sorted(TESTED) == METRICS.names()
    for name in METRICS:
        metric = METRICS[name]
        assert metric.name == name and metric.label and isinstance(metric.higher_is_better, bool)
    assert [METRICS[n].higher_is_better for n in ("fid_real", "fid_dense")] == [False, False]
    assert all(
        METRICS[n].higher_is_better for n in ("clip_score", "prompt_accuracy", "ssim_dense", "psnr_dense")
    )
    assert {n for n in METRICS if METRICS[n].versus_dense} == {"ssim_dense", "psnr_dense"}


def test_fid_metrics_score_their_own_reference(tiny_eval):
    net = _features_net()
    images, reals, others = (
        torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)
    )
    context = EvalContext(tiny_eval, feature_net=net)
    context.fid_real, context.fid_dense = (
        FidReference.from_images(reals, net),
        FidReference.from_images(others, net),
    )
    real, dense = METRICS["fid_real"](), METRICS["fid_dense"]()
    for metric in (real, dense):
        metric.build(tiny_eval, context)
    features = image_features(images, net)
    assert real.score(images, [""] * 12, context).values == {"fid_real": context.fid_real.fid(features)}
    assert dense.score(images, [""] * 12, context).values == {"fid_dense": context.fid_dense.fid(features)}
    assert real.about() == {"eval/fid_feature_net": "efficientnet_lite0"} and real.weights() == []


# fewer images than dimensions (the N×N route), and more; torchmetrics takes square roots of the
# rank-deficient product's ~1e-16 eigenvalues, so the two agree to ~1e-8 only
@pytest.mark.parametrize("count", [12, 40])
def test_fast_fid_equals_the_torchmetrics_distance(count):
    generator = torch.Generator().manual_seed(1)
    reference = FidReference.from_features(torch.randn(30, 16, generator=generator, dtype=torch.float64))
    features = torch.randn(count, 16, generator=generator, dtype=torch.float64) + 0.3
    assert fid_of_features(reference, features) == pytest.approx(reference.fid(features), rel=1e-6)


def test_scorer_loop_gives_the_values_of_the_direct_calls(tiny_eval, tokenizer, digits):
    images, prompts = digits
    scorer = Scorer(OmegaConf.merge(tiny_eval, {"bootstrap": 0, "clip_model": "tiny"}), tokenizer)
    net = scorer.feature_net
    real, dense_ref = (
        FidReference.from_images(heldout_set()[0][:40], net),
        FidReference.from_images(images.flip(0) * 0.9, net),
    )
    scorer.set_references(real, dense_ref)
    scores = scorer.score(images, prompts)  # the dense model itself: no fidelity metrics
    features = image_features(images, net)
    clip = CLIPScore(model_name_or_path=lambda: tiny_clip(tokenizer, image_size=32))
    clip.update(to_uint8(images), prompts)
    parts = prompt_accuracy(images, prompts, load_digits_classifier())
    assert scores == {
        "fid": real.fid(features), "fid_real": real.fid(features), "fid_dense": dense_ref.fid(features),
        "clip_score": float(clip.compute()), "prompt_accuracy": parts["all"],
        **{f"prompt_accuracy_{k}": parts[k] for k in ("digit", "fg", "bg")},
    }  # fmt: skip
    assert set(scorer.score(images, prompts, dense=images)) == {*scores, "ssim_dense", "ssim_dense_p10",
                                                               "psnr_dense", "psnr_dense_p10"}  # fmt: skip
    assert scorer.names() == {
        "eval/fid_feature_net": "efficientnet_lite0", "eval/fid_reference": "digits_heldout",
        "eval/fid_resize": "the feature net's own",
        "eval/clip_network": "tiny random CLIP (plumbing check, not a quality number)",
        "eval/prompt_judge": scorer.metrics[3].judge.description,
    }  # fmt: skip


def test_ssim_and_psnr_of_identical_images_are_1_and_the_cap(tiny_eval):
    dense = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (dense + 0.1 * torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisy[0] = dense[0]  # one image the pruned model kept exactly
    context = EvalContext(tiny_eval, dense=dense)
    ssim, psnr = METRICS["ssim_dense"](), METRICS["psnr_dense"]()
    same_ssim = ssim.score(dense, [""] * 10, context).values
    same_psnr = psnr.score(dense, [""] * 10, context).values
    assert same_ssim == pytest.approx({"ssim_dense": 1.0, "ssim_dense_p10": 1.0}, abs=1e-6)
    assert same_psnr == {"psnr_dense": PSNR_CAP_DB, "psnr_dense_p10": PSNR_CAP_DB}  # inf, capped: finite
    close = ssim.score(noisy, [""] * 10, context)
    assert close.values["ssim_dense_p10"] <= close.values["ssim_dense"] < 1
    assert close.samples[0] == pytest.approx(1.0, abs=1e-6) and close.samples.shape == (10,)
    loud = psnr.score(noisy, [""] * 10, context)
    assert loud.samples[0] == PSNR_CAP_DB and 15 < loud.samples[1:].max() < 30  # σ = 0.1: ~20 dB
    assert math.isfinite(loud.values["psnr_dense"])


def test_bootstrap_interval_holds_the_estimate_narrows_with_more_prompts_and_repeats():
    generator = torch.Generator().manual_seed(0)
    mean = lambda rows: rows.mean().item()  # noqa: E731
    small, large = torch.rand(20, generator=generator), torch.rand(500, generator=generator)
    low, high = bootstrap_interval(small, mean, 200, seed=1000)
    assert low < mean(small) < high
    large_low, large_high = bootstrap_interval(large, mean, 200, seed=1000)
    assert large_high - large_low < (high - low) / 2  # ~ 1/√N: 5x narrower for 25x the prompts
    assert bootstrap_interval(small, mean, 200, seed=1000) == [low, high]  # fixed seed: reruns agree


def test_scorer_reports_intervals_for_every_metric(tiny_eval, digits):
    images, prompts = digits
    scorer = Scorer(OmegaConf.merge(tiny_eval, {"clip_model": None, "prompt_judge": None, "bootstrap": 50}))
    net = scorer.feature_net
    scorer.set_references(
        FidReference.from_images(images.flip(0), net), FidReference.from_images(images * 0.5, net)
    )
    dense = (images * 0.95).clamp(0, 1)
    scores = scorer.score(images, prompts, dense=dense)
    for name in ("fid_real", "fid_dense", "ssim_dense", "psnr_dense", "fid"):
        low, high = scores[f"{name}_ci95"]
        assert low <= high and math.isfinite(low) and math.isfinite(high), name
    for name in ("ssim_dense", "fid_real", "fid_dense"):  # FID: bias-corrected, around the estimate too
        assert scores[f"{name}_ci95"][0] <= scores[name] <= scores[f"{name}_ci95"][1], name
    assert scores["fid_ci95"] == scores["fid_real_ci95"]
    assert scorer.score(images, prompts, dense=dense) == scores  # the same resamples on a rerun


def test_unknown_metric_fails_the_config_check_naming_it(compose_cfg):
    with pytest.raises(ConfigError) as err:
        check_fields(compose_cfg("+experiment=debug", "eval.metrics=[fid_real,image_reward]"))
    message = str(err.value)
    assert "eval.metrics" in message and "'image_reward' is not one" in message and "ssim_dense" in message
    with pytest.raises(ConfigError, match="distinct metric names"):
        check_fields(compose_cfg("+experiment=debug", "eval.metrics=[fid_real,fid_real]"))
    with pytest.raises(ConfigError, match="eval.bootstrap"):
        check_fields(compose_cfg("+experiment=debug", "eval.bootstrap=-1"))


@pytest.mark.slow
def test_unknown_metric_exits_2_before_any_weights_load(cli, tmp_path):
    proc = cli([f"hydra.run.dir={tmp_path / 'run'}", "eval.metrics=[fid_real,image_reward]"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "'image_reward' is not one" in output and "Loading pipeline" not in output
