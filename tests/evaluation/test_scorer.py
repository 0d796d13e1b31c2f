"""The eval=tiny scorer on real held-out digits: FID to real and to dense, prompt accuracy, names."""

import pytest
import torch
from omegaconf import OmegaConf

from obsdiff.evaluation.evaluate import Scorer, heldout_digits
from obsdiff.evaluation.fid import FidReference
from obsdiff.models.digits_data import digits_captions, heldout_set, interleaved, make_caption

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_eval():
    return OmegaConf.load("conf/eval/tiny.yaml")


def test_real_digits_score_high_and_wrong_prompts_score_low(tiny_eval):
    real, captions = heldout_set()
    order = interleaved(50)
    images, prompts = real[order][:60], [c.text for c in digits_captions("heldout")][:60]
    assert prompts == [captions[i].text for i in order[:60].tolist()]
    scorer = Scorer(OmegaConf.merge(tiny_eval, {"clip_model": None}))
    noise = torch.rand(60, 3, 32, 32)
    net = scorer.feature_net
    scorer.set_references(
        FidReference.from_images(heldout_digits(60, 32), net), FidReference.from_images(noise, net)
    )
    right = scorer.score(images, prompts)
    assert set(right) == {
        "fid",
        "fid_real",
        "fid_dense",
        "prompt_accuracy",
        "prompt_accuracy_digit",
        "prompt_accuracy_fg",
        "prompt_accuracy_bg",
        "fid_ci95",
        "fid_real_ci95",
        "fid_dense_ci95",
        "prompt_accuracy_ci95",
    }  # fmt: skip  (no SSIM / PSNR: no dense images given)
    assert right["fid"] == right["fid_real"] < right["fid_dense"]  # real digits are near real digits
    assert right["prompt_accuracy"] >= 0.9 and right["prompt_accuracy_digit"] >= 0.9
    wrong = [make_caption((c.digit + 1) % 10, c.bg, c.fg).text for c in digits_captions("heldout")[:60]]
    bad = scorer.score(images, wrong)
    assert bad["prompt_accuracy"] == 0.0 and bad["prompt_accuracy_fg"] <= 0.1
    assert bad["fid_real"] == right["fid_real"]  # FID ignores prompts
    assert scorer.score(noise, prompts)["fid_real"] > right["fid_real"] + 50


def test_names_say_what_each_number_is(tiny_eval, tokenizer):
    names = Scorer(OmegaConf.merge(tiny_eval, {"resolution": 32}), tokenizer).names()
    assert names["eval/fid_reference"] == "digits_heldout"
    assert "stand-in for CLIP score" in names["eval/prompt_judge"]
    assert "digits CLIP" in names["eval/clip_network"]
    plain = Scorer(
        OmegaConf.merge(tiny_eval, {"real_images": None, "prompt_judge": None, "clip_model": None})
    )
    assert plain.names() == {
        "eval/fid_feature_net": "efficientnet_lite0",
        "eval/fid_resize": "bilinear, antialias=True, to 224x224 (torch.nn.functional.interpolate)",
        "eval/fid_reference": "dense model, seeds from 5000",
    }
    plain.set_references(None, FidReference.from_images(torch.rand(8, 3, 32, 32), plain.feature_net))
    assert set(plain.score(torch.rand(8, 3, 32, 32), ["x"] * 8)) == {
        "fid",
        "fid_dense",
        "fid_ci95",
        "fid_dense_ci95",
    }
