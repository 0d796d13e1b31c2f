"""model.offload=group: diffusers' group offloading while the sampler runs changes no result.

On the CPU, group offloading runs with onload = offload = ``cpu`` (diffusers allows it; it moves
nothing, but every hook is in place) and without streams (diffusers refuses CPU streams). The copy
that streamed offloading keeps and restores cannot be shown on the CPU; its disk variant keeps one
the same way (a file written when offloading is applied, read at every onload), which shows the
pitfall; the CUDA stream case is the ``gpu`` test.
"""

from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from obsdiff.artifacts import base_model_config, read_manifest
from obsdiff.config import ConfigError, check_fields
from obsdiff.offload import Offload, remove_group_offload
from obsdiff.run import run

SMALL = [
    "calibration.num_prompts=4", "calibration.num_steps=3", "calibration.batch_size=4",
    "pruner.num_packages=2", "eval=none", "logger=none",
]  # fmt: skip
WEIGHTS = "pruned/diffusion_pytorch_model.safetensors"
RUNS = {"sd3": "model=tiny_sd3", "flux": "model=tiny_flux", "heads": "model=tiny_sd3 sparsity=structured"}


def outputs(run_dir):
    rows = [r.rsplit(",", 1)[0] for r in (run_dir / "layers.csv").read_text().splitlines()]  # not seconds
    return rows, load_file(str(run_dir / WEIGHTS))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", RUNS.values(), ids=RUNS.keys())
def test_an_offloaded_run_equals_a_plain_one_bit_for_bit(compose_cfg, tmp_path, monkeypatch, overrides):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from obsdiff.models.base import ModelAdapter

    seen = []  # whether offloading hooks were on in each sampler call
    denoise = ModelAdapter.denoise

    def watched(self, pipe, *args, **kwargs):
        seen.append(_is_group_offload_enabled(self.denoiser(pipe)))
        return denoise(self, pipe, *args, **kwargs)

    monkeypatch.setattr(ModelAdapter, "denoise", watched)
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    run(compose_cfg(*overrides.split(), *SMALL), plain)
    assert seen and not any(seen)
    seen.clear()
    run(compose_cfg(*overrides.split(), *SMALL, "model.offload=group"), offloaded)
    assert seen and all(seen)  # both packages' calibrations ran offloaded
    (rows_a, w_a), (rows_b, w_b) = outputs(plain), outputs(offloaded)
    assert rows_a == rows_b and len(rows_a) > 1
    assert w_a.keys() == w_b.keys() and all(w_a[k].equal(w_b[k]) for k in w_a)
    artifact = offloaded / "pruned"  # loads as a plain pipeline: offloading was how the run ran
    assert "offload" not in base_model_config(artifact, read_manifest(artifact))


def test_evaluation_images_are_generated_offloaded_and_equal(tiny_pipe):
    from obsdiff.evaluation.evaluate import EvalSet, generate

    adapter, pipe = tiny_pipe
    prompts = ["a red square", "a blue circle"]
    evalset = EvalSet(prompts, adapter.encode(pipe, prompts, 5.0, 2), [0, 1])
    ecfg = OmegaConf.create({"batch_size": 2, "num_steps": 2, "guidance_scale": 5.0, "resolution": 32})
    plain = generate(adapter, pipe, evalset, ecfg, evalset.seeds, desc="plain")
    adapter.offload = Offload(torch.device("cpu"))
    offloaded = generate(adapter, pipe, evalset, ecfg, evalset.seeds, desc="offloaded")
    assert offloaded.equal(plain)
    assert not hasattr(pipe.transformer.transformer_blocks[0], "_diffusers_hook") or not any(
        pipe.transformer.transformer_blocks[0]._diffusers_hook.hooks
    )  # the hooks are gone after the generation


def test_load_keeps_the_denoiser_on_the_cpu_and_records_the_offload(tiny_pipe):
    adapter, _ = tiny_pipe
    pipe = adapter.load(OmegaConf.create({"path": "tiny", "device": "cpu", "torch_dtype": "float32",
                                          "offload": "group"}))  # fmt: skip
    assert adapter.offload == Offload(torch.device("cpu"), use_stream=False)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())


def tiny_denoiser_and_inputs(tiny_pipe):
    adapter, pipe = tiny_pipe
    denoiser, tokens = pipe.transformer, adapter.text_tokens(pipe)
    return denoiser, adapter.example_inputs(denoiser, 1, 16, tokens, torch.Generator().manual_seed(0))


def forward_edit_forward(denoiser, inputs, offloaded):
    """Denoiser outputs before and after a layer is pruned between two sampler runs (in place, as the
    solvers write), with ``offloaded`` around each forward."""
    with torch.no_grad():
        with offloaded():
            before = denoiser(**inputs).sample
        denoiser.transformer_blocks[0].attn.to_q.weight.data.zero_()
        with offloaded():
            after = denoiser(**inputs).sample
    return before, after


def test_without_handling_an_edit_is_lost_to_the_copy_offloading_keeps(tiny_pipe, tmp_path):
    denoiser, inputs = tiny_denoiser_and_inputs(tiny_pipe)
    # offloading left on; the copy it keeps: the file written when it was applied
    denoiser.enable_group_offload("cpu", offload_type="block_level", num_blocks_per_group=1,
                                  offload_to_disk_path=str(tmp_path))  # fmt: skip
    before, after = forward_edit_forward(denoiser, inputs, nullcontext)
    assert after.equal(before)  # the forward after the edit ran on the kept, unpruned copy


def test_with_offloading_only_while_the_sampler_runs_an_edit_is_kept(tiny_pipe):
    denoiser, inputs = tiny_denoiser_and_inputs(tiny_pipe)
    offload = Offload(torch.device("cpu"))
    before, after = forward_edit_forward(denoiser, inputs, lambda: offload.sampling(denoiser))
    assert not after.equal(before)
    assert denoiser.transformer_blocks[0].attn.to_q.weight.abs().sum() == 0


@pytest.mark.gpu
def test_on_cuda_with_streams_an_edit_is_lost_without_handling_and_kept_with_it(tiny_pipe):
    denoiser, inputs = tiny_denoiser_and_inputs(tiny_pipe)
    cuda = torch.device("cuda")
    inputs = {k: v.to(cuda) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    layer = denoiser.transformer_blocks[0].attn.to_q
    denoiser.enable_group_offload(cuda, offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    with torch.no_grad():
        denoiser(**inputs)
        layer.to(cuda)  # a solve on the device, with offloading left on
        layer.weight.data.zero_()
        layer.to("cpu")
        denoiser(**inputs)
    remove_group_offload(denoiser)
    assert layer.weight.abs().sum() > 0  # lost: the stream restored its pinned copy
    offload = Offload(cuda, use_stream=True)
    with torch.no_grad():
        offload.onload(denoiser, ["transformer_blocks.0.attn.to_q"])
        layer.weight.data.zero_()
        offload.offload(denoiser, ["transformer_blocks.0.attn.to_q"])
        with offload.sampling(denoiser):
            denoiser(**inputs)
    assert layer.weight.abs().sum() == 0


@pytest.mark.gpu
def test_a_streamed_offloaded_run_on_cuda_equals_a_plain_one(compose_cfg, tmp_path):
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    run(compose_cfg("model=tiny_sd3", *SMALL, "model.device=cuda"), plain)
    run(compose_cfg("model=tiny_sd3", *SMALL, "model.device=cuda", "model.offload=group",
                    "model.offload_stream=true"), offloaded)  # fmt: skip
    (rows_a, w_a), (rows_b, w_b) = outputs(plain), outputs(offloaded)
    assert rows_a == rows_b and all(w_a[k].equal(w_b[k]) for k in w_a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.offload=disk"], "model.offload='disk' is invalid; allowed: none, group"),
        (["model.offload_stream=true"], "false for model.offload=none"),
        (["model.offload=group", "model.offload_stream=true"], "needs a CUDA onload device"),
        (["model=tiny_generic", "model.offload=group"], "none for model.family=generic"),
    ],
)
def test_offload_settings_that_cannot_run_are_refused_before_loading(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_fields(compose_cfg(*overrides))
