"""Rigs, campaigns, reports and the ``twinloop`` command line."""
