"""`plait serve`: the OpenAI-compatible HTTP server with dynamic batching (see `plait.server`)."""

from __future__ import annotations

from typing import Annotated

import typer

from plait.commands._common import WorkspaceOpt, open_workspace


def serve(
    workspace: WorkspaceOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most prompts decoded together in one batch.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", help="How long to gather more requests after the first one arrives.")] = 10.0,
    alias: Annotated[str, typer.Option(
        "--alias", help="Alias served for a routed domain when the adapter has it.")] = "production",
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most waiting requests; more get 503.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(
        "--max-prompt-tokens", help="Longest prompt in tokens; longer ones get 413.")] = 1024,
    max_tokens_limit: Annotated[int, typer.Option(
        "--max-tokens-limit", help="Largest max_tokens a request may ask for; more gets 400.")] = 512,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve the workspace over the OpenAI HTTP API: model = auto (routed), base, or an adapter reference."""
    from plait.server import ServerConfig
    from plait.server import serve as run_server
    from registry.errors import BadInputError

    if not 0 < port < 65536:
        raise BadInputError(f"--port {port} must be between 1 and 65535")
    config = ServerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit)
    ws = open_workspace(workspace)
    typer.echo(f"plait: serving {ws.path} on http://{host}:{port}/v1 (model = auto | base | NAME[:V|@ALIAS])",
               err=True)
    run_server(ws, host=host, port=port, alias=alias, config=config, log_level=log_level)
