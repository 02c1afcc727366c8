"""Lightning callbacks of distill: each usable in any LightningModule."""

from distill.callbacks.gmm_prior import GMMPrior
from distill.callbacks.load_weights import LoadWeights

__all__ = ["GMMPrior", "LoadWeights"]
