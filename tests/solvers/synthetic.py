"""Hand-made layer data shared by the solver tests (imported as a plain module by pytest)."""

import torch


def correlated(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A weight ``W``, correlated inputs ``X`` (tokens, cols) and their Hessian ``H = 2 XᵀX``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix  # correlated inputs, (tokens, cols)
    return W, 2 * X.T @ X, X
