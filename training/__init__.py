"""Training and evaluation: experiment assembly, steps, loop, checkpoints, metrics."""
