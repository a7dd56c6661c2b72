"""The command line: flags, loading the model on a thread (/health says 503 meanwhile), uvicorn."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mlx-deepseek-server",
                                description="OpenAI-compatible server and chat page for DeepSeek models (MLX, latent cache).")
    p.add_argument("--model", required=True, help="local folder or Hugging Face repo")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--served-model-name", help="the model id clients see (default: the folder name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated origins allowed by CORS (e.g. http://localhost:3000); none by default")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument("--max-tokens", type=int, default=2048, help="reply length when a request does not say")
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together; the rest queue")
    p.add_argument("--cache-memory-gb", type=float, default=2.0,
                   help="memory for the latent caches kept between requests (LRU beyond it)")
    p.add_argument("--cache-dir", help="keep those caches on disk too, so a restart keeps warm conversations")
    p.add_argument("--temp", type=float, help="default temperature (default: generation_config.json, else 0.6)")
    p.add_argument("--top-p", type=float, help="default top-p (default: generation_config.json, else 0.95)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="store the latent caches in 8 or 4 bits")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the model's MTP layer (V3, R1, V3.1); one request at a time")
    p.add_argument("--no-warm-history", dest="warm_history", action="store_false",
                   help="do not prefill a finished reply's conversation as the template re-renders it (by default "
                        "it is, so the next turn prefills only its new message)")
    p.add_argument("--expert-memory", type=float, metavar="GB",
                   help="routed experts stay on disk, GB of them cached in memory (models bigger than memory)")
    p.add_argument("--keepalive-s", type=float, default=5.0, help="SSE keep-alive comment interval while waiting")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    args.allowed_origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    args.served_model_name = args.served_model_name or Path(args.model.rstrip("/")).name
    return args


def load_into(server, args) -> None:
    try:
        from ..generate import sampling_defaults
        from ..loading import load, resolve_model_path
        from .prompt_cache import PromptStore
        from .scheduler import Scheduler, prompt_cache_factory

        folder = resolve_model_path(args.model)
        model, tokenizer = load(folder, mtp=args.mtp, expert_memory_gb=args.expert_memory)
        server.expert_stats = model.expert_stream.stats if hasattr(model, "expert_stream") else None
        server.model_type = model.model_type
        defaults = sampling_defaults(folder)
        server.sampling = {"temp": args.temp if args.temp is not None else defaults["temp"],
                           "top_p": args.top_p if args.top_p is not None else defaults["top_p"]}
        server.tokenizer, server.context, server.vocab = tokenizer, model.args.max_position_embeddings, model.args.vocab_size
        store = PromptStore(args.cache_memory_gb * 1e9, args.cache_dir,
                            prompt_cache_factory(model, args.kv_bits, args.kv_group_size))
        store.load_directory()
        scheduler = Scheduler(model, tokenizer, store, args.max_concurrency, args.prefill_step_size,
                              args.kv_bits, args.kv_group_size, mtp=args.mtp)
        scheduler.start()
        server.scheduler = scheduler
    except Exception as e:  # /health reports it; the routes answer 503
        server.load_error = f"could not load {args.model}: {e}"
        print(f"error: {server.load_error}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .app import Server, build_app

    server = Server(args)
    threading.Thread(target=load_into, args=(server, args), daemon=True).start()
    print(f"mlx-deepseek server: http://{args.host}:{args.port}/ (API at /v1), loading {args.model}", flush=True)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=3)
    return 0
