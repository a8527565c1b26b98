"""Experiment configs and the end-to-end demo."""
