"""`plait demo`: the main job on the shipped model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Demo workspace (reused when it exists).")]
        = Path("plait-demo/.plait"),
    fast: Annotated[bool, typer.Option("--fast", help="A smaller run: python-code and two BBC domains, fewer steps.")]
        = False,
    large: Annotated[bool, typer.Option("--large", help="A bigger run for a machine with a GPU.")] = False,
) -> None:
    """Grow SmolLM2 over Python code and five BBC News domains (bottleneck, LoRA, QLoRA adapters); audit each step."""
    from plait.demo import FAST, FULL, LARGE, run_demo

    run_demo(workspace, LARGE if large else FAST if fast else FULL)
