"""Unit conversion constants shared by every package (time; insulin units: plant.glucose)."""

MIN_PER_H = 60.0
MIN_PER_DAY = 1440
