"""plait: continual-learning adapter management.

The public Python API::

    from plait import Workspace
    ws = Workspace.init("./.plait", base_model="smollm2")
    ws.registry.search_adapters()

Names are imported on first use, so `plait --help` does not pay for the database stack.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Workspace": "plait.workspace", "WorkspaceConfig": "plait.workspace",
    "Registry": "registry.client", "VersionInfo": "registry.client",
    "PlaitError": "registry.errors", "BadInputError": "registry.errors", "NotFoundError": "registry.errors",
    "IntegrityError": "registry.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
