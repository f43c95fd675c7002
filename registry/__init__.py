"""plait registry."""
