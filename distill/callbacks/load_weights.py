"""Initialise a LightningModule from a checkpoint's weights before training (e.g. retrain a teacher with a prior).

Only the weights are copied (``state_dict`` entries matched by key); optimizer, loops and callbacks start fresh.
Skipped when the fit resumes from a checkpoint (``ckpt_path``), whose weights Lightning has already restored.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from distill.errors import CheckpointError, DistillError, read_checkpoint

__all__ = ["CheckpointKeysError", "LoadWeights", "load_weights_from_checkpoint"]


class CheckpointKeysError(DistillError, KeyError):
    """The checkpoint's keys do not match the module's (both lists in the message)."""


def load_weights_from_checkpoint(
    module: torch.nn.Module, checkpoint: str | Path, source_prefix: str = "", target_prefix: str = ""
) -> list[str]:
    """Copy the tensors of a Lightning checkpoint's ``state_dict`` into ``module``, strictly.

    Keys starting with ``source_prefix`` are renamed to start with ``target_prefix`` (others are ignored); every
    entry of ``module.state_dict()`` under ``target_prefix`` must be matched, with the same shape.

    Args:
        module: the module to initialise (in place).
        checkpoint: a ``.ckpt`` written by Lightning (or a file holding a plain state dict), loaded with
            ``weights_only=True``.
        source_prefix: prefix of the keys to take from the checkpoint (e.g. ``"model."``).
        target_prefix: prefix those keys get in ``module`` (e.g. ``"student."``).

    Returns:
        the keys of ``module`` that were loaded.

    Raises:
        FileNotFoundError: if the checkpoint does not exist (a :class:`~distill.errors.CheckpointError`).
        CheckpointError: if the file is not a readable checkpoint, or on a shape mismatch (named); a ``ValueError``.
        CheckpointKeysError: on missing or unexpected keys (listed); a ``KeyError``.
    """
    path = Path(checkpoint)
    blob = read_checkpoint(path, "LoadWeights: checkpoint")  # missing: "... does not exist", a FileNotFoundError
    source = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(source, dict):
        raise CheckpointError(f"LoadWeights: {str(path)!r} holds no state_dict")
    renamed = {target_prefix + k[len(source_prefix) :]: v for k, v in source.items() if k.startswith(source_prefix)}
    target = {k: v for k, v in module.state_dict().items() if k.startswith(target_prefix)}
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise CheckpointKeysError(
            f"LoadWeights: checkpoint {str(path)!r} does not match the module: missing keys {missing}, "
            f"unexpected keys {unexpected} (source_prefix={source_prefix!r}, target_prefix={target_prefix!r})"
        )
    for k, v in renamed.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise CheckpointError(
                f"LoadWeights: shape of {k!r} is {tuple(v.shape)} in {str(path)!r} but {tuple(target[k].shape)} "
                "in the module"
            )
    with torch.no_grad():
        for k, v in renamed.items():
            target[k].copy_(v)
    return sorted(renamed)


class LoadWeights(Callback):
    """Copy weights from a checkpoint into the module at the start of ``fit`` (put it before ``GMMPrior``).

    Args:
        checkpoint: path of the checkpoint (e.g. the teacher's ``last.ckpt``).
        source_prefix: prefix of the keys to take from the checkpoint.
        target_prefix: prefix those keys get in the module.

    Raises:
        ValueError: if ``checkpoint`` is empty.
    """

    def __init__(self, checkpoint: str, source_prefix: str = "", target_prefix: str = "") -> None:
        super().__init__()
        if not checkpoint:
            raise ValueError("LoadWeights: checkpoint must be a path to a .ckpt file, got an empty value")
        self.checkpoint = str(checkpoint)
        self.source_prefix = source_prefix
        self.target_prefix = target_prefix
        self.loaded: list[str] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return  # resuming: the checkpoint being resumed holds the current weights
        self.loaded = load_weights_from_checkpoint(pl_module, self.checkpoint, self.source_prefix, self.target_prefix)
