"""plait routing."""
