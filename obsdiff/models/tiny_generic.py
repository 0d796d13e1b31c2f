"""A tiny, randomly initialised Sana pipeline built offline from ``tiny_generic.json``.

The family no adapter knows by name, used to prove the generic adapter (``model.family=generic``,
``model.path=tiny_generic``). Stock diffusers/transformers classes only: a ``SanaTransformer2DModel``
(linear self-attention, cross-attention to the caption, a convolutional GLU feed-forward), a deep
compression ``AutoencoderDC`` (two levels: scale factor 2), a ``Gemma2Model`` text encoder and
``FlowMatchEulerDiscreteScheduler``. The tokenizer is a word-level ``PreTrainedTokenizerFast``
whose vocabulary is built here (the tiny prompts' words), so nothing is downloaded, and every build
is bit-identical.

Call the pipeline with ``use_resolution_binning=False`` (binning would map 32 px to a 512 px bin),
``max_sequence_length=16`` (the config's) and ``complex_human_instruction=None`` (Sana's default
instruction prepends about 200 words to every prompt); ``conf/model/tiny_generic.yaml`` passes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from obsdiff.models.tiny_sd3 import read_tiny_config, tiny_vocabulary_words

CONFIG_FILE = "tiny_generic.json"
SECTIONS = {"seed", "pipeline", "max_sequence_length", "transformer", "vae", "text_encoder", "scheduler"}
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<bos>", "<unk>"


def load_tiny_generic_config(config_path: Path | None = None) -> dict[str, Any]:
    """Read the tiny Sana config (the packaged ``tiny_generic.json`` by default).

    Args:
        config_path: Optional path to a JSON file with the same sections.
    """
    return read_tiny_config(CONFIG_FILE, config_path, SECTIONS, "generic")


def build_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: every word of ``texts`` is one token, others ``<unk>``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then the words in sorted order; every
    encoding starts with ``<bos>`` (as Gemma's does).
    """
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text.lower())})
    specials = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
    )


def build_tiny_generic_pipeline(config_path: Path | None = None) -> SanaPipeline:
    """Build the tiny Sana pipeline; identical weights on every call.

    Components are created in a fixed order, each right after ``torch.manual_seed(seed)``.

    Args:
        config_path: Optional JSON config; the packaged ``tiny_generic.json`` by default.

    Returns:
        A ``SanaPipeline`` on CPU in float32.
    """
    config = load_tiny_generic_config(config_path)
    seed = int(config["seed"])
    tokenizer = build_word_tokenizer(tiny_vocabulary_words())
    torch.manual_seed(seed)
    transformer_config = {k: v for k, v in config["transformer"].items() if not k.startswith("_")}
    transformer = SanaTransformer2DModel(**transformer_config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderDC(**config["vae"]).eval()
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            **config["text_encoder"],
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
    )
