"""SparseSwaps (Zimmer et al., 2025, "SparseSwaps: Tractable LLM Pruning Mask Refinement at Scale").

Refines any pruning mask by optimal 1-swaps; the weights are not updated. The mask-only error of a
layer decouples over output rows once every row's number of removed weights is fixed:

    E(M) = tr(ΔW H ΔWᵀ) = Σ_q δ_q H δ_qᵀ,      δ_q = W_q ⊙ M_q   (M = True where removed)

A 1-swap in row ``q`` grows back a removed weight ``i`` and prunes a kept weight ``j``:
``δ' = δ − w_i e_i + w_j e_j``. With the correlation vector ``c = δ H`` (the Gram matrix ``H``)

    E'_q − E_q = (−2 w_i c_i + w_i² H_ii) + (2 w_j c_j + w_j² H_jj) − 2 w_i w_j H_ij      (1)

Every iteration takes, in every row still improving, the pair that minimises (1) over all removed
``i`` and kept ``j`` (cross term ``H_ij`` included; N:M: ``i`` and ``j`` in the same aligned group
of ``m`` columns, so every group keeps its count) and applies it iff (1) < 0. A row whose best
swap does not help is 1-swap optimal and never changes again; the loop ends when no row improves
or after ``max_iterations`` (each row makes at most one swap per iteration). Per-row (N:M:
per-group) counts of the start mask are kept exactly; a layer-wide start mask (magnitude) keeps
its unequal row counts (the paper enforces equal ones: Wanda's per-row masks are).

Precision: the pair is chosen in fp32; its change (1) is recomputed in fp64 from scratch
(``c_i, c_j`` as dot products) and only a negative one is applied, so the exact error never rises
by rounding. ``c`` is recomputed from the mask every iteration (no drift).

Memory: per chunk of rows, one fp32 tensor of ``chunk × R × cols`` candidate changes: for each of
the (at most ``R`` per group) removed weights ``i``, (1) against every column of its group, kept
columns ``j`` valid, removed ones ``+inf`` (unstructured: one group, ``R ≈ cols / 2`` at 50%, so
``cols² / 2`` per row; N:M: ``n × cols`` per row). A chunk holds at most ``chunk_elements`` of them
(``4 · chunk_elements`` bytes, plus a few ``chunk × cols`` vectors); a row larger than that is
split along ``R``. Time per iteration: ``O(active rows × cols²)`` (the ``δ H`` product and, for
unstructured masks, the candidates). ``max_iterations`` is the paper's one knob; the paper's own
value was not available to us: 100 is ours (a 512 × 512 synthetic layer converges within it).
"""

from __future__ import annotations

import torch

from obsdiff.solvers.obs import Pattern

DEFAULT_MAX_ITERATIONS = 100
DEFAULT_CHUNK_ELEMENTS = 2**26  # 256 MiB of fp32 candidates per chunk


def refine_swaps(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    pattern: Pattern,
    *,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    layer: str = "",
) -> torch.Tensor:
    """Refine a mask by optimal 1-swaps per row: the mask-only error ``tr(ΔW H ΔWᵀ)`` never rises.

    Args:
        W: (rows, cols) weight; not modified.
        H: (cols, cols) Hessian / Gram matrix of the layer's inputs (undamped; a common scale
            changes nothing).
        mask: (rows, cols) start mask, ``True`` = removed (any method's); not modified.
        pattern: unstructured (row counts kept) or N:M (swaps inside aligned groups of ``m``).
        max_iterations: most swaps per row (0 returns the start mask).
        chunk_elements: most fp32 candidate changes held at once (see the module docstring).
        layer: name for messages.

    Returns:
        The refined (rows, cols) bool mask, on ``W``'s device.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{layer}: H has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    if mask.shape != W.shape:
        raise ValueError(f"{layer}: mask shape {tuple(mask.shape)} != weight shape {tuple(W.shape)}")
    if max_iterations < 0 or chunk_elements < 1:
        raise ValueError(f"{layer}: max_iterations must be >= 0 and chunk_elements >= 1")
    size = pattern.m if pattern.kind == "nm" else cols  # columns per swap group
    if size < 1 or cols % size:
        raise ValueError(f"{layer}: N:M needs cols ({cols}) divisible by M={pattern.m}")
    Wf = W.detach().float()
    H = H.detach().float().to(Wf.device)
    removed = mask.detach().to(Wf.device, torch.bool).clone()
    groups = cols // size
    blocks = H.reshape(cols, groups, size)[torch.arange(cols), torch.arange(cols) // size]  # (cols, size)
    most_removed = int(removed.reshape(rows, groups, size).sum(-1).max()) if rows else 0  # kept by swaps
    step = max(1, chunk_elements // max(1, most_removed * cols))  # rows per chunk
    active = torch.arange(rows, device=Wf.device)
    for _ in range(max_iterations):
        if active.numel() == 0 or most_removed == 0:
            break
        improved = []
        for r0 in range(0, active.numel(), step):
            chunk = active[r0 : r0 + step]
            i, j, ok = _best_swaps(Wf[chunk], removed[chunk], H, blocks, most_removed, chunk_elements)
            chunk, i, j = chunk[ok], i[ok], j[ok]
            removed[chunk, i], removed[chunk, j] = False, True
            improved.append(chunk)
        active = torch.cat(improved)
    return removed


def _best_swaps(
    w: torch.Tensor,
    removed: torch.Tensor,
    H: torch.Tensor,
    blocks: torch.Tensor,
    most_removed: int,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best 1-swap of each row of ``w`` (r, cols): ``(grow i, prune j, change (1) < 0)``.

    ``blocks`` (cols, size): row ``k`` of ``H`` restricted to the columns of ``k``'s swap group.
    """
    r, cols = w.shape
    size = blocks.shape[1]
    groups = cols // size
    d = w * removed  # δ, (r, cols)
    c = d @ H  # correlation vector c = δ H, (r, cols)
    own = w * w * torch.diagonal(H)  # w_k² H_kk
    inf = torch.tensor(torch.inf, device=w.device)
    grow = torch.where(removed, own - 2 * w * c, inf)  # first bracket of (1); only removed i
    prune = torch.where(removed, inf, own + 2 * w * c).reshape(r, groups, 1, size)  # second; kept j
    # The removed columns of each group first (R: the first `most_removed`; a row with fewer
    # removed pads R with kept columns, whose grow = inf).
    order = torch.sort(removed.reshape(r, groups, size).to(torch.uint8), dim=-1, descending=True, stable=True)
    offset = (torch.arange(groups, device=w.device) * size).reshape(1, groups, 1)
    R = order.indices[..., :most_removed] + offset  # (r, groups, R) column ids
    gR = grow.gather(1, R.reshape(r, -1)).reshape(r, groups, -1, 1)
    wR = -2 * w.gather(1, R.reshape(r, -1)).reshape(r, groups, -1, 1)
    wg = w.reshape(r, groups, 1, size)
    best = torch.full((r,), torch.inf, device=w.device)
    i = torch.zeros(r, dtype=torch.long, device=w.device)
    j = torch.zeros_like(i)
    rows = torch.arange(r, device=w.device)
    tile = max(1, chunk_elements // max(1, r * cols))  # R-slices that fit the budget
    for s in range(0, most_removed, tile):
        Rs = R[:, :, s : s + tile]
        change = blocks.index_select(0, Rs.flatten()).reshape(*Rs.shape, size)  # H_ij in the group
        change.mul_(wR[:, :, s : s + tile]).mul_(wg)  # cross term −2 w_i w_j H_ij of (1)
        change.add_(gR[:, :, s : s + tile]).add_(prune)  # (1) for every pair (inf: not allowed)
        value, flat = change.reshape(r, -1).min(dim=1)
        g, rest = flat // (Rs.shape[2] * size), flat % (Rs.shape[2] * size)
        better = value < best
        best = torch.where(better, value, best)
        i = torch.where(better, Rs[rows, g, rest // size], i)
        j = torch.where(better, g * size + rest % size, j)
    return i, j, torch.isfinite(best) & (_exact_change(d, w, H, i, j) < 0)


def _exact_change(d: torch.Tensor, w: torch.Tensor, H: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
    """(1) in fp64 for one pair per row, ``c_i = δ · H_i`` and ``c_j = δ · H_j`` from scratch."""
    rows = torch.arange(w.shape[0], device=w.device)
    d, wi, wj = d.double(), w[rows, i].double(), w[rows, j].double()
    Hi, Hj = H[i].double(), H[j].double()  # rows i and j of the symmetric H, (r, cols)
    ci, cj = (d * Hi).sum(1), (d * Hj).sum(1)
    return (
        -2 * wi * ci + wi**2 * Hi[rows, i]
        + 2 * wj * cj + wj**2 * Hj[rows, j]
        - 2 * wi * wj * Hi[rows, j]
    )  # fmt: skip
