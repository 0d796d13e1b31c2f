"""A tiny, randomly initialised Flux.1 pipeline built offline from ``tiny_flux.json``.

Stock diffusers/transformers classes only: a ``FluxTransformer2DModel`` with both kinds of blocks
(double-stream blocks with separate image and text weights, then single-stream blocks whose
attention and MLP read one joint sequence in parallel) and FLUX.1-dev's guidance embedding, an
``AutoencoderKL``, a ``CLIPTextModel`` (only its pooled vector is used), a ``T5EncoderModel`` (its
token sequence is the joint attention's text) and ``FlowMatchEulerDiscreteScheduler`` with Flux's
resolution-dependent shift. Both tokenizers are built here, so nothing is downloaded, and every
build is bit-identical.

Flux packs 2×2 latent patches into one token: with a VAE of scale factor 2 and 4 latent channels, a
32×32 image is a 16×16×4 latent, 8×8 = 64 tokens of 16 channels (the transformer's ``in_channels``).
Pass ``max_sequence_length=16`` (the config's) to the pipeline: its default, 512 T5 tokens, works
but is slow.
"""

from __future__ import annotations

import re
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from obsdiff.models.tiny_sd3 import build_tokenizer, clip_text_config, read_tiny_config, tiny_vocabulary_words

CONFIG_FILE = "tiny_flux.json"
SECTIONS = {
    "transformer", "vae", "text_encoder", "text_encoder_2", "scheduler", "seed", "max_sequence_length",
}  # fmt: skip
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
WORD_START = "▁"  # SentencePiece's word-start marker, as in T5's vocabulary
# Unigram log-probabilities: a whole word always beats spelling it out character by character.
WORD_SCORE, CHARACTER_SCORE = -1.0, -10.0
# Characters every T5 tokenizer here knows, so unknown words are spelled out instead of <unk>.
ALPHABET = string.ascii_letters + string.digits + string.punctuation
# How words are cut from texts for the vocabulary: letter runs, single digits, single punctuation.
WORD_PATTERN = re.compile(r"[^\W\d_]+|\d|[^\w\s]")


def load_tiny_flux_config(config_path: Path | None = None) -> dict[str, Any]:
    """Read the tiny Flux config (the packaged ``tiny_flux.json`` by default).

    Args:
        config_path: Optional path to a JSON file with the same sections.

    Returns:
        The config with sections ``transformer``, ``vae``, ``text_encoder`` (CLIP),
        ``text_encoder_2`` (T5), ``scheduler``, ``seed`` and ``max_sequence_length``.
    """
    return read_tiny_config(CONFIG_FILE, config_path, SECTIONS, "Flux")


def _unigram_vocabulary(words: Iterable[str]) -> list[tuple[str, float]]:
    """T5's special tokens, every word (with the word-start marker), then the spelled-out alphabet."""
    pieces = sorted({piece for text in words for piece in WORD_PATTERN.findall(text)})
    scores = {WORD_START + piece: WORD_SCORE for piece in pieces}
    for character in WORD_START + ALPHABET:
        for piece in (character, WORD_START + character):
            scores.setdefault(piece, CHARACTER_SCORE)
    return [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0), *scores.items()]


def build_t5_tokenizer(words: Iterable[str], model_max_length: int) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style Unigram) in which every given word is one token.

    Texts are split on white space and each word gets T5's ``▁`` prefix; like T5, it is case
    sensitive. Words outside the vocabulary are spelled out from :data:`ALPHABET` (other
    characters become ``<unk>``). Ids follow T5: ``<pad>`` 0, ``</s>`` 1 (appended to every text),
    ``<unk>`` 2; no sentinel tokens. No normaliser, so a reloaded tokenizer (which transformers 5
    rebuilds from the vocabulary alone) splits texts exactly as this one does.

    Args:
        words: Words, or whole texts split into letter runs, single digits and punctuation, that
            must become single tokens.
        model_max_length: The tokenizer's maximum length (the pipeline pads to its own
            ``max_sequence_length``).

    Returns:
        A ``T5TokenizerFast`` built in memory (nothing is read or downloaded).
    """
    tokenizer = Tokenizer(models.Unigram(_unigram_vocabulary(words), unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=WORD_START)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_START)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_ids=0,
        model_max_length=model_max_length,
    )


def new_clip_text_encoder(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A random CLIP text encoder (no projection) sized by ``config``, with the tokenizer's ids."""
    return CLIPTextModel(clip_text_config(config, tokenizer))


def new_t5_encoder(config: dict[str, Any], tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A random T5 encoder sized by ``config``, with the tokenizer's vocabulary and ids."""
    t5_config = T5Config(
        **config,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(t5_config)


def build_tiny_flux_pipeline(config_path: Path | None = None) -> FluxPipeline:
    """Build the tiny Flux pipeline; identical weights on every call.

    Components are created in a fixed order, each right after ``torch.manual_seed(seed)``. The CLIP
    tokenizer is the tiny SD3 one (:func:`obsdiff.models.tiny_sd3.build_tokenizer`, 77 tokens); the
    T5 tokenizer knows the same words.

    Args:
        config_path: Optional JSON config; the packaged ``tiny_flux.json`` by default.

    Returns:
        A ``FluxPipeline`` on CPU in float32, in eval mode.
    """
    config = load_tiny_flux_config(config_path)
    seed = int(config["seed"])
    words = tiny_vocabulary_words()
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = build_tokenizer(words, Path(vocab_dir))
    tokenizer_2 = build_t5_tokenizer(words, int(config["max_sequence_length"]))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config["transformer"]).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config["vae"]).eval()
    torch.manual_seed(seed)
    text_encoder = new_clip_text_encoder(config["text_encoder"], tokenizer).eval()
    torch.manual_seed(seed)
    text_encoder_2 = new_t5_encoder(config["text_encoder_2"], tokenizer_2).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
