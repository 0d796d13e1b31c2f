"""Structured pruning on the tiny SD3: exact counts, lossless slicing, compensation, artifacts."""

import copy
import json

import pytest
import torch

from obsdiff import load_pruned
from obsdiff.artifacts import ArtifactMismatchError, save_pruned
from obsdiff.calibration.prompts import tiny_prompts
from obsdiff.models.structure import HeadGroup, NeuronGroup
from obsdiff.prune import Calibration, prune_groupwise
from obsdiff.pruners.structured import StructuredStrategy
from obsdiff.solvers.structured import StructuredPattern

HALF = StructuredPattern(ratio=0.5, head_ratio=0.5, ffn_ratio=0.5)


def calibration(adapter, pipe, num_prompts=2, steps=3):
    embeds = adapter.encode(pipe, tiny_prompts()[:num_prompts], 7.0, num_prompts)
    return Calibration(embeds, list(range(num_prompts)), steps, 7.0, 32, num_prompts, [1.0] * steps)


def prune_structured(adapter, pipe, calib, pattern, num_packages, blocks, method="obs", **options):
    """Structured pruning of ``blocks``: the layer records and group key -> removed heads / neurons."""
    strategy = StructuredStrategy(method, pattern, blocks, **options)
    records = prune_groupwise(adapter, pipe, calib, strategy, num_packages)
    return records, strategy.removed


def forward(denoiser, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 78, 64, generator=g),
        "pooled_projections": torch.randn(2, 64, generator=g),
        "timestep": torch.tensor([700.0, 200.0]),
    }
    with torch.no_grad():
        return denoiser(**inputs).sample


def test_units_read_head_size_from_config_and_skip_heads_without_context(tiny_pipe):
    adapter, pipe = tiny_pipe
    units = adapter.structure_units(pipe.transformer, [1, 3])
    assert [[(type(g), g.key) for g in u] for u in units] == [
        [(HeadGroup, "1.attn")],
        [(NeuronGroup, "1.ff"), (NeuronGroup, "1.ff_context")],
        [(NeuronGroup, "3.ff")],
    ]
    heads = units[0][0]
    assert heads.head_dim == pipe.transformer.config.attention_head_dim == 16
    assert heads.outputs == ("transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out")
    assert heads.cols == (0, 64) and heads.num_heads == 4
    assert len(heads.inputs) == 6  # Q/K/V of both streams
    # block 3 is context_pre_only: no heads, no context FFN
    assert [n for g in units[2] for n in g.outputs] == ["transformer_blocks.3.ff.net.2"]


@pytest.mark.slow  # sampler-heavy: full tier only
def test_exact_head_and_neuron_counts(tiny_pipe):
    adapter, pipe = tiny_pipe
    records, removed = prune_structured(adapter, pipe, calibration(adapter, pipe), HALF, 2, [1, 2])
    for b, block in enumerate(pipe.transformer.transformer_blocks):
        heads, width = (2, 128) if b in (1, 2) else (4, 256)
        assert block.attn.heads == heads
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            assert getattr(block.attn, name).out_features == heads * 16
        assert block.attn.to_out[0].in_features == heads * 16
        assert block.ff.net[0].proj.out_features == block.ff.net[2].in_features == width
        if block.ff_context is not None:
            assert block.ff_context.net[0].proj.weight.shape == (width, 64)
            assert block.ff_context.net[0].proj.bias.shape == (width,)
    assert adapter.architecture(pipe.transformer) == {
        "1": {"attn": 2, "ff": 128, "ff_context": 128},
        "2": {"attn": 2, "ff": 128, "ff_context": 128},
    }
    assert len(records) == 8 and all(r.sparsity == 0.5 for r in records)
    assert set(removed) == {f"{b}.{g}" for b in (1, 2) for g in ("attn", "ff", "ff_context")}
    assert len(removed["1.attn"]) == 2
    assert len(removed["2.ff_context"]) == 128
    assert forward(pipe.transformer).isfinite().all()


@pytest.mark.slow  # sampler-heavy: full tier only
def test_slicing_is_lossless(tiny_pipe):
    adapter, pipe = tiny_pipe
    masked_pipe = copy.deepcopy(pipe)
    calib = calibration(adapter, pipe)
    _, removed = prune_structured(adapter, pipe, calib, HALF, 1, [1, 2], physical=True)
    _, removed_masked = prune_structured(adapter, masked_pipe, calib, HALF, 1, [1, 2], physical=False)
    assert removed == removed_masked
    masked = masked_pipe.transformer
    assert masked.transformer_blocks[1].attn.heads == 4  # still dense shapes, zero columns
    cols = masked.get_submodule("transformer_blocks.1.ff.net.2").weight[:, removed["1.ff"]]
    assert torch.count_nonzero(cols) == 0
    for name in ("to_out.0", "to_add_out"):  # both output projections lose the same heads
        W = masked.get_submodule(f"transformer_blocks.1.attn.{name}").weight
        zero_heads = (W.reshape(W.shape[0], 4, 16) == 0).all(dim=(0, 2)).nonzero().flatten().tolist()
        assert zero_heads == removed["1.attn"], name
    sliced_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert sliced_params < sum(p.numel() for p in masked.parameters())
    torch.testing.assert_close(forward(pipe.transformer), forward(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a sampler run (seconds on an idle CPU, tens under load)
def test_compensation_lowers_the_error(tiny_pipe):
    adapter, pipe = tiny_pipe
    dense = copy.deepcopy(pipe.transformer)
    plain_pipe = copy.deepcopy(pipe)
    calib = calibration(adapter, pipe, num_prompts=4)
    records, _ = prune_structured(adapter, pipe, calib, HALF, 1, [1, 2], compensate=True)
    plain, _ = prune_structured(adapter, plain_pipe, calib, HALF, 1, [1, 2], compensate=False)
    for comp, raw in zip(records, plain, strict=True):
        assert comp.loss < raw.loss, comp.name

    # on the model's output, over the sampler's own inputs
    def final_latents(p):
        gens = [torch.Generator().manual_seed(s) for s in (21, 22, 23, 24)]
        return adapter.denoise(p, calib.embeds, gens, 4, 7.0, 32)

    dense_pipe = copy.deepcopy(plain_pipe)
    dense_pipe.transformer = dense
    ref = final_latents(dense_pipe)
    err_comp = torch.mean((final_latents(pipe) - ref) ** 2)
    err_plain = torch.mean((final_latents(plain_pipe) - ref) ** 2)
    assert err_comp < err_plain


@pytest.mark.slow  # sampler-heavy: full tier only
def test_save_load_round_trip_gives_identical_images(tiny_pipe, compose_cfg, tmp_path):
    adapter, pipe = tiny_pipe
    calib = calibration(adapter, pipe)
    _, removed = prune_structured(adapter, pipe, calib, HALF, 2, [1, 2])

    def images(p):
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        return adapter.denoise(p, calib.embeds, gens, 4, 7.0, 32, output_type="pt")

    before = images(pipe)
    structure = {"architecture": adapter.architecture(pipe.transformer), "removed": removed}
    cfg = compose_cfg("model=tiny_sd3", "logger=none", "sparsity=structured", "sparsity.ratio=0.5")
    save_pruned(tmp_path / "pruned", pipe.transformer, cfg, extra={"structure": structure})
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["structure"]["architecture"]["1"] == {"attn": 2, "ff": 128, "ff_context": 128}
    assert manifest["structure"]["removed"] == removed
    assert not list((tmp_path / "pruned").glob("*.bin")) and not list((tmp_path / "pruned").glob("*.pt"))
    reloaded = load_pruned(tmp_path / "pruned")
    assert reloaded.transformer.transformer_blocks[1].attn.heads == 2
    assert torch.equal(images(reloaded), before)


def test_structured_artifact_refuses_an_already_pruned_base(tiny_pipe, compose_cfg, tmp_path):
    adapter, pipe = tiny_pipe
    prune_structured(adapter, pipe, calibration(adapter, pipe, steps=2), HALF, 1, [1])
    cfg = compose_cfg("model=tiny_sd3", "logger=none", "sparsity=structured")
    save_pruned(tmp_path / "pruned", pipe.transformer, cfg,
                extra={"structure": {"architecture": adapter.architecture(pipe.transformer)}})  # fmt: skip
    with pytest.raises(ArtifactMismatchError, match="already pruned"):
        load_pruned(tmp_path / "pruned", pipeline=pipe)
    # a manifest from another base model is refused before any reshape (test_end_to_end)
