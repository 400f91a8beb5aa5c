"""The knee-exo therapy's campaigns part: its faults, requirements, verdicts, report and HIL."""
