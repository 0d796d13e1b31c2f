"""``calibration.compile``: the denoiser called through ``torch.compile`` while Hessians accumulate.

The Hessian pre-hooks are ``torch.compiler.disable``-d (``capture.py``): each hooked layer is a
graph break, and the hook runs eagerly on the layer's real input, so the Hessians are the eager
ones up to the round-off of the compiled kernels that produced that input.

By default dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``) and compiles a
block's ``forward`` once for every block of its class: code compiled for a block without hooks
then runs a hooked block and skips its hooks (measured: zero Hessians). Here hooks are guarded, so
each distinct hook set recompiles (one variant per hooked block, within ``RECOMPILE_LIMIT``), and
every package starts from ``torch._dynamo.reset()``. The evaluation runs eagerly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

RECOMPILE_LIMIT = 256  # variants of one code object (a block class's forward); past it: eager


@contextmanager
def compiled(denoiser: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, calls of ``denoiser`` go through ``torch.compile`` (``enabled``), as
    ``nn.Module.compile`` sets them up; eager calls again after it."""
    if not enabled:
        yield
        return
    config = torch._dynamo.config
    saved = config.skip_nnmodule_hook_guards, config.recompile_limit
    config.skip_nnmodule_hook_guards, config.recompile_limit = False, max(saved[1], RECOMPILE_LIMIT)
    torch._dynamo.reset()  # no graph of another package's hooks
    denoiser.compile()
    try:
        yield
    finally:
        denoiser._compiled_call_impl = None  # what nn.Module.compile set: back to eager calls
        torch._dynamo.reset()
        config.skip_nnmodule_hook_guards, config.recompile_limit = saved
