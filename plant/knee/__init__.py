"""plant/knee."""
