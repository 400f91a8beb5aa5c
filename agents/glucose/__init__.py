"""agents/glucose."""
