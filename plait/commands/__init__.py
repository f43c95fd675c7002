"""The CLI's command groups, one module each; `plait.cli` mounts them."""
