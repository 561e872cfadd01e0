"""Experiment configs: each file defines `get_config(arg)`; presets follow the colon."""
