"""End to end with the generic adapter: a family it does not know (tiny Sana), and agreement with SD3's."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from obsdiff.models.sd3 import SD3_TARGETS
from obsdiff.models.tiny_sd3 import save_tiny_sd3
from obsdiff.run import run

pytestmark = pytest.mark.slow
SMALL = [
    "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4", "eval=none",
    "logger=none",
]  # fmt: skip
WEIGHTS = "pruned/diffusion_pytorch_model.safetensors"
IMAGE_STREAM = "[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,ff.net.0.proj,ff.net.2]"


@pytest.mark.parametrize("sparsity", ["unstructured", "nm"])
def test_obsdiff_model_tiny_generic_through_the_cli(cli, tmp_path, sparsity):
    out = tmp_path / "cli"
    proc = cli([f"hydra.run.dir={out}", "model=tiny_generic", f"sparsity={sparsity}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.01
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert len(rows) == metrics["prune/num_layers"] == 4 * 8  # every Linear of the 4 Sana blocks
    state = load_file(str(out / WEIGHTS))
    for r in rows:
        W = state[r["name"] + ".weight"]
        if sparsity == "nm":
            assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2), r["name"]
        else:
            assert abs(float((W == 0).float().mean()) - 0.5) < 0.05, r["name"]


@pytest.mark.parametrize(
    "overrides, num_layers",
    [
        # the image stream: one input group per SD3 unit, so both cut the same 4 packages
        ([f"pruner.targets={IMAGE_STREAM}"], 4 * 6),
        # every SD3 target (SD3 pairs the two streams in a unit, the generic adapter does not):
        # one package holds the same layers either way
        ([f"pruner.targets=[{','.join(SD3_TARGETS)}]", "pruner.num_packages=1"], 3 * 12 + 9),
    ],
    ids=["image_stream", "all_targets_one_package"],
)
def test_generic_prunes_tiny_sd3_exactly_as_the_sd3_adapter(compose_cfg, tmp_path, overrides, num_layers):
    """Same calibration config and the same packages: bit-identical pruned weights."""
    folder = save_tiny_sd3(tmp_path / "tiny_sd3")
    sd3 = compose_cfg("model=tiny_sd3", *overrides, *SMALL)
    generic = compose_cfg("model=tiny_sd3", *overrides, *SMALL)
    generic.model.family, generic.model.path = "generic", str(folder)
    generic.model.options = {
        "pipeline": "StableDiffusion3Pipeline",
        "drop_components": ["text_encoder_3", "tokenizer_3"],  # as the SD3 adapter's text_encoder_3: null
        "call_kwargs": {"max_sequence_length": 1},
    }
    a, b = run(sd3, tmp_path / "sd3"), run(generic, tmp_path / "generic")
    assert a["prune/num_layers"] == b["prune/num_layers"] == num_layers
    assert abs(a["prune/sparsity_achieved"] - 0.5) < 0.01
    ours, theirs = load_file(str(tmp_path / "sd3" / WEIGHTS)), load_file(str(tmp_path / "generic" / WEIGHTS))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_every_layerwise_baseline_runs_on_tiny_generic(compose_cfg, tmp_path, pruner):
    metrics = run(compose_cfg("model=tiny_generic", f"pruner={pruner}", *SMALL), tmp_path)
    assert metrics["prune/method"] == pruner and abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.01
