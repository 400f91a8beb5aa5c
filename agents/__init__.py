"""Agents of the loop: sensor, twin estimator, controller, safety supervisor, actuator."""
