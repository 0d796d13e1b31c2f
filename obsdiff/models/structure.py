"""Structure groups: what one structured removal takes out of a block (docs/METHOD.md §4).

A group names the layers it touches and the *column range* of the OBS layer(s) it removes from,
so one output projection can hold several groups: Flux's single-stream ``proj_out`` reads
``[attention (heads · d_h) | MLP (m)]``, a head group on the first range and a neuron group on
the second. Groups are plain data; the adapter builds them and slices the model, the structured
strategy chooses what goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from obsdiff.lazy import nn, torch


@dataclass(frozen=True)
class HeadGroup:
    """The heads of one attention.

    Args:
        block: global block index (forward order).
        name: the attention's key in the manifest's architecture (``attn``, ``attn2``).
        outputs: output projections (OBS layers, each with its own Hessian; heads ranked per
            projection and fused with RRF): columns ``cols`` hold the heads.
        inputs: projections whose output rows are per head (``to_q/k/v``, ``add_*_proj``): the
            removed heads' rows are deleted, without compensation.
        cols: ``(start, stop)`` of the head columns in every output projection.
        head_dim: ``d_h`` (from the model config).
    """

    block: int
    name: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    cols: tuple[int, int]
    head_dim: int

    @property
    def key(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def num_heads(self) -> int:
        return (self.cols[1] - self.cols[0]) // self.head_dim

    def columns(self, heads: list[int]) -> list[int]:
        """Output-projection columns of ``heads``."""
        start, d = self.cols[0], self.head_dim
        return [start + h * d + i for h in sorted(heads) for i in range(d)]

    def rows(self, heads: list[int]) -> list[int]:
        """Input-projection rows of ``heads``."""
        return [h * self.head_dim + i for h in sorted(heads) for i in range(self.head_dim)]


@dataclass(frozen=True)
class NeuronGroup:
    """The hidden neurons of one feed-forward (or of the MLP branch of a Flux single block).

    Args:
        block: global block index.
        name: the FFN's key in the manifest's architecture (``ff``, ``ff_context``, ``mlp``).
        down: the down-projection (OBS layer): neuron ``j`` is its column ``cols[0] + j``.
        up: the up-projection(s): neuron ``j`` is row ``j`` (plus row ``j + width`` when
            ``gated``: GEGLU's value and gate halves).
        cols: ``(start, stop)`` of the neuron columns in ``down``.
        gated: the up-projection holds ``2 · width`` rows (GEGLU).
    """

    block: int
    name: str
    down: str
    up: tuple[str, ...]
    cols: tuple[int, int]
    gated: bool = False

    @property
    def key(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def width(self) -> int:
        return self.cols[1] - self.cols[0]

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.down,)

    def columns(self, neurons: list[int]) -> list[int]:
        return [self.cols[0] + j for j in sorted(neurons)]

    def rows(self, neurons: list[int]) -> list[int]:
        rows = sorted(neurons)
        return rows + [self.width + j for j in rows] if self.gated else rows


StructureGroup = HeadGroup | NeuronGroup
# A structured unit: groups calibrated in the same package; groups may share an OBS layer.
StructureUnit = tuple[StructureGroup, ...]


def complement(size: int, removed: list[int]) -> torch.Tensor:
    """Indices in ``range(size)`` not in ``removed`` (ascending LongTensor)."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[list(removed)] = False
    return keep.nonzero().flatten()


def keep_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` holding only output ``rows`` and input ``cols`` (weights and bias)."""
    W = linear.weight.data
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    out = nn.Linear(W.shape[1], W.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(W.contiguous(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.data if rows is None else linear.bias.data[rows]
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    return out


def slice_unit(denoiser: nn.Module, unit: StructureUnit, removed: dict[str, list[int]]) -> None:
    """Delete the removed heads / neurons of every group of ``unit`` (``removed[group.key]``).

    Output-side columns of a layer shared by several groups (Flux ``proj_out``) are cut once, in
    the dense indexing of every group. Input-side rows: the removed heads' Q/K/V rows, the removed
    neurons' up-projection rows. Attribute updates (head counts) are the adapter's.
    """
    cols: dict[str, list[int]] = {}
    for group in unit:
        for name in group.outputs:
            cols.setdefault(name, []).extend(group.columns(removed.get(group.key, [])))
        for name in group.inputs if isinstance(group, HeadGroup) else group.up:
            layer = denoiser.get_submodule(name)
            rows = group.rows(removed.get(group.key, []))
            if rows:
                _replace(denoiser, name, keep_linear(layer, rows=complement(layer.out_features, rows)))
    for name, drop in cols.items():
        if drop:
            layer = denoiser.get_submodule(name)
            _replace(denoiser, name, keep_linear(layer, cols=complement(layer.in_features, drop)))


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
