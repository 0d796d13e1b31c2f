"""L1-norm structured baseline: remove the FFN neurons / attention heads of smallest L1 norm.

No compensation (Li et al. 2017, "Pruning Filters for Efficient ConvNets": rank structures by
``Σ |W|``). Only the selection lives here; slicing the modules is the structured pruner's job.
"""

from __future__ import annotations

import torch


def l1_ffn_columns(
    W_down: torch.Tensor, num_remove: int, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """Input columns of the FFN down-projection with the smallest L1 norm ``Σ_r |W[r, q]|``.

    Args:
        W_down: (rows, hidden) down-projection weight; column ``q`` is FFN neuron ``q``.
        num_remove: how many neurons to remove, ``0 <= num_remove <= hidden``.
        cols: ``(start, stop)`` of the neuron columns (Flux ``proj_out``: the MLP part); ``None`` = all.

    Returns:
        (num_remove,) LongTensor of absolute column indices in ascending order; ties in norm go
        to the lower index.
    """
    start, stop = (0, W_down.shape[1]) if cols is None else cols
    hidden = stop - start
    if not 0 <= num_remove <= hidden:
        raise ValueError(f"num_remove must be in [0, {hidden}], got {num_remove}")
    norms = W_down[:, start:stop].detach().float().abs().sum(dim=0)  # (hidden,)
    order = torch.argsort(norms, stable=True)
    return torch.sort(order[:num_remove])[0] + start


def l1_heads(
    Ws: list[torch.Tensor], head_dim: int, num_remove: int, cols: tuple[int, int] | None = None
) -> list[int]:
    """Heads with the smallest L1 norm of their input columns, summed over the output projections.

    Args:
        Ws: output projections, each (rows_k, heads · head_dim) (e.g. ``to_out.0`` and
            ``to_add_out``); head ``h`` owns columns ``[h · head_dim, (h + 1) · head_dim)``.
        head_dim: columns per head.
        num_remove: how many heads to remove, ``0 <= num_remove <= heads``.
        cols: ``(start, stop)`` of the head columns (Flux ``proj_out``: the attention part);
            ``None`` = all; head ``h`` then owns ``start + [h · head_dim, (h + 1) · head_dim)``.

    Returns:
        Head indices in ascending order of norm; ties go to the lower index.
    """
    if not Ws:
        raise ValueError("l1_heads needs at least one output projection")
    width = Ws[0].shape[1]
    start, stop = (0, width) if cols is None else cols
    if head_dim <= 0 or (stop - start) % head_dim or any(W.shape[1] != width for W in Ws):
        raise ValueError(
            f"every projection needs the same width, with a head range divisible by head_dim={head_dim}, "
            f"got widths {[W.shape[1] for W in Ws]}, range {cols}"
        )
    heads = (stop - start) // head_dim
    if not 0 <= num_remove <= heads:
        raise ValueError(f"num_remove must be in [0, {heads}], got {num_remove}")
    norms = torch.zeros(heads, dtype=torch.float64)
    for W in Ws:
        per_col = W[:, start:stop].detach().double().abs().sum(dim=0).cpu()  # (heads · head_dim,)
        norms += per_col.reshape(heads, head_dim).sum(dim=1)
    return torch.argsort(norms, stable=True)[:num_remove].tolist()
