"""Ablation sweeps: expand `get_sweep(arg)` from a config file, run, resume and report."""
