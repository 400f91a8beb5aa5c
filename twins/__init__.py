"""twins."""
