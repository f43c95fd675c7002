"""plait plait."""
