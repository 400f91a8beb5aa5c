"""Therapy controllers, RL training and evaluation, and the safety shield."""
