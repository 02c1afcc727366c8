"""Data modules: real MNIST from the local root, the CIFAR-10 subset, the embedded digits, the missing-data error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from distill.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    MNISTDataModule,
    ResumableDataLoader,
    TensorBatchDataset,
    TensorBatchSampler,
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


@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_batch_sampler_draws_random_samplers_batches(drop_last: bool) -> None:
    """Over a RandomSampler: the batches BatchSampler would give under the same seed, as index tensors; over another
    sampler: that sampler's batches."""
    data = range(103)
    torch.manual_seed(3)
    ref = [torch.tensor(b) for b in BatchSampler(RandomSampler(data), 16, drop_last)]
    torch.manual_seed(3)
    got = list(TensorBatchSampler(RandomSampler(data), 16, drop_last))
    assert len(got) == len(ref) == len(TensorBatchSampler(RandomSampler(data), 16, drop_last))
    assert len(got) == (6 if drop_last else 7)
    assert all(isinstance(b, torch.Tensor) and torch.equal(b, r) for b, r in zip(got, ref, strict=True))
    g = torch.Generator().manual_seed(5)  # a sampler with its own generator, over three epochs
    ref_sampler = BatchSampler(RandomSampler(data, generator=g), 16, drop_last)
    ref_g = [torch.tensor(b) for _ in range(3) for b in ref_sampler]
    g.manual_seed(5)
    sampler = TensorBatchSampler(RandomSampler(data, generator=g), 16, drop_last)
    assert all(torch.equal(b, r) for b, r in zip([b for _ in range(3) for b in sampler], ref_g, strict=True))
    assert list(TensorBatchSampler(SequentialSampler(data), 16, drop_last)) == list(
        BatchSampler(SequentialSampler(data), 16, drop_last))


def test_tensor_batch_dataset_fetches_the_rows_asked_for() -> None:
    """A batch fetched at once (a tensor of indices from TensorBatchSampler, or a list from BatchSampler) holds the
    same rows and labels, in the same order, as fetching the samples one by one."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 3, 4, generator=g), torch.randint(0, 10, (50,), generator=g)
    data = TensorBatchDataset(x, y)
    for idx in (torch.tensor([7, 0, 49, 7, 13]), [7, 0, 49, 7, 13], torch.randperm(50, generator=g)[:16]):
        bx, by = data.__getitems__(idx)
        items = [data[int(i)] for i in idx]
        assert torch.equal(bx, torch.stack([a for a, _ in items]))
        assert torch.equal(by, torch.stack([b for _, b in items]))
        assert bx.is_contiguous() and bx.shape == (len(idx), 1, 3, 4)


def test_train_loader_takes_lightnings_distributed_sampler() -> None:
    """Under DDP Lightning re-creates the training loader around a DistributedSampler: each rank then gets its
    shuffled half of the data, fetched through the same dataset."""
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, TensorBatchSampler)
    assert isinstance(loader.dataset, TensorBatchDataset)
    n = len(loader.dataset)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ddp_loader = _update_dataloader(loader, sampler, mode="fit")
        assert isinstance(ddp_loader.batch_sampler, TensorBatchSampler)
        assert ddp_loader.batch_sampler.sampler is sampler and ddp_loader.batch_sampler.batch_size == 32
        # still resumable for Lightning, so a single-process checkpoint's loader state loads (and is ignored: the
        # DistributedSampler shuffles by seed and epoch)
        assert isinstance(ddp_loader, ResumableDataLoader) and ddp_loader.progress == loader.progress
        ddp_loader.load_state_dict({"generator_state": torch.get_rng_state(), "completed_batches": 3})
        seen.append(torch.cat([x for x, _ in ddp_loader]))
        assert len(seen[-1]) == (n + 1) // 2
    def rows(x: torch.Tensor) -> Counter[bytes]:
        return Counter(r.numpy().tobytes() for r in x.flatten(1))

    got, every = rows(torch.cat(seen)), rows(loader.dataset.x)
    assert not every - got and sum((got - every).values()) == 2 * ((n + 1) // 2) - n  # all, one repeated if n is odd


def test_tensor_batch_sampler_resumes_the_rest_of_an_epoch() -> None:
    torch.manual_seed(0)
    sampler = TensorBatchSampler(RandomSampler(range(100)), batch_size=16, drop_last=False)
    epoch = list(sampler)
    assert sampler.epoch_generator_state is not None
    sampler.resume_from(sampler.epoch_generator_state, skip=3)
    rest = list(sampler)
    assert len(rest) == len(epoch) - 3
    for a, b in zip(rest, epoch[3:], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(list(sampler)[0], epoch[0])  # then a fresh epoch, as before


def test_ctrl_c_mid_epoch_then_resume_ends_like_the_uninterrupted_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """last.ckpt written on Ctrl-C holds the loader's place and the random states: the rest of that epoch's batches
    follow, and the run ends bit-identical to one never interrupted."""
    import pytorch_lightning as pl

    from distill.cli import DistillCLI
    from tests.conftest import REPO

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 30:  # batch 9 of epoch 1 (21 batches an epoch)
                raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    base = ["-c", str(REPO / "configs" / "quickstart" / "teacher.yaml"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "3"]

    def fit(folder: str, callbacks: list[pl.Callback], ckpt: str | None = None) -> None:
        cli = DistillCLI(args=[*base, "--checkpoint.dirpath", folder], run=False,
                         trainer_defaults={"callbacks": callbacks})
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt)

    fit("full", [])
    with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt
        fit("part", [CtrlC()])
    assert torch.load("part/last.ckpt", weights_only=True)["global_step"] == 30
    fit("part", [], ckpt="part/last.ckpt")
    full = torch.load("full/last.ckpt", weights_only=True)
    part = torch.load("part/last.ckpt", weights_only=True)
    assert full["global_step"] == part["global_step"] == 63
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(part["state_dict"][key], value, rtol=0, atol=0)
