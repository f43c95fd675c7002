"""`plait serve`: the OpenAI-compatible HTTP server with continuous batching (see `plait.server`)."""

from __future__ import annotations

from typing import Annotated

import typer

from plait.commands._common import WorkspaceOpt, open_workspace


def serve(
    workspace: WorkspaceOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="PLAIT_API_KEY", show_envvar=True,
        help="Require `Authorization: Bearer KEY` (the openai client's api_key) on every route but /health.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow a non-loopback --host without --api-key (anyone who reaches it may use it).")
    ] = False,
    docs: Annotated[bool, typer.Option("--docs", help="Serve /docs, /redoc and /openapi.json (off by default).")
                    ] = False,
    scheduler: Annotated[str, typer.Option(
        "--scheduler", help="continuous: requests join and leave the running batch at every decode step; "
                            "static: a batch runs until its last row ends (for comparison).")] = "continuous",
    metrics_public: Annotated[bool, typer.Option(
        "--metrics-public", help="Answer GET /metrics (Prometheus) without the API key (off by default).")] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most prompts decoded together in one batch.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", help="static: how long to gather more requests after the first one arrives.")] = 10.0,
    alias: Annotated[str, typer.Option(
        "--alias", help="Alias served for a routed domain when the adapter has it.")] = "production",
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most waiting requests; more get 503.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(
        "--max-prompt-tokens", help="Longest prompt in tokens (chat: as rendered); longer ones get 413.")] = 1024,
    max_tokens_limit: Annotated[int, typer.Option(
        "--max-tokens-limit", help="Largest max_tokens a request may ask for; more gets 400.")] = 512,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", help="Largest request body in bytes; larger ones get 413.")] = 1_048_576,
    max_messages: Annotated[int, typer.Option(
        "--max-messages", help="Most messages in one chat request; more get 413.")] = 256,
    max_route_inputs: Annotated[int, typer.Option(
        "--max-route-inputs", help="Most inputs in one /v1/route request; more get 413.")] = 64,
    max_route_input_chars: Annotated[int, typer.Option(
        "--max-route-input-chars", help="Longest /v1/route input in characters; longer ones get 413.")] = 8192,
    max_adapters: Annotated[int | None, typer.Option(
        "--max-adapters", help="Most adapters loaded at once; others load from the registry on demand and the least "
                               "recently used idle one is evicted. Default: sized for the machine (a quarter of the "
                               "available memory over the largest adapter's size, 8 to 1024).")] = None,
    preload: Annotated[str | None, typer.Option(
        "--preload", help="Comma-separated adapter references (NAME, NAME:V, NAME@ALIAS) loaded at start and never "
                          "evicted; an alias reference follows its alias.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve the workspace over the OpenAI HTTP API: model = auto (routed), base, or an adapter reference."""
    from plait.server import ServerConfig, check_exposure
    from plait.server import serve as run_server
    from registry.errors import BadInputError

    if not 0 < port < 65536:
        raise BadInputError(f"--port {port} must be between 1 and 65535")
    check_exposure(host, api_key, insecure)  # before the workspace and the base load
    from routing.residency import check_max_adapters

    check_max_adapters(max_adapters, "--max-adapters")
    config = ServerConfig(scheduler=scheduler, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                          max_body_bytes=max_body_bytes, max_messages=max_messages,
                          max_route_inputs=max_route_inputs, max_route_input_chars=max_route_input_chars, docs=docs,
                          max_adapters=max_adapters, preload=_preload_refs(preload), metrics_public=metrics_public)
    ws = open_workspace(workspace)
    auth = "API key required" if api_key else "no API key"
    typer.echo(f"plait: serving {ws.path} on http://{host}:{port}/v1 ({auth}; model = auto | base | NAME[:V|@ALIAS])",
               err=True)
    run_server(ws, host=host, port=port, alias=alias, config=config, log_level=log_level, api_key=api_key,
               insecure=insecure)


def _preload_refs(text: str | None) -> tuple[str, ...]:
    """`--preload a,b@production` -> ("a", "b@production"), each checked as an adapter reference."""
    from plait.service import check_model_name
    from registry.errors import BadInputError

    if text is None:
        return ()
    refs = tuple(r.strip() for r in text.split(","))
    for r in refs:
        if not r or r in ("auto", "base"):
            raise BadInputError(f"--preload {text!r}: give adapter references separated by commas "
                                f"(NAME, NAME:V or NAME@ALIAS), e.g. --preload law@production,news:2")
        check_model_name(r)
    return refs
