"""SD3.5-Medium's dual attention: ``attn2`` heads are a structure group of their own."""

import copy
import json

import torch

from obsdiff.models import get_adapter
from obsdiff.models.sd3 import TINY_CONFIG


def tiny_dual():
    config = {**json.loads(TINY_CONFIG.read_text())["transformer"], "dual_attention_layers": [0, 1]}
    adapter = get_adapter("sd3")
    torch.manual_seed(0)
    return adapter, config, adapter.empty_denoiser(config, device="cpu").eval()


def test_attn2_heads_are_their_own_unit_with_their_own_output_projection():
    adapter, config, model = tiny_dual()
    units = adapter.structure_units(model, [1])
    assert [[g.key for g in unit] for unit in units] == [["1.attn"], ["1.attn2"], ["1.ff", "1.ff_context"]]
    (attn2,) = units[1]
    assert attn2.outputs == ("transformer_blocks.1.attn2.to_out.0",) and attn2.head_dim == 16
    assert attn2.inputs == tuple(f"transformer_blocks.1.attn2.to_{n}" for n in "qkv")
    assert adapter.attention_heads(config) == {"attn": 4, "attn2": 4}
    assert adapter.units(model, [1], ["attn2.to_q", "attn2.to_k", "attn2.to_v"]) == [
        [tuple(f"transformer_blocks.1.attn2.to_{n}" for n in "qkv")]
    ]


def test_attn2_slicing_is_lossless_and_rebuilt_from_the_architecture():
    adapter, config, model = tiny_dual()
    masked = copy.deepcopy(model)
    (unit,) = adapter.structure_units(model, [0])[1:2]
    removed = {unit[0].key: [2]}
    masked.get_submodule(unit[0].outputs[0]).weight.data[:, unit[0].columns([2])] = 0
    adapter.remove_structure(model, unit, removed)
    assert model.transformer_blocks[0].attn2.heads == 3  # the processor reads the head count
    arch = adapter.architecture(model)
    assert arch == {"0": {"attn2": 3}}
    inputs = adapter.example_inputs(masked, 2, 16, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, masked(**inputs).sample, rtol=1e-5, atol=1e-5)
    fresh = adapter.empty_denoiser(config, device="cpu")
    adapter.reshape(fresh, arch)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
