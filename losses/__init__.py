"""Training objectives."""

from losses.cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
