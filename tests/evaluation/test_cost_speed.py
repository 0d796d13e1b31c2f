"""Cost (params, FLOPs on meta) and speed harness, and the obsdiff-bench CLI, on the tiny SD3 (CPU)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from obsdiff import bench
from obsdiff.artifacts import save_pruned
from obsdiff.evaluation.cost import count_params, denoiser_cost, structured_architecture
from obsdiff.evaluation.speed import CPU_WARNING, denoiser_latency, device_name, verdict
from obsdiff.models import get_adapter
from obsdiff.models.tiny_sd3 import load_tiny_config

HALF_BLOCK_1 = {"1": {"attn": 2, "ff": 128, "ff_context": 128}}  # tiny: 4 heads x 16, FFN 256
RECORD_KEYS = {
    "dense_ms", "pruned_ms", "speedup", "dense_tflops", "pruned_tflops", "flop_reduction", "dense_params",
    "pruned_params", "device_name", "versions", "settings", "verdict", "resolution", "dtype",
}  # fmt: skip


@pytest.fixture
def one_thread():
    """Timings on a shared 2-core CPU: one thread avoids OpenMP contention; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


def test_flops_and_params_drop_by_the_analytic_amount():
    adapter, config = get_adapter("sd3"), load_tiny_config()["transformer"]
    B, N, T, D, d_h = 2, (16 // 2) ** 2, 77, 64, 16  # batch, image tokens (latent 16, patch 2), text, width
    calls = adapter.denoiser_calls(7.0, config)  # CFG: one call on the doubled batch
    assert calls == [B]
    dense = denoiser_cost(adapter, config, {}, calls, 16, T)
    pruned = denoiser_cost(adapter, config, HALF_BLOCK_1, calls, 16, T)
    # Linear FLOPs = 2 * B * tokens * in * out: block 1 loses 32 of 64 Q/K/V rows and output columns
    # (image and context streams) and 128 of 256 FFN neurons (up + down, both streams).
    linear = sum(2 * B * tokens * (3 * D * 32 + 32 * D + 2 * D * 128) for tokens in (N, T))
    attention = 4 * B * 2 * (N + T) ** 2 * d_h  # QK^T and AV over the joint sequence, 2 heads fewer
    assert round((dense["tflops"] - pruned["tflops"]) * 1e12) == linear + attention
    params = 2 * (3 * (D * 32 + 32) + 32 * D + (D * 128 + 128) + 128 * D)  # biases of outputs stay
    assert dense["params"] - pruned["params"] == params
    real = adapter.empty_denoiser(config, device="cpu")
    assert count_params(real) == dense["params"]


def test_structured_architecture_skips_heads_of_context_pre_only_blocks():
    adapter, config = get_adapter("sd3"), load_tiny_config()["transformer"]
    arch = structured_architecture(adapter, config, 0.3, [1, 3])
    # round(4 * 0.3) = 1 head, round(256 * 0.3) = 77 neurons; block 3 (last) has no context FFN/heads
    assert arch == {"1": {"attn": 3, "ff": 179, "ff_context": 179}, "3": {"ff": 179}}
    assert bench.parse_block_list("1:-1", 4) == [1, 2] == bench.parse_block_list("1,2", 4)


def test_denoiser_latency_returns_sorted_positive_stats(one_thread):
    torch.set_num_threads(1)
    stats = denoiser_latency(nn.Linear(64, 64), {"input": torch.randn(8, 64)}, warmup=1, iters=5)
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["iters"] == 5 and stats["device"] == "cpu"
    assert "cores" in device_name("cpu")


def test_verdict_says_cpu_and_no_speedup():
    assert verdict(1.04, 1.4, torch.device("cpu")).startswith(CPU_WARNING)
    assert "no speedup" in verdict(1.04, 1.4, torch.device("cuda"))
    assert "no speedup" not in verdict(1.3, 1.4, torch.device("cuda"))


@pytest.mark.slow
def test_cli_random_tiny_writes_a_cpu_record(tmp_path):
    out = tmp_path / "speed.jsonl"
    args = ["--random", "tiny", "--structured-ratio", "0.5", "--blocks", "1:3", "--iters", "2"]
    args += ["--warmup", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "obsdiff.bench", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert CPU_WARNING.upper() in proc.stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert RECORD_KEYS <= set(row) and row["device"] == "cpu"
    assert row["verdict"].startswith(CPU_WARNING)
    assert row["architecture"] == {str(b): {"attn": 2, "ff": 128, "ff_context": 128} for b in (1, 2)}
    assert row["pruned_tflops"] < row["dense_tflops"] and row["pruned_params"] < row["dense_params"]
    assert row["dense_ms"] > 0 and row["pruned_ms"] > 0


def test_artifact_mode_times_pruned_and_dense_pipelines(tiny_pipe, compose_cfg, tmp_path, one_thread):
    adapter, pipe = tiny_pipe
    adapter.reshape(pipe.transformer, HALF_BLOCK_1)  # structured shape; weights don't matter here
    cfg = compose_cfg("model=tiny_sd3", "logger=none", "sparsity=structured", "sparsity.ratio=0.5")
    structure = {"architecture": adapter.architecture(pipe.transformer)}
    save_pruned(tmp_path / "pruned", pipe.transformer, cfg, extra={"structure": structure})
    out = tmp_path / "speed.jsonl"
    args = ["--artifact", str(tmp_path / "pruned"), "--iters", "2", "--warmup", "1", "--steps", "2"]
    rows = bench.run_bench([*args, "--pipeline-iters", "1", "--threads", "1", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row == json.loads(json.dumps(rows[0], default=str))
    assert RECORD_KEYS <= set(row) and row["mode"] == "artifact"
    assert row["resolution"] == 32 and row["text_tokens"] == 77 + 1  # CLIP + one zero "T5" token
    assert row["architecture"] == HALF_BLOCK_1
    assert row["pruned_params"] == count_params(pipe.transformer) < row["dense_params"]
    assert row["pipeline_dense_ms"] > 0 and row["pipeline_pruned_ms"] > 0
    assert row["verdict"].startswith(CPU_WARNING)
