"""plait training."""
