"""Callbacks usable in any LightningModule: one behaviour per file."""

from distill.callbacks.prune_quantize import PruneQuantize
from distill.callbacks.pruning import MagnitudePruning

__all__ = ["MagnitudePruning", "PruneQuantize"]
