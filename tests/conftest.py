"""Shared test fixtures: tiny models, fast trainer settings, and the local data root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.cli import DistillCLI

REPO = Path(__file__).resolve().parents[1]


class ParseOnlyCLI(DistillCLI):
    """Parse and type-check a config without building anything (no teacher checkpoint or data needed)."""

    def instantiate_classes(self) -> None:
        pass


def data_root() -> Path:
    """The local data root: ``$DISTILL_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("DISTILL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = data_root()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found under {root} (set DISTILL_DATA)")
    return root


@pytest.fixture
def trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """Fast, quiet CPU trainer settings writing into ``tmp_path``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "default_root_dir": str(tmp_path),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
    }


def random_loader(n: int = 64, shape: tuple[int, ...] = (1, 28, 28), classes: int = 10, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)
