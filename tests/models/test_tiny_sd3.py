"""The embedded tiny SD3 pipeline: sizes, tokenizer, determinism, sampling, save and reload."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from obsdiff.models.tiny_sd3 import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tiny_sd3_pipeline,
    build_tokenizer,
    load_tiny_config,
    load_tiny_sd3,
    save_tiny_sd3,
    tiny_vocabulary_words,
)

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
SAMPLE_KWARGS = {
    "num_inference_steps": 4,
    "guidance_scale": 7.0,
    "height": 32,
    "width": 32,
    "output_type": "pt",
}


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline shared by the read-only tests of this module."""
    pipeline = build_tiny_sd3_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] for ``prompts`` with one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompts, generator=generator, **SAMPLE_KWARGS).images


def assert_same_weights(first, second) -> None:
    """Every component of two pipelines has bit-identical parameters and buffers."""
    for name in COMPONENTS:
        left, right = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key}"


def test_sizes_match_the_spec(pipe) -> None:
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) == 4
    assert transformer.transformer_blocks[-1].context_pre_only
    assert not any(block.context_pre_only for block in transformer.transformer_blocks[:-1])
    block = transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.shape == (64, 64)
    assert block.ff.net[0].proj.weight.shape == (256, 64)
    assert pipe.vae_scale_factor == 2 and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    # Two CLIP encoders of width 32 concatenate to the joint attention and pooled widths.
    widths = [enc.config.hidden_size for enc in (pipe.text_encoder, pipe.text_encoder_2)]
    projections = [enc.config.projection_dim for enc in (pipe.text_encoder, pipe.text_encoder_2)]
    assert sum(widths) == transformer.config.joint_attention_dim == 64
    assert sum(projections) == transformer.config.pooled_projection_dim == 64
    assert load_tiny_config()["scheduler"]["shift"] == 3.0


def test_text_encoder_ids_match_tokenizer(pipe) -> None:
    tokenizer, config = pipe.tokenizer, pipe.text_encoder.config
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.model_max_length == 77 == config.max_position_embeddings


def test_tokenizer_words_are_single_tokens(pipe) -> None:
    tokenizer = pipe.tokenizer
    ids = tokenizer("a red bicycle leaning on a brick wall", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[9] == tokenizer.eos_token_id  # 8 words, 8 tokens
    assert set(ids[10:]) == {tokenizer.eos_token_id}
    for word in " ".join(tiny_vocabulary_words()).split():
        assert len(tokenizer.tokenize(word)) == 1, word


def test_tokenizer_falls_back_to_characters(pipe) -> None:
    tokenizer = pipe.tokenizer
    pieces = tokenizer.tokenize("Xylophone Ωmega 42!")
    assert len(pieces) > 5
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)
    assert tokenizer.decode(tokenizer("Xylophone 42").input_ids, skip_special_tokens=True) == "xylophone 4 2"


def test_build_tokenizer_writes_clip_files(tmp_path: Path) -> None:
    words = ["zebra", "zebras", "under", "a bright neon sign"]
    tokenizer = build_tokenizer(words, tmp_path / "one")
    vocab = json.loads((tmp_path / "one" / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "one" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 512 + len(merges) - 1 + 2  # bytes, their </w> forms, merges (no header), specials
    assert list(vocab)[-2:] == [BOS_TOKEN, EOS_TOKEN] and vocab["a</w>"] == 256 + ord("a") - 33
    for word in ("zebra", "zebras", "under", "bright", "neon", "sign", "a"):
        assert tokenizer.tokenize(word) == [word + "</w>"]
    build_tokenizer(reversed(words), tmp_path / "two")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_build_is_deterministic_and_fast(pipe) -> None:
    start = time.perf_counter()
    again = build_tiny_sd3_pipeline()
    assert time.perf_counter() - start < 2.0
    assert_same_weights(pipe, again)
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


@pytest.mark.slow  # a sampler run (seconds on an idle CPU, tens under load)
def test_sampling_is_non_degenerate(pipe) -> None:
    prompts = ["a red bicycle leaning on a brick wall", "a black cat sleeping on a blue sofa"]
    images = sample(pipe, prompts)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05
    one, other = sample(pipe, prompts[:1]), sample(pipe, prompts[1:])
    assert (one - other).abs().mean() > 1e-3  # same seed, different prompt
    assert torch.equal(one, sample(pipe, prompts[:1]))


@pytest.mark.slow  # seconds on an idle CPU, tens under load
def test_save_and_reload_offline(pipe, tmp_path: Path) -> None:
    folder = save_tiny_sd3(tmp_path / "tiny")
    assert (folder / "model_index.json").is_file()
    reloaded = load_tiny_sd3(folder)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.text_encoder_3 is None and reloaded.tokenizer_3 is None
    assert_same_weights(pipe, reloaded)
    prompt = ["a fox sitting in autumn leaves"]
    assert reloaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    assert torch.allclose(sample(reloaded, prompt), sample(pipe, prompt), atol=1e-6)
