"""Data modules: real MNIST from the local root, the CIFAR-10 subset, the embedded digits, the missing-data error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from distill.data import (
    CIFAR10DataModule,
    DataFileError,
    DataNotFoundError,
    DigitsDataModule,
    MNISTDataModule,
    ResumableDataLoader,
    TensorBatchDataset,
    TensorBatchSampler,
    random_crop_flip,
    resolve_data_dir,
)
from distill.errors import ConfigError
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
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_size=5000 leaves no training data"):  # checked as it is built
        DigitsDataModule(val_size=5000)


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


@pytest.mark.parametrize("where", ["training", "validation"])
def test_ctrl_c_mid_epoch_then_resume_ends_like_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      where: str) -> None:
    """last.ckpt written on Ctrl-C holds the loader's place and the random states: the rest of that epoch's batches
    follow (or, stopped in the epoch's closing validation, the next epoch), and the run ends bit-identical to one never
    interrupted."""
    import pytorch_lightning as pl

    from distill.cli import DistillCLI
    from tests.conftest import REPO

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if where == "training" and trainer.global_step == 30:  # batch 9 of epoch 1 (21 batches an epoch)
                raise KeyboardInterrupt

        def on_validation_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if where == "validation" and trainer.current_epoch == 1 and not trainer.sanity_checking:
                raise KeyboardInterrupt  # in epoch 1's closing validation, its 21 batches trained

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
    assert torch.load("part/last.ckpt", weights_only=True)["global_step"] == (30 if where == "training" else 42)
    fit("part", [], ckpt="part/last.ckpt")
    full = torch.load("full/last.ckpt", weights_only=True)
    part = torch.load("part/last.ckpt", weights_only=True)
    assert full["global_step"] == part["global_step"] == 63
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(part["state_dict"][key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1\. Fix: set data.init_args.num_workers to 0"),
    ({"eval_batch_size": -1}, r"eval_batch_size must be an integer >= 1, or null .*got -1\. Fix: .*eval_batch_size"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be an integer >= 1, or null .*got 0\."),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0\. Fix: set data.init_args.batch_size to 1"),
    ({"batch_size": -5}, r"batch_size must be an integer >= 1, got -5"),
    ({"batch_size": None}, r"batch_size must be an integer >= 1, got None"),
])
def test_loader_arguments_are_checked_as_the_module_is_built(kwargs: dict[str, object], match: str) -> None:
    """Out-of-range loader arguments fail when the data module is built, naming the argument, its value and the valid
    range, instead of as DataLoader's ValueError once a loader is made."""
    with pytest.raises(ConfigError, match=rf"^DigitsDataModule: {match}"):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


def test_eval_batch_size_none_means_batch_size() -> None:
    assert DigitsDataModule(batch_size=7).eval_batch_size == 7
    assert DigitsDataModule(batch_size=7, eval_batch_size=None).eval_batch_size == 7
    assert DigitsDataModule(batch_size=7, eval_batch_size=3).eval_batch_size == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"test_size": 5000}, r"test_size=5000 leaves no training data \(the digits have 1797 images.*Fix: set "
                          r"data.init_args.test_size between 1 and 1596, or lower val_size"),
    ({"test_size": 0}, r"test_size=0 leaves no test data .*test_size between 1 and 1596 \("),
    ({"test_size": 1500, "val_size": 400}, r"val_size=400 leaves no training data \(the training set has 297 images"
                                           r".*Fix: set data.init_args.val_size between 0 and 296, or lower test_size"),
    ({"test_size": 300, "val_size": 1497}, r"val_size=1497 .*between 0 and 1496"),
])
def test_digits_sizes_are_checked_against_its_1797_images(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=rf"^DigitsDataModule: {match}"):
        DigitsDataModule(**kwargs)


def test_digits_largest_sizes_leave_one_training_image() -> None:
    dm = DigitsDataModule(test_size=1596, val_size=200)
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set) == 1


def _npz(path: Path, x_train: np.ndarray, y_train: np.ndarray) -> None:
    np.savez(path, x_train_first2000=x_train, y_train_first2000=y_train,
             x_test_first1000=np.zeros((3, 32, 32, 3), np.uint8), y_test_first1000=np.arange(3))


def test_cifar10_subset_that_is_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an archive\n")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.ckpt")
    np.save(tmp_path / "one.npy", np.zeros((4, 32, 32, 3), np.uint8))
    _npz(tmp_path / "good.npz", np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:500])
    cases = {
        "notes.txt": r"notes.txt is not an .npz archive \(a zip file; this one starts with b'not an'\)\. Fix: ",
        "model.ckpt": r"model.ckpt lacks arrays \['x_train_first2000', .*it looks like a PyTorch checkpoint",
        "one.npy": r"one.npy is a single .npy array, not an .npz archive",
        "cut.npz": r"cut.npz cannot be read \(a truncated or corrupted .npz.*Fix: give as subset file an .npz",
    }
    for name, match in cases.items():
        dm = CIFAR10DataModule(data_dir=str(tmp_path), subset_file=name, val_size=1)
        with pytest.raises(DataFileError, match=rf"^CIFAR-10 subset file .*{match}"):
            dm.setup("fit")


@pytest.mark.parametrize(("x", "y", "match"), [
    (np.zeros((4, 28, 28), np.uint8), np.arange(4), r"x_train_first2000 is uint8 of shape \(4, 28, 28\); expected "
                                                     r"uint8 images of shape \(N, 32, 32, 3\)"),
    (np.zeros((4, 3, 32, 32), np.uint8), np.arange(4), r"x_train_first2000 is uint8 of shape \(4, 3, 32, 32\)"),
    (np.zeros((4, 32, 32, 3), np.float32), np.arange(4), r"x_train_first2000 is float32 of shape"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.arange(3), r"y_train_first2000 is int64 of shape \(3,\); expected "
                                                       r"\(4,\) integer labels 0..9"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 2, 10]), r"y_train_first2000 .*labels 0..9"),
])
def test_cifar10_subset_with_wrong_arrays(tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str) -> None:
    _npz(tmp_path / "s.npz", x, y)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), subset_file="s.npz", val_size=1)
    with pytest.raises(DataFileError, match=rf"^CIFAR-10 subset file .*s.npz: {match}"):
        dm.setup("fit")


def test_cifar10_subset_of_integer_pixels_loads_as_uint8(tmp_path: Path) -> None:
    _npz(tmp_path / "s.npz", np.full((4, 32, 32, 3), 255, np.int64), np.arange(4))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), subset_file="s.npz", val_size=1)
    dm.setup("fit")
    assert dm.train_set is not None and dm.train_set.x.dtype == torch.uint8 and dm.train_set.x.shape == (3, 3, 32, 32)
    assert int(dm.train_set.x.min()) == 255


def _idx(path: Path, shape: tuple[int, ...], size: int | None = None) -> None:
    """A uint8 IDX file (MNIST's format) of ``shape``, cut to ``size`` bytes if given."""
    data = (0x0800 | len(shape)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    data += bytes(int(np.prod(shape)))
    path.write_bytes(data if size is None else data[:size])


def _mnist_raw(root: Path, train_images: int | None = None) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte", (60000, 28, 28) if train_images else (6, 28, 28), train_images)
    _idx(raw / "train-labels-idx1-ubyte", (6,))
    _idx(raw / "t10k-images-idx3-ubyte", (2, 28, 28))
    _idx(raw / "t10k-labels-idx1-ubyte", (2,))
    return raw


def test_mnist_small_intact_files_load(tmp_path: Path) -> None:
    _mnist_raw(tmp_path)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, val_size=1)
    dm.setup("fit")
    assert dm.train_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.test_set)) == (5, 2)


@pytest.mark.parametrize("download", [False, True])
def test_mnist_truncated_file_is_reported_as_damaged(tmp_path: Path, download: bool) -> None:
    """A raw file cut short is damaged, not missing: the message names it, its size and the size its header asks
    for, and says to delete it and download again (torchvision does not re-download files that are there)."""
    raw = _mnist_raw(tmp_path, train_images=1000)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=download)
    with pytest.raises(DataFileError, match=r"^MNIST file .*train-images-idx3-ubyte is damaged: 1,000 bytes, "
                                            r"expected 47,040,016 .*\(truncated\?\)\. Fix: delete the damaged file"
                                            r" .*--data.download true.*or copy intact files"):
        dm.setup("fit")
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte is damaged: 2 bytes, too short"):
        dm.setup("fit")
    _idx(raw / "train-images-idx3-ubyte", (5, 28, 28))
    with pytest.raises(DataFileError, match=r"train-labels-idx1-ubyte is damaged: 6 labels for the 5 images"):
        dm.setup("fit")


def test_mnist_failed_download_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With download=true and no network, the message quotes the download's failure and suggests copying the files,
    not turning on the download that is already on."""
    import torchvision.datasets.mnist

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network here")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=True)
    with pytest.raises(DataNotFoundError, match=r"^MNIST not found under .*empty.MNIST.raw .*and the download failed: "
                                                r"Error downloading .*no network here.*\. Fix: copy the four files "
                                                r"\(or their .gz files\) into .*or point DISTILL_DATA") as info:
        dm.prepare_data()
    assert "--data.download true" not in str(info.value) and "\n" not in str(info.value)


def test_cifar10_damaged_or_undownloadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network here")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match=r"^CIFAR-10 not found under .* and the download failed: "
                                                r".*no network here.*Fix: copy cifar-10-batches-py") as info:
        CIFAR10DataModule(data_dir=str(tmp_path), download=True).setup("fit")
    assert "--data.download true" not in str(info.value)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(b"cut short")
    for download in (False, True):
        with pytest.raises(DataFileError, match=r"^CIFAR-10 files under .*cifar-10-batches-py are damaged: "
                                                r"data_batch_1 \(9 bytes\).*fail torchvision's MD5 check.*Fix: "
                                                r"delete .*--data.download true"):
            CIFAR10DataModule(data_dir=str(tmp_path), download=download).setup("fit")
