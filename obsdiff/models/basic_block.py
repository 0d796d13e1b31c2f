"""diffusers' ``BasicTransformerBlock`` (SDXL / SD2.1 UNets, PixArt): units, structure, shapes.

One block: self-attention ``attn1`` (``to_q = to_k = to_v`` read the normalised image tokens: one
Hessian), cross-attention ``attn2`` (``to_q`` reads image tokens; ``to_k = to_v`` read the text
embedding), a feed-forward ``ff`` (``net.0.proj`` up, GEGLU in the UNets, tanh-GELU in PixArt;
``net.2`` down). FAMILIES.md.

The cross-attention K/V input is **the same tensor in every block of the model** (the text
encoder output, or PixArt's caption projection), and no pruned layer is upstream of it: one
Hessian serves every ``attn2.to_k`` / ``attn2.to_v`` of the model. It is one input group in a unit
of its own, the first unit of the model (so package 1 calibrates it once), instead of one Hessian
per block.
"""

from __future__ import annotations

from collections.abc import Sequence

from obsdiff.lazy import nn
from obsdiff.models.base import Unit, table_units
from obsdiff.models.structure import HeadGroup, NeuronGroup, StructureUnit, slice_unit

BASIC_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
CROSS_KV = ("attn2.to_k", "attn2.to_v")  # model-wide: one input group for all blocks
# Per-block units in forward order (the cross-attention K/V are not here: see shared_cross_kv).
BLOCK_UNITS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("attn1.to_q", "attn1.to_k", "attn1.to_v"),),
    (("attn1.to_out.0",),),
    (("attn2.to_q",),),
    (("attn2.to_out.0",),),
    (("ff.net.0.proj",),),
    (("ff.net.2",),),
)
FFN_MULT = 4  # diffusers' FeedForward default, as in every family here
HEAD_INPUTS = ("to_q", "to_k", "to_v")


def shared_cross_kv(denoiser: nn.Module, prefixes: Sequence[str], targets: Sequence[str]) -> Unit:
    """The model-wide cross-attention K/V unit of the blocks at ``prefixes`` (``[]``: none targeted).

    Every targeted ``attn2.to_k`` / ``attn2.to_v`` of those blocks reads the text embedding: one
    input group, so one Hessian for all of them (hooked on the first).
    """
    modules = dict(denoiser.named_modules())
    names = tuple(
        f"{prefix}.{target}"
        for prefix in prefixes
        for target in CROSS_KV
        if target in targets and _is_cross(modules.get(f"{prefix}.attn2")) and f"{prefix}.{target}" in modules
    )
    return [names] if names else []


def _is_cross(attn: nn.Module | None) -> bool:
    return attn is not None and getattr(attn, "is_cross_attention", False)


def basic_units(denoiser: nn.Module, prefixes: Sequence[str], targets: Sequence[str]) -> list[Unit]:
    """Units of the blocks at ``prefixes`` (forward order): the shared cross K/V first, then per block."""
    shared = shared_cross_kv(denoiser, prefixes, targets)
    return ([shared] if shared else []) + block_units(denoiser, prefixes, targets)


def block_units(denoiser: nn.Module, prefixes: Sequence[str], targets: Sequence[str]) -> list[Unit]:
    """The per-block units (``BLOCK_UNITS``) of the blocks at ``prefixes``, without the cross K/V."""
    return table_units(denoiser, range(len(prefixes)), lambda i: (prefixes[i], BLOCK_UNITS, ""), targets)


def head_dim(attn: nn.Module) -> int:
    """``d_h``: the attention's width per head (the UNet config's ``attention_head_dim`` is a head count)."""
    return attn.inner_dim // attn.heads


def structure_units(blocks: Sequence[tuple[int, str, nn.Module]]) -> list[StructureUnit]:
    """Heads of ``attn1`` and ``attn2`` and the FFN neurons, one unit each, per ``(index, prefix, block)``."""
    units: list[StructureUnit] = []
    for b, prefix, block in blocks:
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is None:
                continue
            d = head_dim(attn)
            inputs = tuple(f"{prefix}.{name}.{n}" for n in HEAD_INPUTS)
            outputs = (f"{prefix}.{name}.to_out.0",)
            units.append((HeadGroup(b, name, outputs, inputs, (0, attn.heads * d), d),))
        width = block.ff.net[2].in_features
        gated = block.ff.net[0].proj.out_features == 2 * width  # GEGLU: value rows, then gate rows
        up = (f"{prefix}.ff.net.0.proj",)
        units.append((NeuronGroup(b, "ff", f"{prefix}.ff.net.2", up, (0, width), gated=gated),))
    return units


def remove_structure(
    denoiser: nn.Module, block: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]
) -> None:
    """Slice the unit's removed heads / neurons out and update the attentions' head counts.

    ``AttnProcessor2_0`` splits heads by ``inner_dim // attn.heads``: a stale ``heads`` would run
    and be wrong.
    """
    slice_unit(denoiser, unit, removed)
    for group in unit:
        if isinstance(group, HeadGroup):
            attn = getattr(block, group.name)
            attn.heads = group.num_heads - len(removed.get(group.key, []))
            attn.inner_dim = attn.inner_kv_dim = attn.heads * group.head_dim


def block_shape(block: nn.Module) -> dict[str, int]:
    """The block's shapes that differ from dense: heads of ``attn1``/``attn2``, ``ff`` width.

    Dense values come from the block itself: the output projections keep the block width
    (``heads · d_h`` = width in these models) and the FFN is ``FFN_MULT ×`` width.
    """
    shape = {}
    for name in ("attn1", "attn2"):
        attn = getattr(block, name, None)
        if attn is not None and attn.heads != attn.to_out[0].out_features // head_dim(attn):
            shape[name] = attn.heads
    ff = block.ff.net[2]
    if ff.in_features != FFN_MULT * ff.out_features:
        shape["ff"] = ff.in_features
    return shape
