"""hil/glucose."""
