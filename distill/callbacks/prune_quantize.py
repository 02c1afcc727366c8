"""The last stage of Deep Compression at the end of training: share weights, write the file, evaluate what was written.

Han, Mao & Dally, "Deep Compression" (ICLR 2016): per layer, prune (optionally, usually already done by
:class:`~distill.callbacks.MagnitudePruning`), k-means weight sharing with linear initialisation (8 bits for
convolutions, 5 for dense layers in the paper), optional trained quantization of the shared values, then Huffman
coding into a relative-index sparse file. With a ``GMMPrior`` callback in the trainer (soft weight-sharing, Ullrich,
Meeds & Welling 2017), its merged mixture is the codebook instead of k-means.

The test accuracy reported as ``decoded`` is measured on the model read back from the file.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import RunningStage
from torch import nn
from typing_extensions import override

from distill.callbacks.checkpoint import training_skipped_on_resume
from distill.callbacks.gmm_prior import GMMPrior
from distill.compress.kmeans import clusters_for_bits
from distill.compress.params import network_of
from distill.compress.pipeline import RAW_DTYPES, deep_compress, result_summary
from distill.compress.quantize import FINETUNE_MODES
from distill.errors import ConfigError
from distill.io import run_folder

__all__ = ["PruneQuantize"]


class _Limited:
    """Re-iterable view of the first batches of a loader, as ``limit_*_batches`` (an int, or a fraction) asks."""

    def __init__(self, loader: Any, limit: int | float | None) -> None:
        self.loader = loader
        n = len(loader) if hasattr(loader, "__len__") else None
        if limit is None or (isinstance(limit, float) and limit >= 1.0) or n is None:
            self.count = n
        elif isinstance(limit, int):
            self.count = min(limit, n)
        else:
            self.count = max(1, int(n * limit))

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.count)


CODEBOOKS = ("gmm", "kmeans")


def _codebook_source(with_prior: bool, codebook: str) -> str:
    if not with_prior:
        return "kmeans"
    return "GMMPrior" if codebook == "gmm" else "GMMPrior zeros, kmeans"


def _fix(arg: str) -> str:
    return (f"Fix: change {arg} in the init_args of the PruneQuantize callback (trainer.callbacks in the config file, "
            "or on the command line)")


def _bad(arg: str, value: Any, expected: str) -> ConfigError:
    """The error for argument ``arg``: its value, what is expected and where to change it."""
    return ConfigError(f"PruneQuantize: {arg} must be {expected}, got {value!r}. {_fix(arg)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _find_gmm_prior(trainer: pl.Trainer) -> GMMPrior | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, GMMPrior):
            return cb
    return None


class PruneQuantize(Callback):
    """At the end of training, compress the network into a file and report its size and decoded accuracy.

    Writes into the run folder: the compressed file, ``compression_report.json``/``.md`` and ``accuracy.json``
    (``before``/``quantized``/``decoded`` test accuracy); logs ``compress/rate``, ``compress/file_bytes`` and
    ``compress/test_acc``.

    Args:
        bits_conv: code bits for convolution weights (Han: 8).
        bits_fc: code bits for dense weights (Han: 5).
        quality: prune ``|w| < quality * std`` before sharing (None: keep the zeros training left).
        sparsity: or prune to this fraction of zeros.
        finetune_epochs: epochs of trained quantization over the training data (0: none).
        finetune_lr: learning rate of the trained quantization (SGD on the shared values, Adam on the weights).
        finetune: what the trained quantization trains: ``"centroids"`` (default; Han et al.: the shared values, every
            weight keeping its cluster) or ``"weights"`` (quantization-aware training of the weights through their
            nearest shared value, the codebooks kept as their k-means; pruned weights stay zero). On LeNet-300-100,
            one epoch from a trained network (``benchmarks/bench_nni_quant.py``): 2 bits 97.95% against 94.21% for
            the centroids, the same at 4-5 bits; the weights want a smaller learning rate (3e-5 to 1e-4).
        finetune_batches: at most this many batches per fine-tuning epoch (default: as many as the trainer's training
            epochs have, so ``limit_train_batches`` limits the fine-tuning too).
        filename: the compressed file, relative to the run folder (or absolute).
        module_attr: attribute of the LightningModule holding the network; default ``student``, else ``model``,
            else the LightningModule itself.
        use_gmm_prior: use a ``GMMPrior`` callback's quantization when one is present.
        codebook: with a ``GMMPrior``: ``"gmm"`` (default, Ullrich et al.) sets every weight to its merged component's
            mean, one codebook for all layers (the trained quantization then tunes each layer's copy of its non-zero
            values, at most J+1 values a layer); ``"kmeans"`` takes only the prior's zeros (the merged zero component's
            members set to 0) and shares the other weights by k-means per layer with ``bits_conv`` / ``bits_fc``
            bits (Han et al.), then the trained quantization. On LeNet5Caffe (``configs/mnist/lenet5_caffe_sws.yaml``,
            three seeds re-quantized from their checkpoints, BENCHMARKS.md) the prior's dozen means cost 0.08-0.19
            points of test accuracy, 4-bit k-means 0.06-0.12 in a 2.5-4% larger file, 5-bit nothing in a 13-15%
            larger one.
        evaluate: measure test accuracy (needs ``trainer.datamodule.test_dataloader()``).
        clear_dead_units: zero the weights and biases of hidden units and channels left without inputs or outputs
            (exact; see :func:`distill.compress.structure.remove_dead_units`).
        raw_dtype: ``"float16"`` stores the tensors that are not weight-shared (biases, batch norm) rounded to float16
            (half the bytes; the reported accuracies include the rounding); ``"float32"`` keeps them exact.

    Raises:
        ConfigError: (a ``ValueError``) on a misconfiguration, naming the argument: in ``__init__``, or for a
            ``module_attr`` that the LightningModule lacks, in ``on_fit_start`` (before any training step).
    """

    _train_ended = False  # on_train_end ran in this fit (see on_fit_end)

    def __init__(
        self,
        bits_conv: int = 8,
        bits_fc: int = 5,
        quality: float | None = None,
        sparsity: float | None = None,
        finetune_epochs: int = 0,
        finetune_lr: float = 1e-4,
        finetune_batches: int | None = None,
        finetune: str = "centroids",
        filename: str = "model.dstl",
        module_attr: str | None = None,
        use_gmm_prior: bool = True,
        codebook: str = "gmm",
        evaluate: bool = True,
        raw_dtype: str = "float32",
        clear_dead_units: bool = True,
    ) -> None:
        super().__init__()
        if raw_dtype not in RAW_DTYPES:
            raise _bad("raw_dtype", raw_dtype, f"one of {RAW_DTYPES}")
        for arg, bits in (("bits_conv", bits_conv), ("bits_fc", bits_fc)):
            try:
                clusters_for_bits(bits)  # raises with the value if out of range
            except ValueError as err:
                raise ConfigError(f"PruneQuantize: {arg}: {err} (Han et al.: 8 for convolutions, 5 for dense "
                                  f"layers). {_fix(arg)}") from None
        if quality is not None and sparsity is not None:
            raise ConfigError(f"PruneQuantize: give quality or sparsity, not both (quality={quality}, "
                              f"sparsity={sparsity}). Fix: remove one of them from the PruneQuantize callback's "
                              "init_args (trainer.callbacks in the config file)")
        if quality is not None and not (_is_number(quality) and math.isfinite(quality) and quality >= 0):
            raise _bad("quality", quality, ">= 0 (prune |w| < quality * std), or None")
        if sparsity is not None and not (_is_number(sparsity) and 0 <= sparsity <= 1):
            raise _bad("sparsity", sparsity, "in [0, 1] (the fraction of zeros), or None")
        if codebook not in CODEBOOKS:
            raise _bad("codebook", codebook, f"one of {CODEBOOKS}")
        if not _is_int(finetune_epochs) or finetune_epochs < 0:
            raise _bad("finetune_epochs", finetune_epochs, ">= 0, an integer number of epochs (0: no fine-tuning)")
        if not (_is_number(finetune_lr) and math.isfinite(finetune_lr) and finetune_lr > 0):
            raise _bad("finetune_lr", finetune_lr, "a number > 0 (the learning rate of the trained "
                       "quantization, e.g. 1e-4)")
        if finetune not in FINETUNE_MODES:
            raise _bad("finetune", finetune, f"one of {FINETUNE_MODES} (train the shared values, or the weights)")
        if finetune_batches is not None and (not _is_int(finetune_batches) or finetune_batches < 1):
            raise _bad("finetune_batches", finetune_batches, "an integer >= 1 (batches per fine-tuning epoch), or "
                       "None for as many as the trainer's training epochs have")
        if not filename:
            raise _bad("filename", filename, "a non-empty path (relative to the run folder, or absolute)")
        if module_attr is not None and (not isinstance(module_attr, str) or not module_attr):
            raise _bad("module_attr", module_attr, "the name of the LightningModule's attribute holding the network, "
                       "or None")
        self.bits_conv = bits_conv
        self.bits_fc = bits_fc
        self.quality = quality
        self.sparsity = sparsity
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.finetune_batches = finetune_batches
        self.finetune = finetune
        self.filename = filename
        self.module_attr = module_attr
        self.use_gmm_prior = use_gmm_prior
        self.codebook = codebook
        self.evaluate = evaluate
        self.raw_dtype = raw_dtype
        self.clear_dead_units = clear_dead_units
        self.result: dict[str, Any] | None = None
        self.note: str | None = None

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network to compress (see ``module_attr``)."""
        return network_of(pl_module, self.module_attr)[0]

    def _loader(self, trainer: pl.Trainer, kind: str) -> Any | None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return None
        try:
            dm.setup("test" if kind == "test" else "fit")
            return getattr(dm, f"{kind}_dataloader")()
        except Exception as err:  # noqa: BLE001 - any datamodule: report and continue without accuracy
            self.note = f"no {kind} data: {type(err).__name__}: {err}"
            return None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = False
        try:  # a wrong module_attr would otherwise fail only at the end of training (configure_model has run now)
            self.network(pl_module)
        except ConfigError as err:
            raise ConfigError(f"PruneQuantize: {err}") from None
        gmm = _find_gmm_prior(trainer) if self.use_gmm_prior else None
        if gmm is not None:  # this callback quantizes with the prior itself, after measuring the trained accuracy
            gmm.quantize_on_end = False

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed from a checkpoint of a finished training (stopped during this end-of-training work): Lightning
        # skips the training loop and on_train_end, so the work is done here (before FigureLogger draws, at teardown)
        if not self._train_ended and training_skipped_on_resume(trainer):
            self.on_train_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_ended = True
        if trainer.is_global_zero:
            self.compress(trainer, pl_module)

    def compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the compression now (also usable outside ``on_train_end``)."""
        net = self.network(pl_module)
        gmm = _find_gmm_prior(trainer) if self.use_gmm_prior else None
        folder = run_folder(trainer)
        path = Path(self.filename) if Path(self.filename).is_absolute() else folder / self.filename
        test_loader = self._loader(trainer, "test") if self.evaluate else None
        if test_loader is not None:  # Lightning's limit_test_batches limits these evaluations too
            test_loader = _Limited(test_loader, getattr(trainer, "limit_test_batches", 1.0))
        if self.evaluate and test_loader is None and self.note is None:
            self.note = "no datamodule with a test_dataloader(): accuracies skipped"
        train_loader = self._loader(trainer, "train") if self.finetune_epochs > 0 else None
        dm = getattr(trainer, "datamodule", None)
        hook = getattr(dm, "on_after_batch_transfer", None)

        def transform(batch: Any) -> Any:  # the datamodule's device-side preprocessing, evaluation mode
            if hook is None:
                return batch
            stage = trainer.state.stage
            trainer.state.stage = RunningStage.TESTING  # no training augmentation
            try:
                return hook(batch, 0)
            finally:
                trainer.state.stage = stage

        self.result = deep_compress(
            net,
            path,
            bits_conv=self.bits_conv,
            bits_fc=self.bits_fc,
            quality=self.quality,
            sparsity=self.sparsity,
            # after the "before" accuracy: every weight to its component's mean, the zero component's to 0
            share=(lambda: gmm.quantize(pl_module)) if gmm is not None and self.codebook == "gmm" else None,
            # or only the zero component's members to 0, the rest to per-layer k-means codebooks
            prune=gmm.zero_members if gmm is not None and self.codebook == "kmeans" else None,
            finetune_loader=train_loader,
            finetune_epochs=self.finetune_epochs,
            finetune_lr=self.finetune_lr,
            finetune_batches=self._finetune_batches(trainer),
            finetune=self.finetune,
            test_loader=test_loader,
            report_dir=folder,
            meta={"codebook_source": _codebook_source(gmm is not None, self.codebook), "note": self.note},
            batch_transform=transform,
            raw_dtype=self.raw_dtype,
            clear_dead_units=self.clear_dead_units,
        )
        totals = self.result["report"]["totals"]
        if trainer.logger is not None:
            metrics = {"compress/rate": totals["compression_rate"], "compress/file_bytes": float(totals["file_bytes"])}
            if self.result["accuracy"]["decoded"] is not None:
                metrics["compress/test_acc"] = self.result["accuracy"]["decoded"]
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        return self.result

    def _finetune_batches(self, trainer: pl.Trainer) -> int | None:
        if self.finetune_batches is not None:
            return self.finetune_batches
        n = getattr(trainer, "num_training_batches", None)
        return int(n) if isinstance(n, (int, float)) and math.isfinite(n) and n > 0 else None

    def output_paths(self) -> dict[str, str]:
        """Files written (for the CLI's summary)."""
        if self.result is None:
            return {}
        return {k: str(v) for k, v in self.result["paths"].items()}

    def summary(self) -> dict[str, str]:
        """What the compression gave, one line each (for the CLI's summary): the rate and the test accuracy before,
        quantized and read back from the file."""
        if self.result is None:
            return {}
        return result_summary(self.result, self.note or "evaluate=False")
