"""Unit conversion constants shared by every package (time; insulin lives in plant.patients)."""

MIN_PER_H = 60.0
MIN_PER_DAY = 1440
