"""``sparsity.allocation=owl`` end to end on the embedded model: the exact global count, blocks that
differ, ``allocation.json``, and configs refused before any weights load."""

import json
import math
from collections import defaultdict

import pytest
from safetensors.torch import load_file

from obsdiff.run import run

pytestmark = pytest.mark.slow
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_owl_run_reaches_the_global_target_exactly_while_blocks_differ(compose_cfg, run_dir):
    cfg = compose_cfg("+experiment=debug", "eval=none", "logger=none", "sparsity.ratio=0.7",
                      "sparsity.allocation=owl")  # fmt: skip
    metrics = run(cfg, run_dir)
    allocation = json.loads((run_dir / "allocation.json").read_text())
    weights = load_file(run_dir / "pruned" / WEIGHTS)
    zeros, sizes = defaultdict(int), defaultdict(int)  # per block, counted on the saved weights
    for name in allocation["layers"]:
        W = weights[f"{name}.weight"]
        block = int(name.split(".")[1])  # transformer_blocks.<b>.…
        zeros[block] += int((W == 0).sum())
        sizes[block] += W.numel()
    total = sum(sizes.values())
    assert total == allocation["weights"]
    assert sum(zeros.values()) == math.floor(0.7 * total + 0.5)  # exact: not one weight off
    assert metrics["prune/sparsity_achieved"] == pytest.approx(sum(zeros.values()) / total, abs=1e-12)
    assert metrics["prune/allocation"] == "owl" and metrics["prune/sparsity_target"] == 0.7
    per_block = [zeros[b] / sizes[b] for b in sorted(sizes)]
    assert max(per_block) - min(per_block) > 0.01  # a non-uniform split
    assert all(0.62 - 1e-6 <= s <= 0.78 + 1e-6 for s in per_block)  # within 0.7 ± λ (0.08)
    groups = allocation["groups"]
    assert [g["name"] for g in groups] == [f"block {b}" for b in sorted(sizes)]
    for g, s in zip(groups, per_block, strict=True):  # the saved weights carry the recorded ratios
        assert s == pytest.approx(g["sparsity"], abs=1e-4)


@pytest.mark.parametrize("kind", ["nm", "structured"])
def test_owl_with_nm_or_structured_exits_2_before_any_weights_load(cli, tmp_path, kind):
    args = [f"hydra.run.dir={tmp_path / 'run'}", f"sparsity={kind}", "sparsity.allocation=owl"]
    proc = cli(args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "sparsity.allocation" in output and "unstructured only" in output
    assert "Loading pipeline" not in output and not (tmp_path / "run" / "allocation.json").exists()
