"""agents/knee."""
