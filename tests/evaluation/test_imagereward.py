"""ImageReward v1.0 on random tiny weights in the authors' layout: the converted transformers model
against a plain-torch forward of the original architecture written here, PIL's preprocessing,
loading from a saved .pt through the registry and the Scorer, errors (nothing downloads)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer

from obsdiff.evaluation.imagereward import (
    ImageRewardModel,
    checkpoint_file,
    imagereward,
    load_blip_tokenizer,
    load_imagereward,
    preprocess,
)

PROMPTS = [
    "a photo of a cat",
    "a red car on a road",
    "two dogs on a beach",
    "a bowl of fruit",
    "a city at night",
]
# Tiny sizes; the head counts are v1.0's (16, 12), so the default loader builds the tiny model too.
VIT = {"width": 32, "depth": 2, "heads": 16, "mlp": 64, "patch": 8, "image": 32}
BERT = {"width": 24, "depth": 2, "heads": 12, "ffn": 48, "positions": 40}
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py of the authors
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer on the prompts' words, saved as a folder (BLIP's tokens not added)."""
    words = sorted({word for prompt in PROMPTS for word in prompt.split()} | {"long", "prompt", "##s"})
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path_factory.mktemp("bert_tokenizer")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_blip_tokenizer(str(tokenizer_dir))


def _random(shape, generator, kind="weight"):
    if kind == "norm":
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    if kind == "bias":
        return 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1] if len(shape) > 1 else 1)


def original_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the keys and shapes of ImageReward.pt (timm ViT, BLIP's med.py BERT)."""
    g = torch.Generator().manual_seed(seed)
    v, t = VIT["width"], BERT["width"]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def linear(key, out, inp):
        shapes[key + ".weight"], shapes[key + ".bias"] = ((out, inp), "weight"), ((out,), "bias")

    def norm(key, width):
        shapes[key + ".weight"], shapes[key + ".bias"] = ((width,), "norm"), ((width,), "bias")

    vit = "blip.visual_encoder."
    shapes[vit + "patch_embed.proj.weight"] = ((v, 3, VIT["patch"], VIT["patch"]), "weight")
    shapes[vit + "patch_embed.proj.bias"] = ((v,), "bias")
    shapes[vit + "cls_token"] = ((1, 1, v), "weight")
    shapes[vit + "pos_embed"] = ((1, (VIT["image"] // VIT["patch"]) ** 2 + 1, v), "weight")
    for i in range(VIT["depth"]):
        block = f"{vit}blocks.{i}."
        norm(block + "norm1", v)
        linear(block + "attn.qkv", 3 * v, v)
        linear(block + "attn.proj", v, v)
        norm(block + "norm2", v)
        linear(block + "mlp.fc1", VIT["mlp"], v)
        linear(block + "mlp.fc2", v, VIT["mlp"])
    norm(vit + "norm", v)
    bert = "blip.text_encoder."
    shapes[bert + "embeddings.word_embeddings.weight"] = ((vocab_size, t), "weight")
    shapes[bert + "embeddings.position_embeddings.weight"] = ((BERT["positions"], t), "weight")
    norm(bert + "embeddings.LayerNorm", t)
    for i in range(BERT["depth"]):
        layer = f"{bert}encoder.layer.{i}."
        for attention, source in (("attention", t), ("crossattention", v)):
            linear(f"{layer}{attention}.self.query", t, t)
            linear(f"{layer}{attention}.self.key", t, source)
            linear(f"{layer}{attention}.self.value", t, source)
            linear(f"{layer}{attention}.output.dense", t, t)
            norm(f"{layer}{attention}.output.LayerNorm", t)
        linear(layer + "intermediate.dense", BERT["ffn"], t)
        linear(layer + "output.dense", t, BERT["ffn"])
        norm(layer + "output.LayerNorm", t)
    linear("blip.vision_proj", 256, v)  # contrastive projections: in the checkpoint, unused
    linear("blip.text_proj", 256, t)
    head = ((1024, t), (128, 1024), (64, 128), (16, 64), (1, 16))  # Sequential indices 0, 2, 4, 6, 7
    for index, (out, inp) in zip((0, 2, 4, 6, 7), head, strict=True):
        linear(f"mlp.layers.{index}", out, inp)
    state_dict = {key: _random(shape, g, kind) for key, (shape, kind) in shapes.items()}
    state_dict[bert + "embeddings.position_ids"] = torch.arange(BERT["positions"]).expand(1, -1)
    return state_dict


# The original architecture in plain torch, on the original keys.
def _linear(sd, key, x):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _norm(sd, key, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _attention(q, k, v, heads, key_mask=None):
    """Softmax attention of (B, Lq, D) queries on (B, Lk, D) keys/values; key_mask (B, Lk) 1 = keep."""
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731 (B, h, L, D/h)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, -math.inf)
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)


def reference_vit(sd, pixels):
    """timm ViT: patches + [CLS] + positions, pre-norm blocks with fused qkv, final norm (eps 1e-6)."""
    vit, eps = "blip.visual_encoder.", 1e-6
    x = F.conv2d(
        pixels, sd[vit + "patch_embed.proj.weight"], sd[vit + "patch_embed.proj.bias"], stride=VIT["patch"]
    )
    x = x.flatten(2).transpose(1, 2)  # (B, P, D)
    x = torch.cat([sd[vit + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[vit + "pos_embed"]
    for i in range(VIT["depth"]):
        block = f"{vit}blocks.{i}."
        q, k, v = _linear(sd, block + "attn.qkv", _norm(sd, block + "norm1", x, eps)).chunk(3, -1)
        x = x + _linear(sd, block + "attn.proj", _attention(q, k, v, VIT["heads"]))
        hidden = F.gelu(_linear(sd, block + "mlp.fc1", _norm(sd, block + "norm2", x, eps)))
        x = x + _linear(sd, block + "mlp.fc2", hidden)
    return _norm(sd, vit + "norm", x, eps)


def reference_bert(sd, ids, mask, image_embeds):
    """med.py BERT, multimodal mode: post-norm self-attention, cross-attention to the image, FFN."""
    bert, eps, heads = "blip.text_encoder.", 1e-12, BERT["heads"]
    x = sd[bert + "embeddings.word_embeddings.weight"][ids]
    x = _norm(
        sd,
        bert + "embeddings.LayerNorm",
        x + sd[bert + "embeddings.position_embeddings.weight"][: ids.shape[1]],
        eps,
    )
    for i in range(BERT["depth"]):
        layer = f"{bert}encoder.layer.{i}."
        for attention, source, source_mask in (
            ("attention", None, mask),
            ("crossattention", image_embeds, None),
        ):
            a = f"{layer}{attention}."
            kv = x if source is None else source
            context = _attention(
                _linear(sd, a + "self.query", x),
                _linear(sd, a + "self.key", kv),
                _linear(sd, a + "self.value", kv),
                heads,
                source_mask,
            )
            x = _norm(sd, a + "output.LayerNorm", _linear(sd, a + "output.dense", context) + x, eps)
        ffn = _linear(sd, layer + "output.dense", F.gelu(_linear(sd, layer + "intermediate.dense", x)))
        x = _norm(sd, layer + "output.LayerNorm", ffn + x, eps)
    return x


def reference_reward(sd, pixels, ids, mask):
    """The linear head on [CLS] (no activations), normalised by the authors' constants."""
    h = reference_bert(sd, ids, mask, reference_vit(sd, pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):
        h = _linear(sd, f"mlp.layers.{index}", h)
    return (h.squeeze(-1) - MEAN) / STD


def _pil_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's torchvision pipeline on PIL images: Resize(size, BICUBIC), CenterCrop(size),
    ToTensor, Normalize (CLIP's mean and std)."""
    out = []
    for image in (images.clamp(0, 1) * 255).round().byte():
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        w, h = pil.size
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # (h, w)
        pil = pil.resize((new[1], new[0]), Image.BICUBIC)
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        pil = pil.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        out.append((pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))
    return torch.stack(out)


def _images(n: int, seed: int = 0, size=(40, 48)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _tokens(tokenizer, prompts):
    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return text["input_ids"], text["attention_mask"]


@pytest.fixture(scope="module")
def original(tokenizer):
    return original_state_dict(len(tokenizer))


@pytest.fixture(scope="module")
def model(original):
    return ImageRewardModel.from_original_state_dict(original)


def test_the_converted_model_gives_the_original_architectures_scores(model, original, tokenizer):
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = _tokens(tokenizer, PROMPTS)
    assert ids.shape == (5, 35) and (ids[:, 0] == tokenizer.cls_token_id).all() and (mask == 0).any()
    with torch.no_grad():
        converted = model(pixels, ids, mask)
    expected = reference_reward(original, pixels, ids, mask)
    assert converted.shape == (5,) and expected.std() > 0.1  # scores of order 1, not all equal
    torch.testing.assert_close(converted, expected, rtol=0, atol=1e-5)
    assert model.image_size == 32 and model.vision.config.layer_norm_eps == 1e-6


def test_scores_are_the_reference_on_pil_preprocessed_images(model, original, tokenizer):
    images = _images(5, size=(32, 38))  # the shorter side fits: no resize, a centre crop from column 3
    pil = _pil_preprocess(images, 32)
    torch.testing.assert_close(preprocess(images, 32), pil, rtol=0, atol=1e-6)
    expected = reference_reward(original, pil, *_tokens(tokenizer, PROMPTS))
    scores = imagereward(images, PROMPTS, model, tokenizer)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        imagereward(images, PROMPTS, model, tokenizer, batch_size=2), scores, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("size", [(40, 48), (48, 40), (256, 320)])
def test_preprocessing_is_within_one_level_of_pil_when_resizing(size):
    # smooth images with noise; the shorter side goes to 32 (224 for 256x320), the longer is cropped
    smooth = F.interpolate(_images(3, seed=2, size=(17, 21)), size=size, mode="bilinear")
    images = (smooth + 0.1 * _images(3, seed=3, size=size)).clamp(0, 1)
    target = 224 if size[0] > 100 else 32
    ours, pil = preprocess(images, target), _pil_preprocess(images, target)
    levels = ((ours - pil) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255).abs()  # in 8-bit levels
    assert ours.shape == (3, 3, target, target)
    assert levels.max() <= 1 + 1e-3 and (levels > 0.5).float().mean() < 2e-3  # PIL: fixed-point weights


def test_the_score_depends_on_the_prompt_and_on_the_image(model, tokenizer):
    image, other = _images(1, seed=4), _images(1, seed=5)
    by_prompt = imagereward(image.expand(5, -1, -1, -1), PROMPTS, model, tokenizer)
    by_image = imagereward(torch.cat([image, other]), PROMPTS[:1] * 2, model, tokenizer)
    assert by_prompt.unique().numel() == 5 and (by_prompt.max() - by_prompt.min()) > 0.01
    assert abs(by_image[0] - by_image[1]) > 1e-3


def test_prompts_are_truncated_to_35_tokens(model, tokenizer):
    image = _images(1, seed=6)
    score = lambda words, last: imagereward(image, [" ".join(["long"] * words + [last])], model, tokenizer)  # noqa: E731
    assert score(33, "cat") == score(33, "dogs")  # [CLS] + 33 words + [SEP]: the 34th is cut
    assert score(32, "cat") != score(32, "dogs")  # the 33rd word is kept


def test_loads_from_a_saved_pt_and_a_folder(original, tokenizer_dir, tmp_path, model, tokenizer):
    torch.save(original, tmp_path / "ImageReward.pt")
    direct = imagereward(_images(3), PROMPTS[:3], model, tokenizer)
    for path in (tmp_path / "ImageReward.pt", tmp_path):
        loaded, blip_tokenizer = load_imagereward(str(path), str(tokenizer_dir))
        assert blip_tokenizer.convert_tokens_to_ids("[ENC]") == len(blip_tokenizer) - 1
        assert blip_tokenizer.bos_token == "[DEC]"
        torch.testing.assert_close(imagereward(_images(3), PROMPTS[:3], loaded, blip_tokenizer), direct)


def test_a_hub_id_reads_the_hub_file(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda *args: calls.append(args) or str(tmp_path / "x.pt")
    )
    assert checkpoint_file("THUDM/ImageReward") == tmp_path / "x.pt"
    assert calls == [("THUDM/ImageReward", "ImageReward.pt")]


def test_the_imagereward_metric_scores_through_the_registry_and_the_scorer(original, tokenizer_dir, tmp_path):
    from omegaconf import OmegaConf

    from obsdiff.evaluation.evaluate import Scorer
    from obsdiff.evaluation.metrics.base import METRICS, EvalContext

    torch.save(original, tmp_path / "ImageReward.pt")
    fields = {
        "imagereward_model": str(tmp_path / "ImageReward.pt"),
        "imagereward_tokenizer": str(tokenizer_dir),
    }
    ecfg = OmegaConf.create({**fields, "metrics": ["imagereward"], "bootstrap": 20, "seed": 0})
    metric = METRICS["imagereward"]()
    assert metric.enabled(ecfg) is None and metric.higher_is_better and "v1.0" in metric.label
    metric.build(ecfg, EvalContext(ecfg))
    score = metric.score(_images(5), PROMPTS, EvalContext(ecfg))
    direct = imagereward(_images(5), PROMPTS, *load_imagereward(*fields.values()))
    assert score.values["imagereward"] == pytest.approx(float(direct.double().mean()))
    assert score.samples.shape == (5,) and metric.weights() == list(fields.values())
    scored = Scorer(ecfg).score(_images(5), PROMPTS)
    assert scored["imagereward"] == pytest.approx(float(direct.double().mean()))
    low, high = scored["imagereward_ci95"]
    assert direct.min() <= low <= scored["imagereward"] <= high <= direct.max()
    assert metric.enabled(OmegaConf.create({"imagereward_model": None})) == "eval.imagereward_model is null"


def test_malformed_batches_and_count_mismatches_fail(model, tokenizer):
    for bad in (
        torch.rand(3, 40, 48),
        torch.rand(2, 4, 40, 48),
        torch.zeros(2, 3, 40, 48, dtype=torch.uint8),
    ):
        with pytest.raises(ValueError, match=r"float \(N, 3, H, W\)"):
            imagereward(bad, PROMPTS[: len(bad)], model, tokenizer)
    with pytest.raises(ValueError, match="one prompt per image"):
        imagereward(_images(2), PROMPTS, model, tokenizer)
    with pytest.raises(ValueError, match="one prompt per image"):
        imagereward(_images(0), [], model, tokenizer)


def test_unmatched_missing_and_misshapen_keys_are_listed(original):
    extra = {**original, "blip.visual_encoder.head.weight": torch.zeros(2, 32)}
    with pytest.raises(ValueError, match=r"unmatched keys: blip\.visual_encoder\.head\.weight"):
        ImageRewardModel.from_original_state_dict(extra)
    missing = {
        k: v
        for k, v in original.items()
        if k != "blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"
    }
    with pytest.raises(
        ValueError, match=r"missing weights: text\.encoder\.layer\.1\.crossattention\.self\.value\.bias"
    ):
        ImageRewardModel.from_original_state_dict(missing)
    lacking = {**original, "blip.text_encoder.encoder.layer.0.attention.self.extra.weight": torch.zeros(1)}
    with pytest.raises(
        ValueError, match=r"keys the model lacks: text\.encoder\.layer\.0\.attention\.self\.extra"
    ):
        ImageRewardModel.from_original_state_dict(lacking)
    wrong = {**original, "mlp.layers.7.weight": torch.zeros(1, 15)}
    with pytest.raises(ValueError, match=r"wrong shapes: mlp\.7\.weight \(1, 15\)"):
        ImageRewardModel.from_original_state_dict(wrong)
    with pytest.raises(ValueError, match=r"missing weights: blip\.visual_encoder\.cls_token"):
        ImageRewardModel.from_original_state_dict({k: v for k, v in original.items() if "cls_token" not in k})


def test_a_tokenizer_larger_than_the_vocabulary_fails(tokenizer, tokenizer_dir, tmp_path):
    small = original_state_dict(len(tokenizer) - 1)
    torch.save(small, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="tokens"):
        load_imagereward(str(tmp_path / "ImageReward.pt"), str(tokenizer_dir))
