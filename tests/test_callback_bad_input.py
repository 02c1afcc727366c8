"""Bad arguments of the compression callbacks fail with a ConfigError that names them, before any training step."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from distill.callbacks import MagnitudePruning, PruneQuantize
from distill.compress.params import network_of
from distill.errors import ConfigError
from models import MLP
from tests.conftest import random_loader


class Counting(pl.LightningModule):
    """A plain module holding its network as ``model`` (as a ``Classifier`` does); counts its training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MLP(16, (8,), 4)  # model.fc1.weight, model.fc2.weight
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_fails_before_training(callback: pl.Callback, match: str, tmp_path: Any) -> ConfigError:
    """Fit ``Counting`` with ``callback``; the ConfigError matching ``match``, raised before any training step."""
    module = Counting()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, default_root_dir=str(tmp_path), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    with pytest.raises(ConfigError, match=match) as info:
        trainer.fit(module, random_loader(16, (1, 4, 4), 4, 8))
    assert module.steps == 0 and trainer.global_step == 0
    return info.value


# ---------------------------------------------------------------- PruneQuantize: numeric arguments, in __init__
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"finetune_lr": -1, "finetune_epochs": 1}, r"finetune_lr must be a number > 0 .*got -1\. Fix: change "
                                                     r"finetune_lr"),
        ({"finetune_lr": 0.0}, r"finetune_lr must be a number > 0"),
        ({"finetune_lr": float("nan")}, r"finetune_lr must be a number > 0"),
        ({"finetune_batches": 0}, r"finetune_batches must be an integer >= 1 .*got 0\. Fix: change finetune_batches"),
        ({"finetune_batches": 2.5}, r"finetune_batches must be an integer >= 1"),
        ({"finetune_epochs": 1.5}, r"finetune_epochs must be >= 0, an integer"),
        ({"finetune_epochs": True}, r"finetune_epochs must be >= 0, an integer"),
        ({"quality": -0.5}, r"quality must be >= 0 .*got -0\.5"),
        ({"quality": float("inf")}, r"quality must be >= 0"),
        ({"sparsity": float("nan")}, r"sparsity must be in \[0, 1\]"),
        ({"bits_conv": 0}, r"PruneQuantize: bits_conv: bits must be an integer in 1\.\.16, got 0"),
        ({"bits_fc": 3.0}, r"PruneQuantize: bits_fc: bits must be an integer in 1\.\.16, got 3\.0"),
        ({"module_attr": ""}, r"module_attr must be the name of"),
    ],
)
def test_prune_quantize_rejects_bad_numbers_in_init(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        PruneQuantize(**kwargs)
    assert str(info.value).startswith("PruneQuantize: ") and "Fix: " in str(info.value)


def test_prune_quantize_accepts_good_numbers() -> None:
    pq = PruneQuantize(finetune_lr=1, finetune_epochs=2, finetune_batches=3, quality=0, bits_conv=16, bits_fc=1)
    assert (pq.finetune_lr, pq.finetune_batches) == (1, 3)


# ---------------------------------------------------------------- PruneQuantize: module_attr, at fit start
def test_prune_quantize_misspelled_module_attr_fails_before_training(tmp_path: Any) -> None:
    err = fit_fails_before_training(
        PruneQuantize(module_attr="modle"),
        r"PruneQuantize: module_attr='modle' is not an nn.Module attribute of Counting \(did you mean 'model'\?\); "
        r"valid: 'model'\. Fix: set module_attr",
        tmp_path,
    )
    assert isinstance(err, ValueError)  # `except ValueError` keeps working


def test_network_of_names_the_valid_module_attributes() -> None:
    class Distiller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Linear(2, 2)
            self.teacher = nn.Linear(2, 2)
            self.scale = 2.0

    with pytest.raises(ConfigError, match=r"module_attr='studnet' is not an nn.Module attribute of Distiller "
                                          r"\(did you mean 'student'\?\); valid: 'student', 'teacher'\. Fix: "):
        network_of(Distiller(), "studnet")
    with pytest.raises(ConfigError, match=r"module_attr='scale' .*valid: 'student', 'teacher'"):
        network_of(Distiller(), "scale")  # an attribute, but not a network


# ---------------------------------------------------------------- MagnitudePruning: names, at setup
def test_pruning_unknown_parameter_names_fail_before_training(tmp_path: Any) -> None:
    fit_fails_before_training(
        MagnitudePruning(quality=1.0, parameter_names=["model.fc9.weight"]),
        r"MagnitudePruning: parameter_names \['model.fc9.weight'\] are not parameters of Counting; "
        r"valid: 'model.fc1.weight', 'model.fc2.weight' .*Fix: correct parameter_names",
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"\['model.fc1.wieght'\] are not parameters of Counting \(did you mean "
                                          r"'model.fc1.weight' for 'model.fc1.wieght'\?\); valid: "):
        MagnitudePruning(quality=1.0, parameter_names=["model.fc1.wieght"]).filter_parameters(Counting())


def test_pruning_sparsity_key_naming_no_layer_fails_before_training(tmp_path: Any) -> None:
    err = fit_fails_before_training(
        MagnitudePruning(sparsity={"fc9": 0.5}),
        r"'fc9' is not a layer of Counting that this callback prunes; valid: 'model.fc1', 'model.fc2' .*Fix: ",
        tmp_path,
    )
    assert "has no entry" not in str(err)  # the unknown key is the problem, not the layers it fails to cover


def test_pruning_sparsity_mapping_missing_layers_fails_before_training(tmp_path: Any) -> None:
    fit_fails_before_training(
        MagnitudePruning(sparsity={"fc1": 0.5}),
        r"sparsity mapping \['fc1'\] has no entry for 'model.fc2' of Counting \(nor a '\*' default\)\. Fix: add",
        tmp_path,
    )


def test_pruning_sparsity_mapping_that_covers_every_layer_trains(tmp_path: Any) -> None:
    module = Counting()
    pruning = MagnitudePruning(sparsity={"fc1": 0.5, "model.fc2.weight": 0.25})
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, default_root_dir=str(tmp_path), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning],
    )
    trainer.fit(module, random_loader(16, (1, 4, 4), 4, 8))
    assert module.steps == 1
    assert pruning.sparsity_by_layer() == pytest.approx({"model.fc1": 0.5, "model.fc2": 0.25}, abs=1 / 32)
