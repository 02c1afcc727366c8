"""Classifier: training on labels, metrics, checkpoint round trip without pickled modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from distill.data import DigitsDataModule
from distill.modules import Classifier
from models import MLP


def test_classifier_learns_and_checkpoint_round_trips(tmp_path: Path, trainer_kwargs: dict[str, Any]) -> None:
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(MLP(64, (64,), 10), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer_kwargs.update(max_epochs=5, enable_checkpointing=True, callbacks=[ckpt])
    trainer = pl.Trainer(**trainer_kwargs)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    assert acc > 0.85  # 8x8 digits are easy: a few epochs of an MLP reach ~95%

    path = Path(ckpt.last_model_path)
    raw = torch.load(path, weights_only=True)  # nothing pickled but plain data
    assert raw["hyper_parameters"]["model"] == {
        "class_path": "models.lenet.MLP",
        "init_args": {"in_features": 64, "hidden_sizes": [64], "num_classes": 10, "input_shape": None},
    }
    restored = Classifier.load_from_checkpoint(path)
    acc2 = pl.Trainer(**{**trainer_kwargs, "callbacks": []}).test(restored, dm, verbose=False)[0]["test/acc"]
    assert acc2 == acc


def test_classifier_logs_namespaced_metrics(trainer_kwargs: dict[str, Any]) -> None:
    trainer_kwargs.update(limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs)
    trainer.fit(Classifier(MLP(64, (16,), 10)), DigitsDataModule(batch_size=32))
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_classifier_rejects_non_module() -> None:
    import pytest

    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Classifier(model=42)  # type: ignore[arg-type]


def test_fit_with_a_data_module_warns_about_no_batch_hook(trainer_kwargs: dict[str, Any]) -> None:
    """The fast (x, y) transfer lives in the data module only: no 'overridden in both' warning on every run."""
    import warnings

    from distill.distillation import Distiller

    teacher = MLP(64, (16,), 10)
    for module in (Classifier(MLP(64, (16,), 10)), Distiller(MLP(64, (16,), 10), teacher)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pl.Trainer(**{**trainer_kwargs, "limit_train_batches": 2, "limit_val_batches": 1}).fit(
                module, DigitsDataModule(batch_size=32)
            )
        assert not [w for w in caught if "transfer_batch_to_device" in str(w.message)]


def test_optimizer_skips_the_graph_capture_check_only_without_an_accelerator() -> None:
    """The per-step capture check is a no-op without a GPU (an NVML dlopen under Lightning): it is dropped there only,
    and the optimizer still steps exactly like torch's."""
    from distill.module_utils import _accelerator_available

    torch.manual_seed(0)
    net = MLP(64, (16,), 10)
    ref = MLP(64, (16,), 10)
    ref.load_state_dict(net.state_dict())
    module = Classifier(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    opt = module.configure_optimizers()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    skipped = "_accelerator_graph_capture_health_check" in vars(opt) or "_cuda_graph_capture_health_check" in vars(opt)
    assert skipped == (not _accelerator_available())
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for m, o in ((net, opt), (ref, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"][0]["lr"] == 1e-2


def test_gmm_prior_optimizer_always_skips_the_capture_check() -> None:
    """The mixture's Adam runs inside a callback, never in a captured graph: its check is dropped even with a GPU."""
    from distill.callbacks import GMMPrior

    opt = GMMPrior(num_components=4)._build_optimizer()
    assert isinstance(opt, torch.optim.Adam)
    names = ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check")  # torch >= / < 2.6
    assert any(vars(opt).get(name) is not None for name in names)
    assert {g["name"] for g in opt.param_groups} == {"means", "log_precisions", "mixing"}


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    from distill.module_utils import rng_states, set_rng_states

    torch.save(rng_states(), tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_distill_fit_resumed_at_an_epoch_boundary_ends_like_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The training loader shuffles with the global generator; the checkpoint restores it (ResumableRNGMixin)."""
    from distill.cli import main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    base = ["fit", "-c", str(REPO / "configs" / "quickstart" / "teacher.yaml"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main([*base, "--trainer.max_epochs", "3", "--checkpoint.dirpath", "full"])
    main([*base, "--trainer.max_epochs", "2", "--checkpoint.dirpath", "part"])
    main([*base, "--trainer.max_epochs", "3", "--checkpoint.dirpath", "part", "--ckpt_path", "part/last.ckpt"])
    full = torch.load("full/last.ckpt", weights_only=True)
    part = torch.load("part/last.ckpt", weights_only=True)
    assert full["global_step"] == part["global_step"]
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(part["state_dict"][key], value, rtol=0, atol=0)


def test_load_from_checkpoint_leaves_the_callers_random_states_alone(
    tmp_path: Path, trainer_kwargs: dict[str, Any]
) -> None:
    from distill.module_utils import RNG_KEY

    module = Classifier(MLP(64, (8,), 10))
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1})
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert RNG_KEY in torch.load(path, weights_only=True)
    torch.manual_seed(123)
    Classifier(MLP(64, (8,), 10))  # what building the module draws (its initialisation)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Classifier.load_from_checkpoint(path)  # not a resumed fit: no random state is restored from the file
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
