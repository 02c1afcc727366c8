"""Data modules: real MNIST from the local root, the CIFAR-10 subset, the embedded digits, the missing-data error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    MNISTDataModule,
    random_crop_flip,
    resolve_data_dir,
)
from tests.conftest import data_root


def test_mnist_real_files(mnist_root: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_root), download=False, batch_size=256, val_size=5000)
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (256,)
    full = dm.train_set.x
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1.0) < 0.05  # normalised
    # the split is fixed by the seed and disjoint
    dm2 = MNISTDataModule(data_dir=str(mnist_root), download=False, val_size=5000)
    dm2.setup("fit")
    assert torch.equal(dm.val_set.y, dm2.val_set.y)
    assert sorted(torch.bincount(dm.test_set.y).tolist())[0] > 850


def test_mnist_missing_files_error(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataNotFoundError, match=r"MNIST not found under .*nowhere.*DISTILL_DATA.*download true"):
        dm.setup("fit")


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/x/y") == Path("/x/y")
    monkeypatch.delenv("DISTILL_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "distill" / "data"


def test_cifar10_subset() -> None:
    root = data_root()
    subset = root / "cifar10-subset" / "cifar10_exact_subset.npz"
    if not subset.exists():
        pytest.skip(f"CIFAR-10 subset not found at {subset}")
    dm = CIFAR10DataModule(data_dir=str(root), subset_file="cifar10-subset/cifar10_exact_subset.npz", val_size=200)
    dm.setup("fit")
    assert dm.train_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.test_set)) == (1800, 1000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
    xb, _ = dm.on_after_batch_transfer((x, y), 0)
    assert xb.dtype == torch.float32 and abs(xb.mean().item()) < 0.5


def test_cifar10_missing_subset(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path), subset_file="missing.npz")
    with pytest.raises(DataNotFoundError, match="subset file .*missing.npz does not exist"):
        dm.setup("fit")


def test_random_crop_flip_is_a_shifted_window() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each output is some window of the padded image, possibly mirrored
        found = False
        for dy in range(5):
            for dx in range(5):
                win = padded[b, :, dy : dy + 8, dx : dx + 8]
                if torch.equal(out[b], win) or torch.equal(out[b], win.flip(-1)):
                    found = True
        assert found


def test_digits_embedded() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert dm.train_set is not None and dm.test_set is not None and dm.val_set is not None
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and int(y.max()) <= 9


def test_bad_datamodule_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DigitsDataModule(batch_size=0)
    dm = DigitsDataModule(val_size=5000)
    with pytest.raises(ValueError, match="val_size=5000 leaves no training data"):
        dm.setup("fit")
