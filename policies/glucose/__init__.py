"""policies/glucose."""
