"""HPS v2 / v2.1 on random tiny open_clip weights (nothing downloads): the converted CLIPModel
against a plain-torch forward of open_clip's architecture on the original state dict, the image
transform, loading checkpoints (plain, wrapped, safetensors, pickles), the registry and Scorer
path, and the errors."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPModel

from obsdiff.config import check_fields
from obsdiff.evaluation.clip import TensorCLIP
from obsdiff.evaluation.evaluate import Scorer
from obsdiff.evaluation.hpsv2 import (
    OPENAI_MEAN,
    OPENAI_STD,
    _config,
    _mapped,
    clip_from_open_clip_state_dict,
    hps_score,
    load_hpsv2,
    preprocess,
)
from obsdiff.evaluation.metrics.base import METRICS, EvalContext
from obsdiff.models.tiny_sd3 import build_tokenizer

PROMPTS = ["a photo of a cat", "a red car on a road", "two dogs on a beach", "a bowl of fruit", "a city"]
# Widths that differ between the towers (a swapped or untransposed tensor cannot fit); ViT-H-14's
# head widths, 80 (vision: 3 heads, where width // 64 would not even divide) and 64 (text: 3 heads);
# a 32-pixel input in 8-pixel patches.
VISION_WIDTH, TEXT_WIDTH, EMBED, PATCH, IMAGE, LAYERS, CONTEXT = 240, 192, 48, 8, 32, 2, 77
VISION_HEADS, TEXT_HEADS = VISION_WIDTH // 80, TEXT_WIDTH // 64


def _open_clip_layout(
    vocab: int,
    vision_width: int,
    text_width: int,
    embed: int,
    patch: int,
    image: int,
    vision_layers: int,
    text_layers: int,
) -> dict[str, tuple[int, ...]]:
    """open_clip CLIP key → shape (``nn.MultiheadAttention`` in_proj, (W, E) projections)."""
    layout = {}
    for prefix, width, layers in (("visual.", vision_width, vision_layers), ("", text_width, text_layers)):
        for i in range(layers):
            block = f"{prefix}transformer.resblocks.{i}."
            layout |= {
                block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
                block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
            }  # fmt: skip
    grid = image // patch
    return layout | {
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.ln_pre.weight": (vision_width,), "visual.ln_pre.bias": (vision_width,),
        "visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,),
        "visual.proj": (vision_width, embed),
        "token_embedding.weight": (vocab, text_width),
        "positional_embedding": (CONTEXT, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed),
        "logit_scale": (),
    }  # fmt: skip


def _open_clip_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny weights in open_clip's layout, scaled so that every layer still matters."""
    generator = torch.Generator().manual_seed(seed)
    layout = _open_clip_layout(vocab, VISION_WIDTH, TEXT_WIDTH, EMBED, PATCH, IMAGE, LAYERS, LAYERS)
    state = {}
    for key, shape in layout.items():
        value = torch.randn(shape, generator=generator)
        if "ln_" in key and key.endswith("weight"):
            value = 1 + 0.1 * value  # LayerNorm gains away from 1: a swapped weight/bias shows
        elif key.endswith("bias") or key == "visual.conv1.weight":
            value = 0.1 * value
        elif key in ("visual.proj", "text_projection"):
            value = value * shape[0] ** -0.5  # x @ proj: fan-in is the first dimension
        elif key.endswith("weight") and "embedding" not in key:
            value = value * shape[1] ** -0.5  # nn.Linear (out, in)
        state[key] = value
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


# --- an independent forward of open_clip's CLIP on the original-layout weights -------------------


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _transformer(x, sd, prefix, heads, mask):
    """Pre-norm residual blocks; x (N, L, W); attention as nn.MultiheadAttention computes it."""
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}."
        qkv = _layer_norm(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (N, H, L, d)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask).softmax(-1)
        attended = (weights @ v).transpose(1, 2).flatten(2)  # (N, L, W)
        x = x + attended @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        hidden = F.gelu(
            _layer_norm(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        )
        x = x + hidden @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x


def _encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (N, g², W)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = _layer_norm(torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    x = _transformer(x, sd, "visual.", VISION_HEADS, torch.zeros(()))
    return _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def _encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]  # (N, 77, W)
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    x = _layer_norm(_transformer(x, sd, "", TEXT_HEADS, causal), sd, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def _open_clip_ids(tokenizer, prompts):
    """Token ids as open_clip's tokenizer lays them out: [SOT, ..., EOT, 0, 0, ...], 77 long."""
    rows = [tokenizer(p)["input_ids"][:CONTEXT] for p in prompts]
    return torch.tensor([row + [0] * (CONTEXT - len(row)) for row in rows])


def _reference_scores(sd, images, tokenizer, prompts):
    image = F.normalize(_encode_image(sd, preprocess(images, IMAGE)), dim=-1)
    text = F.normalize(_encode_text(sd, _open_clip_ids(tokenizer, prompts)), dim=-1)
    return (image * text).sum(-1)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(PROMPTS, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def state_dict(tokenizer):
    return _open_clip_state_dict(len(tokenizer))


@pytest.fixture(scope="module")
def model(state_dict):
    return TensorCLIP(clip_from_open_clip_state_dict(state_dict))


def _images(n: int, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _save_checkpoints(state_dict, tokenizer, folder):
    """The two checkpoint forms (plain; open_clip's training one), a safetensors copy, the tokenizer."""
    wrapped = {"module." + k: v for k, v in state_dict.items()}
    wrapped["module.attn_mask"] = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)  # a rebuilt buffer
    torch.save(state_dict, folder / "plain.pt")
    torch.save({"epoch": 3, "name": "hps", "state_dict": wrapped}, folder / "wrapped.pt")
    save_file(state_dict, str(folder / "weights.safetensors"))
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder / "plain.pt", folder / "wrapped.pt", folder / "weights.safetensors", folder / "tokenizer"


# --- tests -----------------------------------------------------------------------------------------


def test_converted_model_scores_equal_an_open_clip_reference_forward(model, state_dict, tokenizer):
    images = _images(5)
    with torch.no_grad():
        reference = _reference_scores(state_dict, images, tokenizer, PROMPTS)
        pixels = preprocess(images, IMAGE)
        torch.testing.assert_close(
            model.get_image_features(pixels), _encode_image(state_dict, pixels), atol=1e-5, rtol=0
        )
        text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        torch.testing.assert_close(
            model.get_text_features(text["input_ids"], text["attention_mask"]),
            _encode_text(state_dict, _open_clip_ids(tokenizer, PROMPTS)),
            atol=1e-5,
            rtol=0,
        )
    scores = hps_score(images, PROMPTS, model, tokenizer)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        hps_score(images, PROMPTS, model, tokenizer, batch_size=2), scores, atol=1e-6, rtol=0
    )
    assert model.config.vision_config.num_attention_heads == VISION_HEADS == 3
    assert model.config.text_config.num_attention_heads == TEXT_HEADS == 3
    assert model.config.vision_config.hidden_act == "gelu" and model.config.vision_config.image_size == IMAGE


def test_a_vit_h14_sized_layout_maps_onto_the_clip_h_config_tensor_for_tensor():
    layout = _open_clip_layout(49408, 1280, 1024, 1024, 14, 224, 32, 24)  # ViT-H-14, layers from the weights
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}  # no memory
    config = _config(state_dict, vision_head_width=80, text_head_width=64)
    vision, text = config.vision_config, config.text_config
    for tower, sizes in ((vision, (1280, 16, 32, 5120)), (text, (1024, 16, 24, 4096))):
        assert (
            tower.hidden_size,
            tower.num_attention_heads,
            tower.num_hidden_layers,
            tower.intermediate_size,
        ) == sizes
    assert (vision.patch_size, vision.image_size, text.vocab_size, text.max_position_embeddings) == (
        14,
        224,
        49408,
        77,
    )
    assert (text.bos_token_id, text.eos_token_id, config.projection_dim) == (49406, 49407, 1024)
    weights, unmatched = _mapped(state_dict)
    with torch.device("meta"):
        target = CLIPModel(config).state_dict()
    assert unmatched == []
    assert {key: value.shape for key, value in weights.items()} == {
        key: value.shape for key, value in target.items()
    }


def test_the_score_depends_on_prompt_and_image(model, tokenizer):
    images = _images(5)
    scores = hps_score(images, PROMPTS, model, tokenizer)
    other_prompts = hps_score(images, PROMPTS[1:] + PROMPTS[:1], model, tokenizer)
    other_images = hps_score(_images(5, seed=1), PROMPTS, model, tokenizer)
    assert (scores - other_prompts).abs().min() > 1e-4 and (scores - other_images).abs().min() > 1e-4
    assert scores.abs().max() <= 1  # a cosine, no logit scale


def test_preprocess_resizes_the_longest_side_and_pads_with_black():
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    square = _images(2, 32, 32)
    expected = ((square * 255).round() / 255 - mean) / std  # 8-bit, as a saved image
    torch.testing.assert_close(preprocess(square, 32), expected, atol=1e-6, rtol=0)
    wide = _images(1, 16, 32)  # already 32 wide: no resize, 8 black rows above and below
    out = preprocess(wide, 32)
    black = (-mean / std).expand(1, 3, 8, 32)
    torch.testing.assert_close(out[..., :8, :], black, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 24:, :], black, atol=1e-6, rtol=0)
    inside = ((wide * 255).round() / 255 - mean) / std
    torch.testing.assert_close(out[..., 8:24, :], inside, atol=1e-6, rtol=0)
    tall = _images(1, 64, 42)  # halved to 32 × 21: 5 black columns left, 6 right
    out = preprocess(tall, 32)
    resized = F.interpolate((tall * 255).round() / 255, size=(32, 21), mode="bicubic", antialias=True)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[..., 5:26], (resized - mean) / std, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., :5], (-mean / std).expand(1, 3, 32, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 26:], (-mean / std).expand(1, 3, 32, 6), atol=1e-6, rtol=0)


def test_loads_plain_wrapped_and_safetensors_checkpoints(model, state_dict, tokenizer, tmp_path):
    images = _images(3)
    direct = hps_score(images, PROMPTS[:3], model, tokenizer)
    *checkpoints, tokenizer_dir = _save_checkpoints(state_dict, tokenizer, tmp_path)
    for path in checkpoints:
        loaded = load_hpsv2(path, str(tokenizer_dir))
        torch.testing.assert_close(hps_score(images, PROMPTS[:3], *loaded), direct, atol=0, rtol=0)
    assert load_hpsv2(str(checkpoints[0]), tokenizer)[1] is tokenizer  # a tokenizer object is kept


def test_a_pickled_checkpoint_needs_trust(state_dict, tokenizer, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_hpsv2(path, tokenizer)
    model, _ = load_hpsv2(path, tokenizer, trust_pickle=True)
    assert model.config.projection_dim == EMBED


def test_the_hps_metrics_score_through_the_registry(model, state_dict, tokenizer, tmp_path):
    *_, wrapped, _, tokenizer_dir = _save_checkpoints(state_dict, tokenizer, tmp_path)
    ecfg = OmegaConf.create(
        {"hpsv2_model": str(tmp_path / "plain.pt"), "hpsv21_model": str(wrapped),
         "hps_tokenizer": str(tokenizer_dir), "metrics": ["hpsv2", "hpsv21"], "bootstrap": 20, "seed": 0}
    )  # fmt: skip
    images = _images(5)
    direct = hps_score(images, PROMPTS, model, tokenizer).double()
    for name, label in (("hpsv2", "HPS v2"), ("hpsv21", "HPS v2.1")):
        metric = METRICS[name]()
        assert metric.enabled(ecfg) is None and metric.higher_is_better and metric.label == label
        metric.build(ecfg, EvalContext(ecfg))
        score = metric.score(images, PROMPTS, EvalContext(ecfg))
        assert score.values == {name: pytest.approx(float(direct.mean()), abs=1e-7)}
        torch.testing.assert_close(score.samples, direct)
        assert metric.weights() == [ecfg[f"{name}_model"], str(tokenizer_dir)]
        assert metric.about() == {f"eval/{name}_network": ecfg[f"{name}_model"]}
        off = OmegaConf.create({f"{name}_model": None})
        assert metric.enabled(off) == f"eval.{name}_model is null"
    scores = Scorer(ecfg).score(images, PROMPTS)
    assert set(scores) == {"hpsv2", "hpsv2_ci95", "hpsv21", "hpsv21_ci95"}
    assert scores["hpsv2"] == scores["hpsv21"] == pytest.approx(float(direct.mean()), abs=1e-7)
    assert scores["hpsv2_ci95"][0] < scores["hpsv2"] < scores["hpsv2_ci95"][1]


def test_the_config_takes_the_hps_metrics_with_the_official_checkpoints(compose_cfg):
    cfg = compose_cfg("+experiment=debug", "eval.metrics=[fid_real,hpsv2,hpsv21]")
    check_fields(cfg)
    assert cfg.eval.hpsv2_model == "xswu/HPSv2/HPS_v2_compressed.pt"
    assert cfg.eval.hpsv21_model == "xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert cfg.eval.hps_tokenizer == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_keys_without_a_counterpart_are_listed(state_dict):
    extras = ["visual.attn_pool.weight", "transformer.resblocks.1.ls_1.gamma"]  # other open_clip towers
    with pytest.raises(ValueError, match="no CLIPModel counterpart") as err:
        clip_from_open_clip_state_dict(state_dict | {key: torch.ones(3) for key in extras})
    assert all(key in str(err.value) for key in extras)
    not_causal = state_dict | {"attn_mask": torch.zeros(CONTEXT, CONTEXT)}
    with pytest.raises(ValueError, match="'attn_mask'"):
        clip_from_open_clip_state_dict(not_causal)
    without = {k: v for k, v in state_dict.items() if k not in ("ln_final.weight", "visual.proj")}
    with pytest.raises(ValueError, match=r"missing \['ln_final.weight', 'visual.proj'\]"):
        clip_from_open_clip_state_dict(without)
    partial = {k: v for k, v in state_dict.items() if k != "transformer.resblocks.1.ln_2.bias"}
    with pytest.raises(ValueError, match="text_model.encoder.layers.1.layer_norm2.bias"):
        clip_from_open_clip_state_dict(partial)
    with pytest.raises(ValueError, match="vision width 240 is not a multiple of the head width 64"):
        clip_from_open_clip_state_dict(state_dict, vision_head_width=64)
    no_grid = state_dict | {"visual.positional_embedding": torch.zeros(16, VISION_WIDTH)}
    with pytest.raises(ValueError, match="16 vision positions are not a square grid"):
        clip_from_open_clip_state_dict(no_grid)


def test_malformed_batches_counts_and_tokenizers_fail(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="float"):
        hps_score(torch.zeros(2, 4, 32, 32), PROMPTS[:2], model, tokenizer)
    with pytest.raises(ValueError, match="float"):
        hps_score(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), PROMPTS[:2], model, tokenizer)
    with pytest.raises(ValueError, match="one prompt per image"):
        hps_score(_images(2), PROMPTS, model, tokenizer)
    with pytest.raises(ValueError, match="one prompt per image"):
        hps_score(_images(0), [], model, tokenizer)
    other = build_tokenizer(["completely", "different", "words"], tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit the HPS model"):
        hps_score(_images(2), PROMPTS[:2], model, other)
    with pytest.raises(ValueError, match="neither a file nor"):
        load_hpsv2(str(tmp_path / "missing.pt"), tokenizer)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a state dict, not a list"):
        load_hpsv2(tmp_path / "list.pt", tokenizer)


def test_a_hub_checkpoint_offline_and_not_cached_says_how_to_fetch_it(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match=r"hf download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        load_hpsv2("xswu/HPSv2/HPS_v2.1_compressed.pt", tokenizer)
