"""A network built for other data fails its first batch with an error that names it, not torch's shape error."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import ConfigError
from distill.module_utils import batch_error
from distill.modules import Classifier, Distiller
from models.lenet import MLP


def _batch(n: int = 16, features: int = 64, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return torch.randn(n, features, generator=g), y


def test_batch_error_names_the_network_and_the_mismatch() -> None:
    batch = _batch()
    wide = nn.Sequential(nn.Linear(784, 10))
    err = batch_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), [("teacher", wide)], batch)
    assert isinstance(err, ConfigError)
    assert str(err).startswith("the teacher (Sequential) cannot take this data's inputs: a batch of shape (16, 64) "
                               "(torch.float32) fails in its forward (RuntimeError: mat1 and mat2")
    few = nn.Sequential(nn.Linear(64, 5))
    err = batch_error(IndexError("Target 8 is out of bounds."), [("model", few)], batch)
    assert isinstance(err, ConfigError)
    assert "the model (Sequential) has 5 outputs, but this data's labels go up to 9. Fix: build it with 10 classes" \
        in str(err)
    ten = nn.Sequential(nn.Linear(64, 10))
    twelve = nn.Sequential(nn.Linear(64, 12))
    err = batch_error(RuntimeError("size mismatch"), [("student", twelve), ("teacher", ten)], batch, same_outputs=True)
    assert isinstance(err, ConfigError) and "gives outputs of shape (16, 12) and the teacher (Sequential) (16, 10)" \
        in str(err)
    original = RuntimeError("something else")  # the networks take the batch: the error is not theirs, kept as is
    assert batch_error(original, [("student", ten)], batch) is original
    assert batch_error(original, [("student", twelve), ("teacher", ten)], batch) is original  # not compared
    oom = torch.OutOfMemoryError("out of memory")
    assert batch_error(oom, [("teacher", wide)], batch) is oom


def test_batch_error_leaves_no_trace_in_the_networks() -> None:
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 5))
    net.train()
    net[2].eval()  # a submodule in its own mode stays so
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert isinstance(batch_error(IndexError("Target 9"), [("model", net)], _batch()), ConfigError)
    assert [m.training for m in net.modules()] == [True, True, True, False, True]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)


def _trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)


def test_classifier_and_distiller_name_the_network_that_cannot_take_the_data(tmp_path: Path) -> None:
    x, y = _batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(ConfigError, match=r"the model \(MLP\) cannot take this data's inputs: a batch of shape "
                                          r"\(16, 64\)"):
        _trainer(tmp_path).fit(Classifier(MLP(in_features=784, hidden_sizes=[8])), loader)
    with pytest.raises(ConfigError, match=r"the model \(MLP\) has 5 outputs, but this data's labels go up to 9"):
        _trainer(tmp_path).validate(Classifier(MLP(in_features=64, hidden_sizes=[8], num_classes=5)), loader)
    student = MLP(in_features=64, hidden_sizes=[8])
    with pytest.raises(ConfigError, match=r"the teacher \(MLP\) cannot take this data's inputs"):
        _trainer(tmp_path).fit(Distiller(student, MLP(in_features=784, hidden_sizes=[8])), loader)
    with pytest.raises(ConfigError, match=r"the student \(MLP\) gives outputs of shape \(16, 10\) and the teacher "
                                          r"\(MLP\) \(16, 12\)"):
        _trainer(tmp_path).fit(Distiller(student, MLP(in_features=64, hidden_sizes=[8], num_classes=12)), loader)
    # the networks right for the data train as before
    _trainer(tmp_path).fit(Distiller(student, MLP(in_features=64, hidden_sizes=[8])), loader)


def test_layers_without_layerwise_mode_warn() -> None:
    with pytest.warns(UserWarning, match=r"layers \{'fc1': 'fc1'\} are not used with mode='end_to_end'"):
        Distiller(MLP(in_features=64, hidden_sizes=[8]), MLP(in_features=64, hidden_sizes=[8]), layers={"fc1": "fc1"})
