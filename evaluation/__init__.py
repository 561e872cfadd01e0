"""Evaluating finished runs: restore a checkpoint on any mesh, and the modes of `eval.py`
(one checkpoint, every checkpoint, other data, integer weights, sampling, speculative
decoding)."""
