"""The `plait` command line: a thin Typer layer over `plait.Workspace`.

Errors a user can cause print as one line on stderr and exit 2; failures of the system or
of stored data exit 1. `--debug` (or PLAIT_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from plait.commands import registry as registry_cmd
from plait.commands import audit as audit_cmd
from plait.commands._common import with_flags
from plait.commands import demo as demo_cmd
from plait.commands import route as route_cmd
from plait.commands import serve as serve_cmd
from plait.commands import train as train_cmd
from plait.commands._common import JsonOpt, WorkspaceOpt, print_json

app = typer.Typer(
    name="plait",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="plait: grow one base model domain by domain with LoRA, QLoRA and bottleneck adapters, "
         "without forgetting. A versioned registry, an incremental trainer, a router and forgetting audits.",
)
app.add_typer(registry_cmd.app, name="registry")
app.command("train")(train_cmd.train)
app.command("route")(route_cmd.route)
app.command("generate")(route_cmd.generate)
app.command("audit")(audit_cmd.audit)
app.command("serve")(serve_cmd.serve)
app.command("demo")(demo_cmd.demo)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    if debug:
        os.environ["PLAIT_DEBUG"] = "1"


@app.command()
def init(
    workspace: WorkspaceOpt = None,
    base_model: Annotated[str, typer.Option(
        "--base-model", help="Base model: a local folder, a .gguf file, a cached HF id, or 'smollm2' (shipped).")] = "smollm2",
    db: Annotated[str, typer.Option("--db", help="Registry database URL (default: SQLite in the workspace). Keep a "
                                    "password out of it: set PLAIT_DB_PASSWORD instead.")] = "",
    tracking_uri: Annotated[str, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default: SQLite in the workspace; 'none' turns MLflow off).")] = "",
    json_: JsonOpt = False,
) -> None:
    """Create a workspace: settings, registry database, MLflow store and artifact folder."""
    from plait.workspace import Workspace

    ws = Workspace.init(workspace, base_model=base_model, db_url=db, tracking_uri=tracking_uri)
    if json_:
        return print_json(ws.describe())
    typer.echo(f"workspace ready at {ws.path}")
    for key, value in ws.describe().items():
        if key != "workspace":
            typer.echo(f"  {key:<13} {value}")


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, UsageError, Exit, Abort) classes of click and of typer's own copy of it.

    typer >= 0.20 vendors click as `typer._click` and raises its own classes, which plain
    `click.ClickException` does not catch: usage errors then fell through to the generic
    handler and exited 1 with a class name instead of 2 with click's message.
    """
    import click
    import typer

    clicks, usages = [click.ClickException], [click.UsageError]
    try:
        from typer._click import exceptions as vendored

        clicks.append(vendored.ClickException)
        usages.append(vendored.UsageError)
    except ImportError:  # an older typer uses click itself
        pass
    return (tuple(clicks), tuple(usages), (click.exceptions.Exit, typer.Exit),
            (click.exceptions.Abort, typer.Abort))


def quiet_libraries() -> None:
    """Keep library chatter off the terminal: the CLI prints its own progress.

    transformers' "Loading weights" bars and advisory warnings, bitsandbytes' note that the
    optional `kernels` package is missing (it falls back to its own CPU kernels), and a
    deprecation warning peft triggers inside transformers. Errors still print; `--debug`
    leaves everything on.
    """
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


@functools.cache
def _command():
    """The click command typer builds from `app`, built once per process (not once per `main`
    call: tests, benchmarks and notebooks call `main` many times in one process)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    from registry.errors import PlaitError

    click_error, usage_error, exit_, abort = _click_errors()
    args = argv if argv is not None else sys.argv[1:]
    debug = os.environ.get("PLAIT_DEBUG") == "1" or "--debug" in args
    if not debug:
        quiet_libraries()
    try:
        result = _command()(args=argv, prog_name="plait", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except PlaitError as e:
        if debug:
            raise
        typer.echo(f"error: {with_flags(str(e))}", err=True)
        return e.exit_code
    except exit_ as e:
        return e.exit_code
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `plait` / `plait registry`: typer printed the help
            return 0
        path = e.ctx.command_path if getattr(e, "ctx", None) is not None else "plait"
        typer.echo(f"error: {' '.join(e.format_message().split())} (see `{path} --help`)", err=True)
        return 2
    except click_error as e:
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return e.exit_code
    except abort:
        typer.echo("aborted", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {' '.join(str(e).split())[:500]} (run with --debug for the traceback)",
                   err=True)
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
