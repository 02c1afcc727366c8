"""Callbacks usable in any LightningModule: the mixture prior, pruning, compression to a file, figures."""

from distill.callbacks.figures import FigureLogger

__all__ = ["FigureLogger"]
