"""The LeNet-300-100 compression pipeline end to end on real MNIST, at reduced length (issue 7).

A teacher is trained for a few hundred steps, then the headline recipe runs in miniature: the teacher's weights are
loaded, pruned gradually per layer, shared with 4-bit k-means and fine-tuned, written to a ``.dstl`` file, read back,
and the decoded network is evaluated on the 10,000 test images. The full-length runs are benchmarks
(``BENCHMARKS.md``), not tests.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from distill.callbacks import LoadWeights, MagnitudePruning, PruneQuantize
from distill.compress import load_compressed, read_header
from distill.data import MNISTDataModule
from distill.modules import Classifier
from models import LeNet300100


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    base = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return pl.Trainer(**{**base, **kwargs})


def test_lenet300_100_pipeline_on_real_mnist(mnist_root: Path, tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(mnist_root), download=False, batch_size=128, val_size=5000)
    adam = partial(torch.optim.Adam, lr=1e-3)

    teacher = Classifier(LeNet300100(), optimizer=adam)
    trainer = _trainer(tmp_path / "teacher", max_epochs=1, limit_train_batches=300)
    trainer.fit(teacher, datamodule=dm)
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)

    student = Classifier(LeNet300100(), optimizer=adam)
    pruning = MagnitudePruning(sparsity={"fc1": [0.8, 0.95], "fc2": [0.7, 0.9], "fc3": [0.3, 0.5]}, prune_epochs=[0, 1])
    compress = PruneQuantize(bits_fc=4, finetune_epochs=1, finetune_batches=50)
    run = tmp_path / "student"
    trainer = _trainer(
        run, max_epochs=3, limit_train_batches=100, callbacks=[LoadWeights(str(ckpt)), pruning, compress]
    )
    trainer.fit(student, datamodule=dm)

    accuracy = json.loads((run / "accuracy.json").read_text())
    totals = json.loads((run / "compression_report.json").read_text())["totals"]
    path = run / "model.dstl"
    # the file holds exactly the network that was evaluated in memory
    decoded = load_compressed(path)
    for name, value in student.model.state_dict().items():
        assert torch.equal(decoded.state_dict()[name], value), name
    assert accuracy["decoded"] == accuracy["quantized"]
    assert accuracy["before"] > 0.9 and accuracy["decoded"] > 0.9, accuracy  # measured: 95.4% / 95.3%
    # sizes: ~94% of the weights pruned, 4-bit codes; the report's size is the file's size
    assert totals["file_bytes"] == path.stat().st_size == read_header(path)["file_bytes"]
    assert 0.05 < totals["nonzero_fraction"] < 0.065
    assert totals["compression_rate"] > 40, totals  # measured: 54.1x (19,712 bytes)
    assert totals["file_bytes"] <= 1.1 * totals["entropy_bound_bytes"]
