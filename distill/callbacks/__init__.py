"""Callbacks usable in any LightningModule: the mixture prior, pruning, compression to a file, figures, checkpoints, a
progress bar."""

from distill.callbacks.checkpoint import ModelCheckpoint
from distill.callbacks.figures import FigureLogger
from distill.callbacks.gmm_prior import GMMPrior
from distill.callbacks.load_weights import LoadWeights
from distill.callbacks.progress import ProgressBar
from distill.callbacks.prune_quantize import PruneQuantize
from distill.callbacks.pruning import MagnitudePruning

__all__ = ["FigureLogger", "GMMPrior", "LoadWeights", "MagnitudePruning", "ModelCheckpoint", "ProgressBar",
           "PruneQuantize"]
