"""bench/server.py runs end to end at toy size against mlx_lm.server (no speed is asserted)."""

import json

from bench import server


def test_server_benchmark_runs_against_mlx_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DEEPSEEK_BENCH_RESULTS", str(tmp_path))
    assert server.main(["--profile", "quick"]) == 0
    rows = json.loads((tmp_path / "server-quick.json").read_text())["rows"]
    assert [(r["server"], r["clients"]) for r in rows] == [("mlx-deepseek", 1), ("mlx-deepseek", 2), ("mlx-lm", 1), ("mlx-lm", 2)]
    assert all(r["tokens"] == 6 * r["clients"] and r["ttft_p50"] > 0 and r["second_turn_ttft"] > 0 for r in rows)
