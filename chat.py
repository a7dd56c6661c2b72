"""Chat with a DeepSeek model in the terminal, on the latent cache.

    python chat.py [--model PATH_OR_REPO] [--prompt TEXT] [--hide-thinking] ...

Each turn prefills only what changed since the cache was filled (prompt-prefix reuse), R1-style
reasoning is shown dimmed under a header (or hidden), and a one-line summary follows each reply.
`--expert-memory GB` runs a model bigger than memory: its routed experts stay on the SSD, GB of them
cached (exact; the summary adds the expert hit rate and GB read per token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_deepseek.chat_template import THINK_END, THINK_START
from mlx_deepseek.generate import sampling_defaults

DEFAULT_MODEL = "mlx-community/DeepSeek-V2-Lite-Chat-4bit-mlx"
DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over
  /save FILE      save the conversation and its cache
  /load FILE      load a saved conversation and cache
  /stats          statistics of the last reply
  /help           this text
  /exit           quit (or Ctrl-D); Ctrl-C stops a reply"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a DeepSeek model (MLX, latent KV cache).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or Hugging Face repo (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", help="answer this once and exit (text piped on stdin works too)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens per reply")
    p.add_argument("--temp", type=float, help="sampling temperature (default: generation_config.json, else 0.6)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: generation_config.json, else 0.95)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--hide-thinking", action="store_true", help="do not show <think> reasoning")
    p.add_argument("--no-thinking", action="store_true", help="DeepSeek-V4: answer without reasoning (its chat mode)")
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--kv-bits", type=int, choices=(4, 8),
                   help="store the latent cache in 8 or 4 bits (1.7x / 2.8x smaller in bf16)")
    p.add_argument("--kv-group-size", type=int, default=64, help="quantization group of the latent cache")
    p.add_argument("--quantize", type=int, metavar="BITS",
                   help="quantize a float or block-FP8 checkpoint as it loads (e.g. 4), as the converter would")
    p.add_argument("--expert-memory", type=float, metavar="GB",
                   help="models bigger than memory: keep the routed experts in the folder and cache GB of them in "
                        "memory, read on demand (exact; see README 'Models bigger than memory')")
    p.add_argument("--layers-split", help="under mlx.launch: layers per rank, e.g. 30,31 (default: by bytes)")
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the model's own multi-token-prediction layer (V3, R1, V3.1)")
    return p.parse_args(argv)


class ThinkingRenderer:
    """Writes streamed reply text; reasoning between <think> and </think> dimmed under a header, or hidden."""

    def __init__(self, out, hide: bool, thinking: bool = False):
        self.out, self.hide, self.thinking, self.held = out, hide, False, ""
        if thinking:
            self._enter()

    def _enter(self):
        self.thinking = True
        if not self.hide:
            self.out.write(f"{DIM}{BOLD}Thinking…{RESET}{DIM}\n")

    def _leave(self):
        self.thinking = False
        if not self.hide:
            self.out.write(f"{RESET}\n{BOLD}Answer:{RESET}\n")

    def write(self, text: str) -> None:
        text = self.held + text
        self.held = ""
        while text:
            tag = THINK_END if self.thinking else THINK_START
            at = text.find(tag)
            if at >= 0:
                self._emit(text[:at])
                self._leave() if self.thinking else self._enter()
                text = text[at + len(tag) :].lstrip("\n") if not self.thinking else text[at + len(tag) :]
                continue
            keep = next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)
            self._emit(text[: len(text) - keep])
            self.held = text[len(text) - keep :]
            break
        self.out.flush()

    def _emit(self, text: str) -> None:
        if text and not (self.thinking and self.hide):
            self.out.write(text)

    def close(self) -> None:
        self._emit(self.held)
        self.held = ""
        if self.thinking and not self.hide:
            self.out.write(RESET)
        self.out.write("\n")
        self.out.flush()


class Chat:
    def __init__(self, model, tokenizer, args, sampling: dict, out=None):
        from mlx_deepseek.generate import PromptCache

        self.model, self.tokenizer, self.args, self.out = model, tokenizer, args, out or sys.stdout
        self.sampling = sampling
        self.system = args.system
        self.messages: list[dict] = []
        self.cache = PromptCache(model, getattr(args, "kv_bits", None), getattr(args, "kv_group_size", 64))
        self.last = None
        self.limit = model.args.max_position_embeddings

    def prompt_tokens(self) -> tuple[list[int], bool]:
        """The conversation rendered by the model's own template; and whether it opens a <think>."""
        from mlx_deepseek.chat_template import render

        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        thinking = {"thinking": False} if getattr(self.args, "no_thinking", False) else {}
        return render(self.tokenizer, messages, model_type=getattr(self.model, "model_type", None), **thinking)

    def turn(self, user_text: str) -> None:
        from mlx_deepseek.generate import stream_generate

        self.messages.append({"role": "user", "content": user_text})
        experts = getattr(self.model, "expert_stream", None)
        if experts is not None:  # the summary shows this reply's expert reads
            experts.stats.reset()
        tokens, thinking = self.prompt_tokens()
        if len(tokens) + self.args.max_tokens > self.limit:
            self.messages.pop()
            self.out.write(f"The conversation is full ({len(tokens)} of {self.limit} tokens with room for "
                           f"{self.args.max_tokens} more): type /reset to start over.\n")
            return
        renderer = ThinkingRenderer(self.out, self.args.hide_thinking, thinking)
        reply = []
        try:
            for r in stream_generate(
                self.model, self.tokenizer, tokens, self.args.max_tokens, prompt_cache=self.cache,
                min_p=self.args.min_p, top_k=self.args.top_k, repetition_penalty=self.args.repetition_penalty,
                seed=self.args.seed, prefill_step_size=self.args.prefill_step_size, mtp=self.args.mtp,
                **self.sampling,
            ):
                reply.append(r.text)
                renderer.write(r.text)
                self.last = r.stats
        except KeyboardInterrupt:
            renderer.write(" [stopped]")
        renderer.close()
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        if self.last:
            self.out.write(f"{DIM}{summary(self.last, experts and experts.stats)}{RESET}\n")

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/exit":
            return False
        if name == "/reset":
            self.messages = []
            self.out.write("New conversation.\n")
        elif name == "/system":
            self.system, self.messages = rest or None, []
            self.out.write("System prompt set; new conversation.\n")
        elif name == "/save" and rest:
            try:
                self.cache.save(rest, extra={"messages": self.messages, "system": self.system})
            except (OSError, TypeError, ValueError) as e:
                self.out.write(f"Could not save (any earlier {rest} is unchanged): {e}\n")
                return True
            self.out.write(f"Saved {len(self.messages)} messages and {len(self.cache.tokens)} cached tokens to {rest}.\n")
        elif name == "/load" and rest:
            from mlx_deepseek.generate import CacheFileError

            try:
                extra = self.cache.load(rest)
            except (CacheFileError, OSError) as e:
                self.out.write(f"Could not load (the conversation is unchanged): {e}\n")
                return True
            self.messages, self.system = extra.get("messages", []), extra.get("system")
            self.out.write(f"Loaded {len(self.messages)} messages and {len(self.cache.tokens)} cached tokens.\n")
        elif name == "/stats":
            experts = getattr(self.model, "expert_stream", None)
            self.out.write((summary(self.last, experts and experts.stats) if self.last else "No reply yet.") + "\n")
        else:
            self.out.write(HELP + "\n")
        return True


def summary(s, experts=None) -> str:
    """The line after each reply; `experts`: the streamed experts' stats of the turn (--expert-memory)."""
    mtp = (f" | MTP acceptance {s.acceptance:.0%}, {s.generation_tokens / s.main_steps:.2f} tokens per step"
           if s.main_steps else "")
    streamed = f" | {experts.summary()}" if experts is not None else ""
    return (f"[prompt {s.prompt_tokens} tokens ({s.reused_tokens} reused), {s.prompt_tps:.1f} tok/s | "
            f"reply {s.generation_tokens} tokens, {s.generation_tps:.1f} tok/s{mtp} | "
            f"latent cache {s.cache_mb:.1f} MB | peak {s.peak_memory_gb:.2f} GB{streamed}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD instead of a crash
        sys.stdin.reconfigure(errors="replace")
    if args.mtp and args.repetition_penalty:
        print("error: --mtp samples exactly from the model's distribution; it cannot apply "
              "--repetition-penalty", file=sys.stderr)
        return 2
    from mlx_deepseek import CheckpointError, ConfigError, load
    from mlx_deepseek.loading import resolve_model_path

    import mlx.core as mx

    distributed = mx.distributed.is_available() and mx.distributed.init().size() > 1
    try:
        folder = resolve_model_path(args.model)
        if distributed:  # started by mlx.launch: this rank holds a slice of the layers
            from mlx_deepseek.pipeline import pipeline

            split = [int(n) for n in args.layers_split.split(",")] if args.layers_split else None
            model, tokenizer = pipeline(folder, layers_split=split, mtp=args.mtp, expert_memory_gb=args.expert_memory)
            if tokenizer is None:
                model.serve()
                return 0
        else:
            model, tokenizer = load(folder, mtp=args.mtp, quantize=args.quantize, expert_memory_gb=args.expert_memory)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return run(args, folder, model, tokenizer)
    finally:
        if distributed:
            model.stop()


def run(args, folder: Path, model, tokenizer) -> int:
    from mlx_deepseek import CheckpointError

    try:
        defaults = sampling_defaults(folder)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sampling = {"temp": args.temp if args.temp is not None else defaults["temp"],
                "top_p": args.top_p if args.top_p is not None else defaults["top_p"]}
    chat = Chat(model, tokenizer, args, sampling)

    if args.prompt is not None or not sys.stdin.isatty():
        text = args.prompt if args.prompt is not None else sys.stdin.read()
        chat.turn(text.strip())
        return 0
    print(f"Chatting with {args.model}. /help for commands, Ctrl-C stops a reply, Ctrl-D exits.")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        chat.turn(line)


if __name__ == "__main__":
    sys.exit(main())
