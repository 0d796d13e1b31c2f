"""A tiny, randomly initialised Stable Diffusion 3 pipeline built offline from ``tiny_sd3.json``.

Stock diffusers/transformers classes only: an MMDiT ``SD3Transformer2DModel``, an ``AutoencoderKL``,
two CLIP text encoders with projection (their widths concatenate to the joint attention width) and
no T5 (``text_encoder_3=None``: the pipeline feeds zero T5 embeddings). The CLIP tokenizer is a byte
level BPE whose vocabulary is built here, so nothing is downloaded. Every build is bit-identical.

Without T5 the pipeline appends ``max_sequence_length`` (default 256) all-zero rows to the 77 CLIP
tokens, so most context tokens carry no prompt. The VAE's ``scaling_factor``/``shift_factor`` (3.0,
-0.1) match the std/mean (about 0.30/-0.10) of the random encoder's latents, so scaled latents have
roughly unit variance, as in SD3.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Regex, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from obsdiff.calibration.prompts import tiny_prompts

CONFIG_FILE = "tiny_sd3.json"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The split rule of CLIP's tokenizer: special tokens, contractions, letter runs, single digits, punctuation.
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Words every tiny tokenizer knows besides those of the tiny prompts.
EXTRA_WORDS = (
    "a an the of and with in on at photo painting picture drawing image high quality "
    "red orange yellow green blue purple pink black white grey brown gold silver "
    "one two three four five small large big tiny old new bright dark"
).split()


def read_tiny_config(
    default_file: str, config_path: Path | None, sections: set[str], what: str
) -> dict[str, Any]:
    """Read a tiny model's JSON config: the packaged ``default_file``, or ``config_path``.

    Raises:
        ValueError: The config lacks some of ``sections`` (names the file and ``what`` it is).
    """
    if config_path is None:
        text = resources.files(__package__).joinpath(default_file).read_text(encoding="utf-8")
    else:
        text = Path(config_path).read_text(encoding="utf-8")
    config = json.loads(text)
    missing = set(sections) - set(config)
    if missing:
        raise ValueError(f"tiny {what} config {config_path or default_file} lacks sections {sorted(missing)}")
    return config


def load_tiny_config(config_path: Path | None = None) -> dict[str, Any]:
    """Read the tiny SD3 config (the packaged ``tiny_sd3.json`` by default).

    Args:
        config_path: Optional path to a JSON file with the same sections.

    Returns:
        The config with sections ``transformer``, ``vae``, ``text_encoder``, ``scheduler`` and ``seed``.
    """
    return read_tiny_config(
        CONFIG_FILE, config_path, {"transformer", "vae", "text_encoder", "scheduler", "seed"}, "SD3"
    )


def _word_symbols(word: str) -> list[str]:
    """Byte-to-unicode symbols of one word, the last one marked with ``</w>``."""
    ((mapped, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(word)
    symbols = list(mapped)
    symbols[-1] += END_OF_WORD
    return symbols


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every left-to-right occurrence of ``pair`` in a symbol sequence."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is a single symbol (each word counted once).

    The most frequent adjacent pair is merged first; ties go to the smallest pair, so the result
    depends only on the set of words.

    Args:
        words: Lower-case words, already split the way CLIP splits text.

    Returns:
        Merges in rank order, in byte-to-unicode form, with ``</w>`` on word-final symbols.
    """
    sequences = [_word_symbols(word) for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while sequences := [symbols for symbols in sequences if len(symbols) > 1]:
        counts = Counter(pair for symbols in sequences for pair in pairwise(symbols))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        sequences = [_apply_merge(symbols, best) for symbols in sequences]
    return merges


def _base_alphabet() -> list[str]:
    """The 256 byte-to-unicode symbols followed by their word-final ``</w>`` forms (CLIP's order)."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda symbol: ord(symbol))
    return byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]


def _split_words(words: Iterable[str]) -> list[str]:
    """Split texts into CLIP words (lower-case), unique, in first-seen order."""
    splitter = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    pieces = [piece for text in words for piece, _ in splitter.pre_tokenize_str(text.lower())]
    return list(dict.fromkeys(piece for piece in pieces if piece.strip()))


def build_tokenizer(words: Iterable[str], out_dir: Path) -> CLIPTokenizer:
    """Write a small CLIP BPE vocabulary in which every given word is one token, and load it.

    The vocabulary holds the byte-level alphabet (so any text tokenises, unknown words falling back
    to smaller pieces), the merged symbols, then ``<|startoftext|>`` and ``<|endoftext|>``.

    Args:
        words: Words (or whole texts, split like CLIP splits them) that must become single tokens.
        out_dir: Folder that receives ``vocab.json`` and ``merges.txt``.

    Returns:
        A ``CLIPTokenizer`` on those files, 77 tokens long, padding with ``<|endoftext|>``.
    """
    word_list = _split_words(words)
    merges = _learn_merges(word_list)
    symbols = _base_alphabet() + [left + right for left, right in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(symbols))}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    merges_file.write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=EOS_TOKEN, model_max_length=77)
    split = [word for word in word_list if len(tokenizer.tokenize(word)) != 1]
    if split:
        raise RuntimeError(f"BPE merges left these words in several tokens: {split[:10]}")
    return tokenizer


def tiny_vocabulary_words() -> list[str]:
    """Words the tiny tokenizer turns into single tokens: the tiny prompts plus a fixed list."""
    return tiny_prompts() + list(EXTRA_WORDS)


def _text_encoder(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """A random CLIP text encoder sized by ``config`` with the tokenizer's vocabulary and ids."""
    return CLIPTextModelWithProjection(clip_text_config(config, tokenizer)).eval()


def clip_text_config(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A CLIP text config sized by ``config`` with the tokenizer's vocabulary size and special ids."""
    return CLIPTextConfig(
        **config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sd3_pipeline(config_path: Path | None = None) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline; identical weights on every call.

    Components are created in a fixed order, each right after ``torch.manual_seed(seed)``.

    Args:
        config_path: Optional JSON config; the packaged ``tiny_sd3.json`` by default.

    Returns:
        A ``StableDiffusion3Pipeline`` on CPU in float32 with ``text_encoder_3=tokenizer_3=None``.
    """
    config = load_tiny_config(config_path)
    seed = int(config["seed"])
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = build_tokenizer(tiny_vocabulary_words(), Path(vocab_dir))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config["transformer"]).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config["vae"]).eval()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(config["text_encoder"], tokenizer)
    torch.manual_seed(seed + 1)  # a different draw: two identical encoders would be a degenerate model
    text_encoder_2 = _text_encoder(config["text_encoder"], tokenizer)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_tiny_sd3(path: Path, config_path: Path | None = None) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (reload with ``load_tiny_sd3``).

    Args:
        path: Output folder.
        config_path: Optional JSON config; the packaged ``tiny_sd3.json`` by default.

    Returns:
        The output folder.
    """
    build_tiny_sd3_pipeline(config_path).save_pretrained(path)
    return Path(path)


def load_tiny_sd3(path: Path) -> StableDiffusion3Pipeline:
    """Reload a saved tiny pipeline from disk, offline.

    ``from_pretrained`` needs ``text_encoder_3=None, tokenizer_3=None`` passed explicitly: diffusers
    does not list them as optional components, so a folder saved without T5 fails to load otherwise.

    Args:
        path: Folder written by ``save_tiny_sd3`` (or ``save_pretrained``).

    Returns:
        The pipeline, without T5.
    """
    return StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
