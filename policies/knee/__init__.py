"""policies/knee."""
