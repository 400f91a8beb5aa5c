"""hil/knee."""
