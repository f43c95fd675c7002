"""`plait route` and `plait generate`: per-input adapter choice and routed generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from plait.commands._common import JsonOpt, WorkspaceOpt, console, open_workspace, print_json

TextsArg = Annotated[list[str] | None, typer.Argument(help="Input texts.", show_default=False)]
FileOpt = Annotated[Path | None, typer.Option("--file", help="A .jsonl file of {text} or {prompt} rows.")]
TopK = Annotated[int, typer.Option("--top-k", help="Blend the k most likely domains' adapters.")]


def _inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    from routing.routers import row_input
    from registry.errors import BadInputError

    out = list(texts or [])
    if file is not None:
        from training.data import read_rows

        out += [row_input(r, max_chars=100_000) for r in read_rows(file, inputs_only=True)]
    if not out:
        raise BadInputError("no input: give TEXT arguments or --file FILE.jsonl")
    return out


def route(texts: TextsArg = None, file: FileOpt = None, top_k: TopK = 1,
          router: Annotated[str | None, typer.Option("--router", help="Router kind (default: the workspace's).")] = None,
          json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Which adapters (and weights) serve each input; `domain` null means the base model."""
    from plait.service import RoutedModel

    ws = open_workspace(workspace)
    inputs = _inputs(texts, file)
    rm = RoutedModel(ws, router=router) if router else ws.routed_model
    served = rm.route(inputs, top_k=top_k)
    if json_:
        return print_json([s.to_dict() for s in served])
    c = console()
    for text, s in zip(inputs, served):
        chosen = ", ".join(f"{a['ref']} ({a['weight']:.2f})" for a in s.adapters) or "base model (fallback)"
        c.print(f"[bold]{s.domain or '-'}[/bold]  {chosen}  [dim]confidence {s.confidence:.2f}[/dim]  "
                f"{json.dumps(text[:60])}")


def generate(texts: TextsArg = None, file: FileOpt = None, top_k: TopK = 1,
             model: Annotated[str, typer.Option("--model", help="auto (routed), base, or an adapter reference.")]
             = "auto",
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 48,
             sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
             temperature: Annotated[float, typer.Option("--temperature")] = 0.8,
             seed: Annotated[int | None, typer.Option("--seed")] = None,
             chat: Annotated[bool, typer.Option("--chat", help="Wrap inputs in the base's chat template.")] = False,
             json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Answer every input in one mixed-adapter batch, each with its routed adapters."""
    from plait.service import check_model_name
    from registry.errors import BadInputError

    if max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    ws = open_workspace(workspace)
    out = ws.generate(_inputs(texts, file), check_model_name(model), top_k=top_k, max_new_tokens=max_new_tokens,
                      do_sample=sample, temperature=temperature, seed=seed, chat=chat)
    if json_:
        return print_json(out)
    c = console()
    for row in out:
        chosen = ", ".join(f"{a['ref']} ({a['weight']:.2f})" for a in row["adapters"]) or "base model"
        c.print(f"[bold]{chosen}[/bold]\n{row['text'].strip()}\n")
