"""`kvjax serve`: the OpenAI-compatible HTTP server (`kvjax.serve.server`) on uvicorn."""

from __future__ import annotations

import typer

from .common import load_model
from .run import MODEL_HELP


def serve(
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    policy: str = typer.Option("dense", help="KV-cache policy of every request, e.g. 'snapkv:budget=0.2+kivi:bits=2'"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    rows: int = typer.Option(8, help="most requests decoding at once (rows of the live KV state)"),
    token_budget: int = typer.Option(512, "--token-budget", help="tokens per engine step: decodes + prompt chunks"),
    max_kv_bytes: int | None = typer.Option(None, "--max-kv-bytes", help="admit requests while the KV state fits"),
    schedule: str = typer.Option("stall-free", help="'stall-free' (Sarathi-Serve) or 'prefill-first'"),
    served_name: str | None = typer.Option(None, "--served-name", help="model name clients ask for (default: --model)"),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level"),
):
    """Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions with
    streaming, /v1/models, /health), continuous batching over a compressed KV cache."""
    import uvicorn

    from ..generation.request import check_policy
    from ..serve import Engine
    from ..serve.server import create_app

    check_policy(policy)  # a bad spec fails before the model loads
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} must be in 1..65535")
    engine = Engine(
        load_model(model),
        policy,
        rows=rows,
        token_budget=token_budget,
        max_kv_bytes=max_kv_bytes,
        schedule=schedule,
    )
    app = create_app(engine, served_name or model)
    typer.echo(f"kvjax serve: {served_name or model} ({engine.policy.spec()}) on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
