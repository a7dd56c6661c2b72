"""A local OpenAI-compatible server and web chat page on the latent cache.

    python -m mlx_deepseek.server --model PATH_OR_REPO [--host 127.0.0.1] [--port 8080]

`app.py` is HTTP only (routes, SSE, auth, CORS, limits), `scheduler.py` the one generation thread
(queue, continuous batching, cancellation), `prompt_cache.py` the caches kept between requests,
`parsers.py` reasoning and tool calls, `page/index.html` the chat page.
"""

from .cli import main  # noqa: F401
