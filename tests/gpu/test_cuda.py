"""GPU checks (marked ``gpu``; skipped without CUDA): the solver and a tiny run on the accelerator."""

import pytest
import torch

from obsdiff.solvers import Pattern, obs_solve

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pattern", [Pattern("unstructured", ratio=0.5), Pattern("nm", n=2, m=4)])
def test_solver_on_cuda_matches_cpu(pattern):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g)
    X = torch.randn(1024, 256, generator=g)
    H = 2 * X.T @ X
    cpu = obs_solve(W, H, pattern)
    gpu = obs_solve(W.cuda().half(), H.cuda(), pattern)
    assert gpu.weight.dtype == torch.float16 and gpu.weight.is_cuda
    agree = (cpu.mask == gpu.mask.cpu()).float().mean()
    assert agree > 0.99
    torch.testing.assert_close(gpu.weight.float().cpu(), cpu.weight, rtol=5e-2, atol=5e-2)


def test_tiny_run_on_cuda(compose_cfg, run_dir):
    from obsdiff.run import run

    metrics = run(compose_cfg("+experiment=debug", "model.device=cuda", "eval=none"), run_dir)
    assert abs(metrics["prune/sparsity_achieved"] - 0.5) < 0.005
