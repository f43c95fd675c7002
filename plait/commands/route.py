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


def read_jsonl_inputs(path: Path) -> list[str]:
    """The inputs of a .jsonl file: each row's "text", else its "prompt" (a "completion" is
    ignored: routing and generation need only the input)."""
    from registry.errors import BadInputError, NotFoundError

    if not path.is_file():
        raise NotFoundError(f"input file {path} does not exist; give a .jsonl file of {{\"text\": ...}} or "
                            f"{{\"prompt\": ...}} rows")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); re-save the "
                            f"file as UTF-8") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{path}:{n}: not valid JSON ({e.msg}); write one JSON object per line") from None
        text = (obj.get("text") if obj.get("text") is not None else obj.get("prompt")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"{path}:{n}: the row needs a non-empty \"text\" or \"prompt\" string")
        out.append(text)
    if not out:
        raise BadInputError(f"{path} holds no rows; write one JSON object per line")
    return out


def _inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    from plait.continual import row_input
    from registry.errors import BadInputError

    out = list(texts or [])
    if file is not None and Path(file).suffix == ".jsonl":
        out += read_jsonl_inputs(Path(file))
    elif file is not None:  # csv, parquet, a folder of .txt: the training data reader
        from training.data import read_rows

        out += [row_input(r, max_chars=100_000) for r in read_rows(file)]
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
