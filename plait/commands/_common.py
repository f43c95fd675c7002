"""What every command shares: the --workspace and --json options, and output helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", envvar="PLAIT_WORKSPACE", show_default="./.plait",
                 help="Workspace folder (or set PLAIT_WORKSPACE)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]


#: how the settings that lower layers (registry/, training/, routing/) name in their errors read
#: on the command line: those layers name values and facts (`init`, `from_ref` are TrainConfig
#: fields), never CLI flags; `with_flags` puts the flag in. (setting, its CLI spelling, the flag)
SETTING_FLAGS = [("init", "--init", "--init"), ("from_ref", "--from", "--from"),
                 ("an eval file", "an eval file (--eval)", "--eval"),
                 ("the max length", "the max length (--max-length)", "--max-length"),
                 ("LoRA rank", "LoRA rank (--rank)", "--rank"), ("bottleneck size", "bottleneck size (--rank)", "--rank"),
                 ("another adapter name", "another adapter name (--name)", "--name"),
                 ("another database URL", "another database URL (--db)", "--db"),
                 ("do not resume", "drop --resume", "--resume"),
                 ("a batch size of", "--batch-size", "--batch-size"),
                 ("merge method linear needs", "--merge linear needs", "--merge"),
                 ("use merge method cat or ties", "use --merge cat or --merge ties", "--merge"),
                 ("the step count", "--steps", "--steps"), ("the epoch count", "--epochs", "--epochs"),
                 ("as adapter kind", "with --method", "--method"), ("give no adapter kind", "leave --method out", "--method"),
                 ("use adapter kind", "use --method", "--method"),
                 ("give no rank or kind options", "leave out --rank and --option", "--rank"),
                 ("the adapter limit", "--max-adapters", "--max-adapters"),
                 ("preloaded adapters", "adapters given to --preload", "--preload")]


def with_flags(message: str) -> str:
    """`message` as the CLI prints it: each setting it names (a whole word, not already a flag)
    spelled as its flag, e.g. "init base and from_ref law:1 disagree" -> "--init base and --from
    law:1 disagree". A flag the lower layer's message already names is left alone."""
    import re

    named = {flag for _, _, flag in SETTING_FLAGS if flag in message}
    for name, spelling, flag in SETTING_FLAGS:
        if flag not in named:
            # never inside a word or a flag, nor the command `plait init`
            message = re.sub(rf"(?<![-\w])(?<!plait ){re.escape(name)}(?![-\w])", spelling, message)
    return message


def open_workspace(path: Path | None):
    from plait.workspace import Workspace

    return Workspace(path)


def print_json(obj: Any) -> None:
    """JSON on stdout and nothing else, so `--json` output pipes into other tools."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def console():
    from rich.console import Console

    return Console()


def short(digest: str | None, n: int = 12) -> str:
    if not digest:
        return "-"
    return digest if len(digest) <= n else digest[:n]


RICH_TABLE_MAX_ROWS = 200


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table on stdout: rich for up to 200 rows, plain aligned text beyond.

    rich lays out every cell (about 0.5 ms a row here), which would make `plait registry
    list` over thousands of versions slow; plain columns print in a few milliseconds.
    """
    if len(rows) <= RICH_TABLE_MAX_ROWS:
        from rich.table import Table

        table = Table(*headers, title=title)
        for r in rows:
            table.add_row(*r)
        console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
