"""Tokenizers, token-file preparation and grain input pipelines."""
