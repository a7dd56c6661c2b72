"""Each benchmark script runs end to end at toy size, so none of them rots (no speed is asserted)."""

import json

import pytest

from bench import convert_memory, fp8_load, latent_cache, mixed_experts, mtp, plots, quantization, runtime, v4, v32


@pytest.fixture(autouse=True)
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DEEPSEEK_BENCH_RESULTS", str(tmp_path))
    return tmp_path


def test_runtime_benchmark_runs_and_both_runners_agree(results):
    assert runtime.main(["--profile", "quick"]) == 0
    rows = json.loads((results / "runtime-quick.json").read_text())["rows"]
    assert rows and all(r["same_tokens"] for r in rows)
    assert all(r["mlx-deepseek"]["cache_bytes_per_token"] == r["mlx-lm"]["cache_bytes_per_token"] == 768 for r in rows)


def test_mtp_benchmark_runs(results):
    assert mtp.main(["--profile", "quick"]) == 0
    result = json.loads((results / "mtp-quick.json").read_text())
    assert 0.5 < result["acceptance"] < 1 and result["overlap"]["distinct_experts_per_k"]["2"] > 1


def test_conversion_benchmark_runs(results):
    assert convert_memory.main(["--config", "tinyseek", "--layers", "1", "2"]) == 0
    rows = json.loads((results / "convert_memory.json").read_text())["rows"]
    assert {r["tool"] for r in rows} == {"mlx-deepseek", "mlx-lm"} and all(r["peak_rss_gb"] > 0 for r in rows)
    assert plots.main() == 0


def test_quantization_benchmark_runs(results):
    assert quantization.main(["--profile", "quick", "--recipes", "4;3+usage"]) == 0
    rows = json.loads((results / "quantization-quick/quantization.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["4", "3+usage"] and all(r["kl_mean"] > 0 for r in rows)
    assert (results / "quantization-quick/3+usage/expert_usage.json").exists()


def test_latent_cache_benchmark_runs(results):
    assert latent_cache.main(["--window", "32", "--windows", "2"]) == 0
    rows = json.loads((results / "latent_cache.json").read_text())["rows"]
    assert [r["v3_bytes_per_token_layer"] for r in rows] == [672, 612, 416, 324]
    assert all(r["kl_mean"] > 0 for r in rows)


def test_mixed_experts_benchmark_runs(results):
    assert mixed_experts.main(["--small", "--reps", "2"]) == 0
    rows = json.loads((results / "mixed_experts.json").read_text())["rows"]
    assert [r["bits_per_expert_weight"] for r in rows] == [3.0, 3.0, 3.0] and all(r["decode_ms"] > 0 for r in rows)


def test_fp8_load_benchmark_runs(results):
    assert fp8_load.main(["--config", "tinyseek", "--layers", "2", "--experts", "4", "--vocab", "512"]) == 0
    rows = json.loads((results / "fp8_load.json").read_text())
    assert [r["case"] for r in rows] == ["load(fp8), bfloat16", "load(fp8, quantize=4)"]
    assert all(r["peak_rss_gb"] > 0 for r in rows)


def test_v4_benchmark_runs(results):
    assert v4.main(["--profile", "toy"]) == 0
    result = json.loads((results / "v4-toy.json").read_text())
    assert set(result["decode"]) == {"0", "256"} and result["pieces_ms"]
    flash = {r["context"]: r for r in result["roofline"]}
    assert 13.0 < flash[0]["active_params_b"] < 13.6  # Flash: 13B active per token
    assert result["cache"][-1]["values_per_token"] == 3440


def test_v32_benchmark_runs_and_both_runners_agree(results):
    """bench.v32 at toy size: greedy tokens below the boundary, and logits past it on identical caches."""
    assert v32.main(["--profile", "toy"]) == 0
    result = json.loads((results / "v32-toy.json").read_text())
    assert result["greedy"]["same"]
    rows = result["decode"] + result["chunks"]
    assert all(r["mlx-lm"]["max_rel_diff"] < 1e-4 for r in rows) and rows[-1]["context"] > result["index_topk"]
