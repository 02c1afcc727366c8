"""LightningDataModules: MNIST and CIFAR-10 over torchvision's datasets, and the embedded 8x8 digits.

The images are held in memory as one tensor per split and served a whole batch at a time (``__getitems__``), so
an epoch of a small network is not dominated by per-sample PIL decoding and collation. CIFAR-10's augmentation
(random crop with padding 4 + horizontal flip) runs batch-wise on the device in ``on_after_batch_transfer``.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from distill.errors import ConfigError, DistillError
from distill.module_utils import rng_states, set_rng_states

__all__ = [
    "CIFAR10DataModule",
    "DataFileError",
    "DataNotFoundError",
    "DigitsDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "ResumableDataLoader",
    "TensorBatchDataset",
    "TensorBatchSampler",
    "resolve_data_dir",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DataNotFoundError(DistillError, FileNotFoundError):
    """A data set's files are missing and could not be downloaded."""


class DataFileError(DistillError, ValueError):
    """A data set's file is there but cannot be used: truncated, corrupted, or not in the expected format."""


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message on one line (torchvision's download errors span several), cut to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data root: ``data_dir`` if given, else ``$DISTILL_DATA``, else ``$XDG_CACHE_HOME/distill/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("DISTILL_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "distill" / "data"


class TensorBatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs and labels held as tensors; a batch is fetched with one indexing operation.

    ``DataLoader`` calls ``__getitems__`` with the sampler's list of indices when it exists; paired with
    ``collate_fn=_as_is`` this skips per-sample collation (a standard sampler is kept, so Lightning can still
    swap in a ``DistributedSampler`` under DDP).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(indices, torch.Tensor):
            idx = indices
        else:  # through NumPy: torch.as_tensor on a list of 128 ints took ~20 us, NumPy ~8 us
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        # index_select, not x[idx]: for whole rows of a contiguous tensor it copies each row as one block, where
        # advanced indexing computes an offset per element: 62-76 us against 134-175 us for a batch of 128 MNIST
        # images on this CPU (1-2 threads), ~3% of a LeNet-300-100 step. Same values (tested).
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


def _as_is(batch: Any) -> Any:
    return batch


class TensorBatchSampler(BatchSampler):
    """A ``BatchSampler`` that yields each batch's indices as one tensor.

    Over a plain :class:`~torch.utils.data.RandomSampler` (the training loaders' default) the batches are slices of the
    permutation RandomSampler itself would draw (same seed, same order), without its per-index Python iteration and the
    list-to-tensor conversion: together ~80 us a step on a CPU, 2% of a LeNet-300-100 step. Over any other sampler
    (e.g. the ``DistributedSampler`` Lightning swaps in under DDP, re-creating this class with it, as it does for
    ``BatchSampler`` subclasses) it gathers that sampler's indices as ``BatchSampler`` does.
    """

    # Resuming in the middle of an epoch (distill's data modules make their training loaders resumable with these):
    # the state of the generator that drew the epoch's permutation is kept, and a resumed iteration draws the same
    # permutation and skips the batches already trained.
    epoch_generator_state: torch.Tensor | None = None
    _resume: tuple[torch.Tensor, int, Mapping[str, Any] | None] | None = None

    def resume_from(self, generator_state: torch.Tensor, skip: int, rng: Mapping[str, Any] | None = None) -> None:
        """Make the next iteration the rest of an interrupted epoch: its permutation (drawn by a generator in
        ``generator_state``) from batch ``skip`` on, with the global random states ``rng`` (as saved when it was
        interrupted) restored as it starts: after the draws that creating the iterator makes, which the interrupted
        run made before the checkpoint was taken."""
        self._resume = (generator_state, int(skip), rng)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        resume, self._resume = self._resume, None
        if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
            n = len(sampler.data_source)  # type: ignore[arg-type]
            generator = sampler.generator
            if resume is not None:  # the interrupted epoch's permutation, without drawing from any generator
                if resume[2] is not None:
                    set_rng_states(resume[2])
                if generator is None:
                    generator = torch.Generator()
                generator.set_state(resume[0])
            elif generator is None:  # as RandomSampler.__iter__ seeds itself from the global generator
                generator = torch.Generator()
                generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
            self.epoch_generator_state = generator.get_state()
            perm = torch.randperm(n, generator=generator)
            stop = n - n % self.batch_size if self.drop_last else n
            first = resume[1] * self.batch_size if resume is not None else 0
            for start in range(first, stop, self.batch_size):
                yield perm[start : start + self.batch_size]
            if sampler.generator is not None:  # RandomSampler draws and drops a second permutation at each epoch's
                torch.randperm(n, generator=generator)  # end: a generator it was given stays in step for later epochs
        else:
            yield from super().__iter__()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`TensorBatchSampler` that Lightning can save and restore mid-epoch.

    Lightning stores the ``state_dict()`` of a loader that has one in each checkpoint and hands it back to
    ``load_state_dict()`` on resume. Here that state is the generator state that drew the epoch's permutation, the
    batches done (``progress()``: Lightning's own count, so the next batch is the one Lightning trains next) and the
    global random states of that moment, so a run stopped mid-epoch (Ctrl-C writes ``last.ckpt``) resumes with the rest
    of that epoch's batches and ends as the uninterrupted run ends. A subclass, not attributes, so that the loader
    Lightning rebuilds around a ``DistributedSampler`` under DDP keeps the protocol (there the sampler shuffles by seed
    and epoch and nothing is restored; a single-process checkpoint still loads).

    Args:
        progress: ``() -> (batches done in the current epoch, epoch over, in the validation that closes it)``;
            ``None``: nothing to resume.
        *args, **kwargs: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, bool, bool]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        gen = sampler.epoch_generator_state if isinstance(sampler, TensorBatchSampler) else None
        done, over, closing = self.progress() if self.progress is not None else (0, True, False)
        return {"generator_state": gen, "completed_batches": done, "epoch_over": over, "rng": rng_states(),
                "closing_validation": closing}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sampler = self.batch_sampler
        gen, done = state.get("generator_state"), int(state.get("completed_batches", 0))
        # at an epoch's end (or before its start) the next iteration is a fresh epoch, as in the uninterrupted run
        if isinstance(sampler, TensorBatchSampler) and isinstance(gen, torch.Tensor) and 0 < done < len(sampler) \
                and not state.get("epoch_over", False):
            sampler.resume_from(gen, done, state.get("rng"))
        elif state.get("closing_validation") and state.get("rng") is not None:
            # Stopped in the validation that closes an epoch: Lightning resumes by running that validation again,
            # whose loader draws from the global generator as its iterator is made; the next epoch's iterator then
            # starts from the random states of the stop, as it did in the uninterrupted run.
            self._restore_rng = (state["rng"], done)

    _restore_rng: tuple[Mapping[str, Any], int] | None = None

    def _get_iterator(self) -> Any:
        pending = self._restore_rng
        # Lightning makes an iterator for the finished epoch it re-enters too (its batch count restored), and fetches
        # nothing from it: the states are restored for the next epoch's, before the DataLoader's iterator draws its
        # base seed, as in the uninterrupted run
        if pending is not None and not (self.progress is not None and self.progress()[0] >= pending[1]):
            self._restore_rng = None
            set_rng_states(pending[0])
        return super()._get_iterator()


class InMemoryDataModule(pl.LightningDataModule):
    """Base class: subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size for validation/test/predict (``None``: ``batch_size``).
        val_size: number of training samples carved out (fixed seed) for validation; 0 validates on the test set.
        seed: seed of the validation split.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        checks = (  # (argument, value, valid, what to set it to)
            ("batch_size", batch_size, _is_int(batch_size) and batch_size >= 1, "an integer >= 1", "1 or more"),
            ("eval_batch_size", eval_batch_size, eval_batch_size is None or (_is_int(eval_batch_size)
             and eval_batch_size >= 1), "an integer >= 1, or null for batch_size", "1 or more, or null"),
            ("val_size", val_size, _is_int(val_size) and val_size >= 0, "an integer >= 0",
             "0 (validate on the test set) or more"),
            ("num_workers", num_workers, _is_int(num_workers) and num_workers >= 0, "an integer >= 0",
             "0 (load in the main process, the fastest for in-memory data) or more"),
        )
        for arg, value, ok, valid, fix in checks:
            if not ok:
                raise ConfigError(f"{type(self).__name__}: {arg} must be {valid}, got {value!r}. Fix: set "
                                  f"data.init_args.{arg} to {fix} (the config file, or --data.{arg})")
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorBatchDataset | None = None
        self.val_set: TensorBatchDataset | None = None
        self.test_set: TensorBatchDataset | None = None

    def _split(
        self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
    ) -> None:
        if self.val_size >= len(y):
            raise ConfigError(
                f"{type(self).__name__}: val_size={self.val_size} leaves no training data (the training set has "
                f"{len(y)}). Fix: set data.init_args.val_size below {len(y)} (the config file, or --data.val_size)"
            )
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        if self.val_size:
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self.train_set = TensorBatchDataset(x[train_idx], y[train_idx])
            self.val_set = TensorBatchDataset(x[val_idx], y[val_idx])
        else:
            self.train_set = TensorBatchDataset(x, y)
            self.val_set = TensorBatchDataset(x_test, y_test)
        self.test_set = TensorBatchDataset(x_test, y_test)

    def _loader(self, ds: TensorBatchDataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run: call dm.setup('fit') first")
        if train:  # shuffled batches as index tensors (TensorBatchSampler)
            batching: dict[str, Any] = {"batch_sampler": TensorBatchSampler(RandomSampler(ds), self.batch_size, False)}
        else:
            batching = {"batch_size": self.eval_batch_size, "shuffle": False, "drop_last": False}
        loader_cls = ResumableDataLoader if train else DataLoader
        extra: dict[str, Any] = {"progress": self._epoch_progress} if train else {}
        return loader_cls(
            ds,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            persistent_workers=self.num_workers > 0,
            **batching,
            **extra,
        )

    def _epoch_progress(self) -> tuple[int, bool, bool]:
        """``(batches of the current epoch Lightning has processed, whether the epoch is over, whether the validation
        that closes it runs)``: where a resumed fit restarts (``limit_train_batches`` may end an epoch short of the
        loader's length)."""
        trainer = getattr(self, "trainer", None)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None:
            return 0, True, False
        done = int(loop.batch_progress.current.processed)
        over = done >= getattr(trainer, "num_training_batches", math.inf)
        return done, over, over and bool(getattr(trainer, "validating", False))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The ``(x, y)`` tensor pairs of these loaders go straight to the device; anything else the Lightning way.

        Lightning's generic transfer walks the batch as a nested collection (~0.5 ms a step on a CPU, a tenth of a
        LeNet-300-100 step). Here and not in the LightningModules: Lightning warns when a module overrides this hook
        and a data module is used, and distill's modules run with any data.
        """
        if type(batch) in (tuple, list) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
            return type(batch)(t.to(device, non_blocking=True) for t in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_problem(path: Path, ndim: int) -> tuple[int, str | None]:
    """``(number of items, None)`` for an intact uint8 IDX file of ``ndim`` dimensions (MNIST's format: a 4-byte
    magic number, one 4-byte big-endian size per dimension, then the bytes), or ``(0, what is wrong)``."""
    header = 4 + 4 * ndim
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(header)
    if len(head) < header:
        return 0, f"{size:,} bytes, too short even for the {header}-byte header of an MNIST (IDX) file"
    magic, expected_magic = int.from_bytes(head[:4], "big"), 0x0800 | ndim
    if magic != expected_magic:
        return 0, f"not an MNIST (IDX) file of uint8 data: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
    dims = [int.from_bytes(head[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1)]
    expected = header + math.prod(dims)
    if size != expected:
        shape = " x ".join(f"{d:,}" for d in dims)
        return 0, f"{size:,} bytes, expected {expected:,} for its header's {shape} (truncated?)"
    return dims[0], None


class MNISTDataModule(InMemoryDataModule):
    """MNIST (LeCun et al.) through ``torchvision.datasets.MNIST``, normalised with mean 0.1307 / std 0.3081.

    Args:
        data_dir: root holding ``MNIST/raw``; default ``$DISTILL_DATA`` or a user cache folder.
        download: let torchvision download missing files.
        **kwargs: see :class:`InMemoryDataModule`.
    """

    def __init__(self, data_dir: str | None = None, download: bool = True, **kwargs: int | None) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.data_dir = resolve_data_dir(data_dir)
        self.download = download

    def _not_found(self, cause: Exception | None) -> DataNotFoundError:
        raw = self.data_dir / "MNIST" / "raw"
        files = ", ".join(_MNIST_FILES)
        if self.download:  # torchvision tried to download them (it extracts intact .gz files without a network)
            return DataNotFoundError(
                f"MNIST not found under {raw} (looked for {files}, or their .gz files) and the download failed"
                + (f": {_one_line(cause)}" if cause else "")
                + f". Fix: copy the four files (or their .gz files) into {raw}, or point DISTILL_DATA or "
                f"--data.data_dir at a folder that holds MNIST/raw."
            )
        return DataNotFoundError(
            f"MNIST not found under {raw} (looked for {files}) and download=False. "
            f"Fix: point DISTILL_DATA or --data.data_dir at a folder that holds MNIST/raw, "
            f"or allow torchvision to download it with --data.download true."
            + (f" Cause: {_one_line(cause)}" if cause else "")
        )

    def _damaged(self, what: str, problem: str) -> DataFileError:
        raw = self.data_dir / "MNIST" / "raw"
        return DataFileError(
            f"MNIST {what} damaged: {problem}. Fix: delete the damaged file (or the folder {raw}) and run with "
            f"--data.download true to download MNIST again, or copy intact files ({', '.join(_MNIST_FILES)}) "
            f"into {raw}."
        )

    def _check_files(self) -> None:
        """Tell damaged raw files from missing ones before torchvision reads them (it fails on a truncated file with
        a reshape error). Only when all four are there: torchvision downloads the set when one is missing."""
        raw = self.data_dir / "MNIST" / "raw"
        paths = [raw / name for name in _MNIST_FILES]
        legacy = self.data_dir / "MNIST" / "processed"
        if not all(p.is_file() for p in paths) or all((legacy / f).is_file() for f in ("training.pt", "test.pt")):
            return
        counts = []
        for path in paths:
            try:
                count, problem = _idx_problem(path, ndim=3 if "images" in path.name else 1)
            except OSError:  # unreadable (permissions): torchvision's own attempt reports it
                return
            if problem is not None:
                raise self._damaged(f"file {path} is", problem)
            counts.append(count)
        for i in (0, 2):  # train-images with train-labels, t10k-images with t10k-labels
            if counts[i] != counts[i + 1]:
                raise self._damaged(f"file {paths[i + 1]} is",
                                    f"{counts[i + 1]:,} labels for the {counts[i]:,} images of {paths[i].name}")

    def _dataset(self, train: bool) -> object:
        from torchvision.datasets import MNIST

        self._check_files()
        try:
            return MNIST(str(self.data_dir), train=train, download=self.download)
        except (RuntimeError, OSError, AssertionError, TypeError, ValueError) as err:
            raw = self.data_dir / "MNIST" / "raw"
            if all((raw / name).is_file() for name in _MNIST_FILES) and not str(err).startswith("Error downloading"):
                raise self._damaged(f"files under {raw} are",
                                    f"torchvision cannot read them ({_one_line(err)})") from err
            raise self._not_found(err) from err

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(True)
            self._dataset(False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return

        def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            ds = self._dataset(train)
            x = ds.data.unsqueeze(1).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)  # type: ignore[attr-defined]
            return x, ds.targets.long()  # type: ignore[attr-defined]

        self._split(*tensors(True), *tensors(False))


_SUBSET_KEYS = ("x_train_first2000", "y_train_first2000", "x_test_first1000", "y_test_first1000")


def _fits_range(a: np.ndarray, high: int) -> bool:
    """Whether ``a`` holds integers (of any integer dtype) in ``0..high``."""
    return bool(np.issubdtype(a.dtype, np.integer) and (a.size == 0 or (a.min() >= 0 and a.max() <= high)))


def _fits_uint8(a: np.ndarray) -> bool:
    """Whether ``a`` is uint8, or integers that fit it: pixels 0..255 (not floats scaled to 0..1)."""
    return a.dtype == np.uint8 or _fits_range(a, 255)


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 (Krizhevsky, 2009) through ``torchvision.datasets.CIFAR10``.

    Images stay uint8 in memory; on the device they are augmented (training only: random crop with padding 4,
    horizontal flip) and normalised. ``subset_file`` reads an ``.npz`` holding ``x_train_first2000``,
    ``y_train_first2000``, ``x_test_first1000``, ``y_test_first1000`` (uint8 HWC) instead, for smoke tests.

    Args:
        data_dir: root holding ``cifar-10-batches-py``; default ``$DISTILL_DATA`` or a user cache folder.
        download: let torchvision download missing files.
        subset_file: optional ``.npz`` subset (absolute, or relative to ``data_dir``).
        augment: apply the training augmentation.
        **kwargs: see :class:`InMemoryDataModule`.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = True,
        subset_file: str | None = None,
        augment: bool = True,
        **kwargs: int | None,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.data_dir = resolve_data_dir(data_dir)
        self.download = download
        self.subset_file = subset_file
        self.augment = augment

    def _subset_path(self) -> Path:
        assert self.subset_file is not None
        p = Path(self.subset_file).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    def prepare_data(self) -> None:
        if self.subset_file is None and self.download:
            self._arrays(True)

    def _arrays(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(str(self.data_dir), train=train, download=self.download)
        except (RuntimeError, OSError) as err:
            folder = self.data_dir / CIFAR10.base_folder
            damaged = self._damaged_files()
            if damaged:  # all there, but torchvision's MD5 check fails (it then says "not found or corrupted")
                after = f" and the download that would replace them failed: {_one_line(err)}" if self.download else ""
                raise DataFileError(
                    f"CIFAR-10 files under {folder} are damaged: {', '.join(damaged)} fail torchvision's MD5 check "
                    f"(truncated or corrupted){after}. Fix: delete {folder} and run with --data.download true to "
                    f"download CIFAR-10 again, or copy intact files (from cifar-10-python.tar.gz) into it."
                ) from err
            looked = "looked for data_batch_1..5, test_batch and batches.meta"
            if self.download:
                raise DataNotFoundError(
                    f"CIFAR-10 not found under {folder} ({looked}) and the download failed: {_one_line(err)}. "
                    f"Fix: copy cifar-10-batches-py (or cifar-10-python.tar.gz) into {self.data_dir}, point "
                    f"DISTILL_DATA or --data.data_dir at a folder that holds it, or use --data.subset_file with an "
                    f".npz subset."
                ) from err
            raise DataNotFoundError(
                f"CIFAR-10 not found under {folder} ({looked}) and download=False. Fix: point DISTILL_DATA or "
                f"--data.data_dir at a folder that holds cifar-10-batches-py, allow --data.download true, or use "
                f"--data.subset_file with an .npz subset. Cause: {_one_line(err)}"
            ) from err
        return ds.data, np.asarray(ds.targets)

    def _damaged_files(self) -> list[str]:
        """The CIFAR-10 files that are there but fail torchvision's MD5 check, with their sizes; none if any of them
        is missing (then the data set is not there, rather than damaged)."""
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity

        folder = self.data_dir / CIFAR10.base_folder
        files = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
        if not all((folder / name).is_file() for name, _ in files):
            return []
        return [f"{name} ({(folder / name).stat().st_size:,} bytes)" for name, md5 in files
                if not check_integrity(folder / name, md5)]

    def _read_subset(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four arrays of a subset file, checked: uint8 images ``(N, 32, 32, 3)`` and ``N`` labels 0..9."""
        fix = (f"Fix: give as subset file an .npz written with np.savez(path, {_SUBSET_KEYS[0]}=x, "
               f"{_SUBSET_KEYS[1]}=y, {_SUBSET_KEYS[2]}=x_test, {_SUBSET_KEYS[3]}=y_test), images uint8 "
               f"(N, 32, 32, 3) (HWC, as CIFAR-10) and N labels 0..9 each.")
        with path.open("rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":
            raise DataFileError(f"CIFAR-10 subset file {path} is a single .npy array, not an .npz archive of the "
                                f"arrays {list(_SUBSET_KEYS)}. {fix}")
        if head[:4] != b"PK\x03\x04":
            raise DataFileError(f"CIFAR-10 subset file {path} is not an .npz archive (a zip file; this one starts "
                                f"with {head!r}). {fix}")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = list(getattr(z, "files", []))
                arrays = {k: z[k] for k in _SUBSET_KEYS if k in files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataFileError(f"CIFAR-10 subset file {path} cannot be read (a truncated or corrupted .npz, or "
                                f"arrays of Python objects: {_one_line(err)}). {fix}") from err
        missing = [k for k in _SUBSET_KEYS if k not in arrays]
        if missing:
            what = " (it looks like a PyTorch checkpoint)" if any(k.endswith("data.pkl") for k in files) else ""
            raise DataFileError(f"CIFAR-10 subset file {path} lacks arrays {missing}; it holds {sorted(files)[:10]}"
                                f"{what}. {fix}")
        xtr, ytr, xte, yte = (arrays[k] for k in _SUBSET_KEYS)
        for xk, yk, x, y in ((*_SUBSET_KEYS[:2], xtr, ytr), (*_SUBSET_KEYS[2:], xte, yte)):
            if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or not _fits_uint8(x):
                raise DataFileError(f"CIFAR-10 subset file {path}: {xk} is {x.dtype} of shape {x.shape}; expected "
                                    f"uint8 images of shape (N, 32, 32, 3). {fix}")
            if y.shape != (len(x),) or not _fits_range(y, self.num_classes - 1):
                raise DataFileError(f"CIFAR-10 subset file {path}: {yk} is {y.dtype} of shape {y.shape}; expected "
                                    f"({len(x)},) integer labels 0..{self.num_classes - 1}, one per image of {xk}. "
                                    f"{fix}")
        return xtr.astype(np.uint8, copy=False), ytr, xte.astype(np.uint8, copy=False), yte

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.subset_file is not None:
            path = self._subset_path()
            if not path.is_file():
                raise DataNotFoundError(
                    f"CIFAR-10 subset file {path} does not exist. Fix: pass an existing .npz to --data.subset_file "
                    f"(absolute, or relative to data_dir={self.data_dir})."
                )
            xtr, ytr, xte, yte = self._read_subset(path)
        else:
            xtr, ytr = self._arrays(True)
            xte, yte = self._arrays(False)

        def chw(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8

        self._split(chw(xtr), torch.from_numpy(ytr).long(), chw(xte), torch.from_numpy(yte).long())

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> object:
        x, y = batch
        x = x.float().div_(255.0)  # (B, 3, 32, 32)
        if self.augment and self.trainer is not None and self.trainer.training:
            x = random_crop_flip(x, padding=4)
        mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std, y


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch-wise random crop (zero padding) and horizontal flip, as torchvision's RandomCrop + RandomHorizontalFlip.

    Args:
        x: images ``(B, C, H, W)``.
        padding: zero padding on every side before cropping back to ``H x W``.
        generator: optional random generator (on ``x``'s device).

    Returns:
        The augmented batch, same shape.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None]).view(b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None]).view(b, 1, 1, w)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip.view(b, 1, 1, 1), cols.flip(-1), cols)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    return padded.permute(0, 2, 3, 1)[bidx, rows, cols].squeeze(1).permute(0, 3, 1, 2).contiguous()


_DIGITS_IMAGES = 1797  # in scikit-learn's digits


class DigitsDataModule(InMemoryDataModule):
    """The 8x8 handwritten digits that ship with scikit-learn (1,797 images): the embedded quickstart data set.

    No download is needed. A fixed-seed split keeps ``test_size`` images for test and ``val_size`` for validation.

    Args:
        test_size: images held out for test.
        **kwargs: see :class:`InMemoryDataModule` (``val_size`` defaults to 200 here).
    """

    def __init__(self, test_size: int = 300, val_size: int = 200, **kwargs: int | None) -> None:
        super().__init__(val_size=val_size, **kwargs)  # type: ignore[arg-type]
        n, name = _DIGITS_IMAGES, type(self).__name__  # at least one image for test and one for training
        if not _is_int(test_size) or not 1 <= test_size <= n - 1:
            lower = ", or lower val_size" if _is_int(test_size) and test_size > n - 1 - val_size else ""
            raise ConfigError(
                f"{name}: test_size={test_size!r} leaves no {'test' if lower == '' else 'training'} data (the digits "
                f"have {n} images: test_size for test, val_size={val_size} for validation, the rest for training). "
                f"Fix: set data.init_args.test_size between 1 and {max(1, n - 1 - val_size)}{lower} (the config "
                f"file, or --data.test_size)"
            )
        if test_size + val_size > n - 1:  # as _split would find, but before anything is set up
            raise ConfigError(
                f"{name}: val_size={val_size} leaves no training data (the training set has {n - test_size} images: "
                f"the digits' {n} less test_size={test_size} for test). Fix: set data.init_args.val_size between 0 "
                f"and {n - 1 - test_size}, or lower test_size (the config file, or --data.val_size)"
            )
        self.test_size = test_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
        x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
        y = torch.from_numpy(digits.target).long()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed + 1))
        test, rest = perm[: self.test_size], perm[self.test_size :]
        self._split(x[rest], y[rest], x[test], y[test])
