"""Tokenizers, corpus preparation and grain input pipelines (see data/README.md)."""
