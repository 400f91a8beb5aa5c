"""Physiological plants, devices, scenarios, metrics and Gymnasium environments."""
