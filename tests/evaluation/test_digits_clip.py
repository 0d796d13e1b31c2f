"""The shipped digits CLIP: loads offline, reads held-out real digits zero-shot, ranks prompts and
tells the dense embedded model from the same model pruned to 70 % by magnitude."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obsdiff.evaluation.clip import clip_score, to_uint8
from obsdiff.evaluation.digits_clip import (
    clip_record,
    load_digits_clip,
    pixel_values,
    shipped_weights,
    zero_shot_accuracy,
)
from obsdiff.models.digits_data import digits_captions, heldout_set, interleaved
from obsdiff.run import run

ROOT = Path(__file__).resolve().parents[2]
CHANCE = {"digit": 0.1, "fg": 1 / 8, "bg": 1 / 8}


@pytest.fixture(scope="module")
def digits_clip():
    return load_digits_clip()


@pytest.fixture(scope="module")
def heldout():
    """The 500 held-out real digits and their captions, digits interleaved (0, 1, …, 9, 0, …)."""
    images, _ = heldout_set()
    return images[interleaved(50)], [c.text for c in digits_captions("heldout")]


def test_shipped_clip_loads_offline_and_is_small(digits_clip):
    model, processor = digits_clip
    assert shipped_weights().stat().st_size < 5e6
    assert not any(p.requires_grad for p in model.parameters()) and not model.model.training
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from_processor = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
    # training normalises in torch; the processor (what CLIPScore uses) must see the same pixels
    torch.testing.assert_close(pixel_values(to_uint8(images) / 255, processor), from_processor)


def test_zero_shot_accuracy_on_heldout_real_digits(digits_clip):
    accuracy = zero_shot_accuracy(*digits_clip, *heldout_set())
    floor = clip_record()["heldout_floor"]
    for part, chance in CHANCE.items():
        assert accuracy[part] >= floor[part] > 3 * chance, part


def test_matched_prompts_score_higher_than_shuffled(digits_clip, heldout):
    images, prompts = heldout[0][:100], heldout[1][:100]
    shuffled = prompts[1:] + prompts[:1]  # each image gets the next digit's caption and colours
    matched = clip_score(images, prompts, lambda: digits_clip)
    assert matched > clip_score(images, shuffled, lambda: digits_clip) + 5


@pytest.mark.slow
def test_dense_model_scores_higher_than_70_percent_magnitude(compose_cfg, run_dir):
    cfg = compose_cfg(
        "+experiment=debug", "pruner=magnitude", "sparsity.ratio=0.7",
        "eval.num_prompts=40", "eval.num_steps=10",
    )  # fmt: skip
    assert cfg.eval.clip_model == "digits"
    metrics = run(cfg, run_dir)
    assert "digits CLIP" in metrics["eval/clip_network"]
    assert metrics["dense/clip_score"] > metrics["eval/clip_score"] + 2


@pytest.mark.slow
def test_training_stage_writes_a_loadable_clip(tmp_path):
    command = [
        sys.executable, "-m", "experiments.tiny_digits.train", "--stages", "clip",
        "--clip-steps", "3", "--clip-out", str(tmp_path), "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clip held-out zero-shot accuracy" in proc.stdout
    record = clip_record(tmp_path / "digits_clip.json")
    assert record["settings"]["steps"] == 3
    model, _ = load_digits_clip(tmp_path / "digits_clip.safetensors", tmp_path / "digits_clip.json")
    width = record["architecture"]["projection"]
    assert model.get_image_features(torch.zeros(1, 3, 32, 32)).shape == (1, width)
