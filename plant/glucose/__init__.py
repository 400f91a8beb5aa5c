"""plant/glucose."""
