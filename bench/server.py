"""The server under load, against mlx_lm.server on the same checkpoint, both measured in one run.

    python -m bench.server [--profile cpu|quick]

For 1, 2, 4, 8 concurrent clients (each streaming its own chat completion, greedy, a fixed reply
length): time to first token (p50, p95) and aggregate decode throughput (all clients' tokens over
the round's wall time). Then a returning conversation: the first turn's TTFT on a long prompt and
the second turn's (history + a short question), where a prompt cache pays. The servers run one
after the other as subprocesses on loopback, on the same synthetic 4-bit DeepSeek-shaped model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import converted, machine
from bench.synthetic import results_dir

PROFILES = {
    # (config, layers, experts, vocab), clients, reply tokens, long prompt words
    # tinyseek's 4-bit model (its own tokenizer: ~7 tokens a word): V2-Lite shapes (`full`) take hours here
    "cpu": (("tinyseek", 2, 16, None), (1, 2, 4, 8), 64, 200),
    "full": (("DeepSeek-V2-Lite", 2, 16, 8192), (1, 2, 4, 8), 64, 1500),
    "quick": (("tinyseek", 2, 16, None), (1, 2), 6, 60),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """One server as a subprocess on a free loopback port."""

    def __init__(self, name: str, folder: Path, log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if name == "mlx-deepseek":
            cmd = [sys.executable, "-m", "mlx_deepseek.server", "--model", str(folder), "--port", str(self.port),
                   "--temp", "0", "--max-concurrency", "8"]
        else:
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(self.port),
                   "--temp", "0", "--log-level", "WARNING"]
        self.log = open(log_dir / f"server-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        import httpx2 as httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-1500:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200 and \
                        httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: seconds to the first text, tokens, the text, total seconds."""
    import httpx2 as httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, chunks, usage, text = time.perf_counter(), None, 0, None, ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                d = choice.get("delta") or {}
                piece = (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
                if piece:
                    chunks += 1
                    text += piece
                    first = first or time.perf_counter()
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or chunks
    return {"ttft": (first or end) - start, "tokens": tokens, "seconds": end - start, "text": text}


def words(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = "alpha beta gamma delta latent cache expert router token prefix mixture attention".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_round(url: str, clients: int, max_tokens: int, round_id: int) -> dict:
    results = [None] * clients

    def one(i):
        results[i] = stream_chat(url, [{"role": "user", "content": f"Client {round_id}-{i}: " + words(20, 100 * round_id + i)}],
                                 max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95),
            "aggregate_tps": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall}


def second_turn(url: str, long_words: int, max_tokens: int) -> dict:
    first = [{"role": "user", "content": "Read this: " + words(long_words, 7)}]
    a = stream_chat(url, first, max_tokens)
    second = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": "And then?"}]
    b = stream_chat(url, second, max_tokens)
    return {"first_turn_ttft": a["ttft"], "second_turn_ttft": b["ttft"], "turn_texts": [a["text"], b["text"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    args = p.parse_args(argv)
    (config, layers, experts, vocab), clients, max_tokens, long_words = PROFILES[args.profile]
    folder = converted(config, layers, experts, vocab)
    out = results_dir()
    rows = []
    for name in ("mlx-deepseek", "mlx-lm"):
        with Running(name, folder, out) as server:
            stream_chat(server.url, [{"role": "user", "content": "warm up"}], 2)
            for n in clients:
                rows.append({"server": name, **load_round(server.url, n, max_tokens, n)})
            turns = second_turn(server.url, long_words, max_tokens)
            for row in rows:
                if row["server"] == name:
                    row.update(turns)
    texts = {r["server"]: r["turn_texts"] for r in rows}
    same = len({json.dumps(t) for t in texts.values()}) == 1  # both greedy on the same checkpoint
    result = {"machine": machine(), "profile": args.profile, "model": folder.name, "reply_tokens": max_tokens,
              "same_greedy_text": same, "rows": rows}
    (out / f"server-{args.profile}.json").write_text(json.dumps(result, indent=2))
    print("| server | clients | TTFT p50 s | TTFT p95 s | aggregate tok/s | 1st-turn TTFT s | 2nd-turn TTFT s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {r['aggregate_tps']:.1f} | "
              f"{r['first_turn_ttft']:.3f} | {r['second_turn_ttft']:.3f} |")
    print(f"both servers' greedy replies on the two turns are the same text: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
