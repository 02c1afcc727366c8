"""Distiller: end-to-end and layer-wise distillation, teacher handling, checkpoints, configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from distill.arch import arch_spec
from distill.distillation import (
    LayerMappingError,
    TeacherNotFoundError,
    load_network,
    load_student,
    make_adapter,
)
from distill.errors import CheckpointError, MissingCheckpointError
from distill.hooks import ModulePathError, has_hooks
from distill.losses import softmax_mse
from distill.modules import Classifier, Distiller
from models.lenet import MLP, LeNet5Caffe, LeNet300100, SmallConvNet
from tests.conftest import REPO, ParseOnlyCLI, random_loader

CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models run fastest on one thread (and do not fight other processes on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_teacher(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(64, (32, 16), 10, input_shape=(1, 8, 8))


def _loader(n: int = 256, batch: int = 32) -> Any:
    return random_loader(n=n, shape=(1, 8, 8), batch=batch)


def _write_teacher_ckpt(net: nn.Module, path: Path) -> Path:
    """A Classifier-style checkpoint as `distill fit` writes it (hyper_parameters.model + state_dict model.*)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"model": arch_spec(net)},
        },
        path,
    )
    return path


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "alpha"), [("mse", 0.0), ("kd", 0.1)])
def test_end_to_end_student_approaches_teacher(loss: str, alpha: float, trainer_kwargs: dict[str, Any]) -> None:
    teacher = _tiny_teacher()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = MLP(64, (32,), 10)
    distiller = Distiller(student, teacher, optimizer=_adam, loss=loss, temperature=2.0, alpha=alpha)
    x = next(iter(_loader(64, 64)))[0]
    with torch.no_grad():
        before = softmax_mse(student(x), teacher(x), 2.0).item()
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 8})
    trainer.fit(distiller, _loader(512, 32), _loader(64))
    with torch.no_grad():
        after = softmax_mse(student(x), teacher(x), 2.0).item()
    assert after < 0.5 * before
    # the teacher: unchanged, eval, frozen, not in the optimizer, not in the state_dict
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, t_before[k])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert all(not k.startswith("teacher") for k in distiller.state_dict())
    expected = {"train/loss", "train/distill_loss", "val/acc", "val/teacher_acc"} | (
        {"train/ce_loss"} if alpha else set()
    )
    assert expected <= set(trainer.callback_metrics)


def test_val_and_test_report_student_and_teacher_accuracy(trainer_kwargs: dict[str, Any]) -> None:
    teacher = _tiny_teacher()
    torch.manual_seed(2)
    distiller = Distiller(MLP(64, (8,), 10), teacher, optimizer=_adam)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 2})
    trainer.fit(distiller, _loader(64), _loader(64))
    x, y = next(iter(_loader(64, 64)))
    with torch.no_grad():
        student_acc = (distiller.student(x).argmax(1) == y).float().mean().item()
        teacher_acc = (teacher(x).argmax(1) == y).float().mean().item()
    assert trainer.callback_metrics["val/teacher_acc"].item() == pytest.approx(teacher_acc)
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(student_acc)
    metrics = trainer.test(distiller, _loader(64), verbose=False)[0]
    assert metrics["test/acc"] == pytest.approx(student_acc)
    assert metrics["test/teacher_acc"] == pytest.approx(teacher_acc)


def test_teacher_follows_dtype_moves() -> None:
    distiller = Distiller(MLP(64, (8,), 10), _tiny_teacher())
    distiller.double()
    assert next(distiller.teacher.parameters()).dtype == torch.float64
    assert next(distiller.student.parameters()).dtype == torch.float64
    distiller.train()
    assert not distiller.teacher.training


def test_init_from_teacher() -> None:
    teacher = _tiny_teacher()
    distiller = Distiller(MLP(64, (32, 16), 10), teacher, init_from_teacher=True)
    for (k, v), w in zip(distiller.student.state_dict().items(), teacher.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, msg=k)
    with pytest.raises(ValueError, match="init_from_teacher=True needs a student with the teacher's architecture"):
        Distiller(MLP(64, (8,), 10), teacher, init_from_teacher=True)


def test_bad_arguments() -> None:
    teacher = _tiny_teacher()
    with pytest.raises(ValueError, match="loss must be one of"):
        Distiller(MLP(64, (8,), 10), teacher, loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        Distiller(MLP(64, (8,), 10), teacher, temperature=0)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        Distiller(MLP(64, (8,), 10), teacher, alpha=2.0)
    for bad, match in (({1: 0.5}, "from epoch 0 on"), ({0: 1.5}, "alpha schedule"), ({0: 0.5, 1.5: 0.1}, "1.5")):
        with pytest.raises(ValueError, match=match):
            Distiller(MLP(64, (8,), 10), teacher, alpha=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        Distiller(MLP(64, (8,), 10), teacher, mode="stagewise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage_epochs must be"):
        Distiller(MLP(64, (32, 16), 10), teacher, mode="layerwise", layerwise_schedule="progressive", stage_epochs=[1])


# ----------------------------------------------------------------------------------------------------------------
# teacher from a checkpoint; checkpoints without the teacher
# ----------------------------------------------------------------------------------------------------------------


def test_missing_teacher_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here: the checkpoint is missing for sure
    with pytest.raises(
        TeacherNotFoundError, match=r"does not exist.*distill fit -c \S*configs/quickstart/teacher.yaml"
    ):
        Distiller(MLP(64, (8,), 10), "runs/quickstart_teacher/checkpoints/last.ckpt")
    with pytest.raises(TeacherNotFoundError, match="Train a teacher first"):
        Distiller(MLP(64, (8,), 10), "elsewhere/last.ckpt")
    # a missing student checkpoint names its producer too
    producer = r"does not exist.*distill fit -c \S*configs/quickstart/student.yaml"
    with pytest.raises(MissingCheckpointError, match=producer):
        load_student("runs/quickstart_student/checkpoints/last.ckpt")


def test_cli_keeps_a_text_file_teacher_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jsonargparse reads a file named for an argument that may be a class; the teacher stays a path, as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("just some notes\n")
    cli = ParseOnlyCLI(
        args=["-c", str(REPO / "configs/mnist/lenet300_100_distill.yaml"), "--model.init_args.teacher", "notes.txt"],
        run=False,
    )
    assert cli.config["model"]["init_args"]["teacher"] == "notes.txt"
    with pytest.raises(CheckpointError, match="cannot read teacher checkpoint 'notes.txt'"):
        Distiller(MLP(64, (8,), 10), "notes.txt")


def test_checkpoint_without_teacher_and_student_export(tmp_path: Path, trainer_kwargs: dict[str, Any]) -> None:
    big = MLP(64, (512, 256), 10, input_shape=(1, 8, 8))  # a teacher much larger than the student
    teacher_path = _write_teacher_ckpt(big, tmp_path / "teacher" / "last.ckpt")
    torch.manual_seed(0)
    distiller = Distiller(MLP(64, (16,), 10), str(teacher_path), optimizer=_adam)
    torch.testing.assert_close(distiller.teacher.fc1.weight, big.fc1.weight)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 1, "enable_checkpointing": True, "callbacks": [ckpt_cb]})
    trainer.fit(distiller, _loader(64), _loader(64))
    ckpt_path = Path(ckpt_cb.last_model_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["teacher"] == str(teacher_path)
    teacher_bytes = sum(p.numel() * 4 for p in big.parameters())
    assert os.path.getsize(ckpt_path) < teacher_bytes / 4  # the teacher's weights are not in the file

    # the student loads without the teacher
    os.remove(teacher_path)
    student = load_student(ckpt_path)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(student(x), distiller.student(x))
    with pytest.raises(TeacherNotFoundError):
        Distiller.load_from_checkpoint(ckpt_path)  # the Distiller itself needs its teacher back
    restored = Distiller.load_from_checkpoint(ckpt_path, teacher=big)
    torch.testing.assert_close(restored.student(x), distiller.student(x))

    # exported alone, the student is a Classifier checkpoint
    exported = distiller.export_student(tmp_path / "student.ckpt")
    clf = Classifier.load_from_checkpoint(exported)
    torch.testing.assert_close(clf(x), distiller.student(x))
    torch.testing.assert_close(load_network(exported)(x), distiller.student(x))
    with pytest.raises(ValueError, match="not a Distiller checkpoint"):
        load_student(exported)


def test_resume_from_checkpoint(tmp_path: Path, trainer_kwargs: dict[str, Any]) -> None:
    teacher_path = _write_teacher_ckpt(_tiny_teacher(), tmp_path / "t.ckpt")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kw = {**trainer_kwargs, "enable_checkpointing": True}
    make = lambda: Distiller(  # noqa: E731
        MLP(64, (32, 16), 10),
        str(teacher_path),
        mode="layerwise",
        layerwise_schedule="progressive",
        layers={"fc1": "fc1", "fc2": "fc2"},
        stage_epochs=1,
    )
    pl.Trainer(**{**kw, "max_epochs": 1, "callbacks": [ckpt_cb]}).fit(make(), _loader(64))
    resumed = make()
    trainer = pl.Trainer(**{**kw, "max_epochs": 3, "callbacks": [ModelCheckpoint(dirpath=tmp_path / "c2")]})
    trainer.fit(resumed, _loader(64), ckpt_path=ckpt_cb.last_model_path)
    assert trainer.current_epoch == 3 and resumed.stage_at(1) == 1 and resumed.stage_at(2) == 2


def test_alpha_schedule_follows_epochs_across_resume(tmp_path: Path, trainer_kwargs: dict[str, Any]) -> None:
    """``alpha: {first epoch: alpha}`` (string keys as from JSON too) sets the cross-entropy weight per epoch, also in
    a run resumed from ``last.ckpt`` (the fresh module starts at the epoch-0 value)."""
    teacher = _tiny_teacher()
    seen: dict[int, float] = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
            seen.setdefault(trainer.current_epoch, module.alpha)

    def make() -> Distiller:
        return Distiller(MLP(64, (32, 16), 10), teacher, optimizer=_adam, alpha={"0": 1.0, 2: 0.25})

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kw = {**trainer_kwargs, "enable_checkpointing": True}
    pl.Trainer(**{**kw, "max_epochs": 2, "callbacks": [ckpt_cb, Record()]}).fit(make(), _loader(64))
    resumed = make()
    assert resumed.alpha == 1.0
    trainer = pl.Trainer(**{**kw, "max_epochs": 4, "callbacks": [ModelCheckpoint(dirpath=tmp_path / "c2"), Record()]})
    trainer.fit(resumed, _loader(64), ckpt_path=ckpt_cb.last_model_path)
    assert seen == {0: 1.0, 1: 1.0, 2: 0.25, 3: 0.25}


# ----------------------------------------------------------------------------------------------------------------
# layer by layer
# ----------------------------------------------------------------------------------------------------------------


def _layer_mse(distiller: Distiller, x: torch.Tensor) -> dict[str, float]:
    """Per mapped layer: MSE between the (adapted) student layer output and the teacher's."""
    from distill.hooks import FeatureCapture

    t_paths = [t for _, t in distiller.pairs]
    s_paths = [s for s, _ in distiller.pairs]
    out = {}
    with (
        torch.no_grad(),
        FeatureCapture(distiller.teacher, t_paths, inputs=True) as tc,
        FeatureCapture(distiller.student, s_paths) as sc,
    ):
        distiller.teacher(x)
        distiller.student(x)
        for s, t in distiller.pairs:
            if distiller.schedule == "independent":
                feats = dict(distiller.student.named_modules())[s](tc.inputs[t])
            else:
                feats = sc.outputs[s]
            key = s.replace(".", "__")
            if key in distiller.adapters:
                feats = distiller.adapters[key](feats)
            out[s] = F.mse_loss(feats, tc.outputs[t]).item()
    return out


@pytest.mark.parametrize(
    ("schedule", "hidden"),
    [("independent", (32, 16)), ("joint", (12, 6)), ("progressive", (12, 6))],
)
def test_layerwise_lowers_every_mapped_layer(
    schedule: str, hidden: tuple[int, int], trainer_kwargs: dict[str, Any]
) -> None:
    teacher = _tiny_teacher()
    torch.manual_seed(5)
    layers = {"fc1": "fc1", "fc2": "fc2", "fc3": "fc3"}
    distiller = Distiller(
        MLP(64, hidden, 10, input_shape=(1, 8, 8)),
        teacher,
        optimizer=_adam,
        mode="layerwise",
        layers=layers,
        layerwise_schedule=schedule,
        stage_epochs=2,  # type: ignore[arg-type]
    )
    assert bool(len(distiller.adapters)) == (hidden != (32, 16))
    x = next(iter(_loader(128, 128)))[0]
    before = _layer_mse(distiller, x)
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 6})
    trainer.fit(distiller, _loader(512, 32))
    after = _layer_mse(distiller, x)
    for layer in layers:
        assert after[layer] < 0.7 * before[layer], (layer, before, after)
    assert {f"train/feature_loss/{s}" for s in layers} & set(trainer.callback_metrics)
    # hooks are gone after fit and after test, nothing stays frozen
    assert not has_hooks(teacher) and not has_hooks(distiller.student)
    trainer.test(distiller, _loader(32), verbose=False)
    assert not has_hooks(teacher) and not has_hooks(distiller.student)
    assert all(p.requires_grad for p in distiller.student.parameters())


def test_progressive_freezes_earlier_layers(trainer_kwargs: dict[str, Any]) -> None:
    teacher = _tiny_teacher()
    distiller = Distiller(
        MLP(64, (32, 16), 10),
        teacher,
        optimizer=_adam,
        mode="layerwise",
        layerwise_schedule="progressive",
        layers={"fc1": "fc1", "fc2": "fc2"},
        stage_epochs=[1, 2],
    )
    assert [distiller.stage_at(e) for e in range(5)] == [0, 1, 1, 2, 2]
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in distiller.student.state_dict().items()}

    pl.Trainer(**{**trainer_kwargs, "max_epochs": 4, "callbacks": [Snap()]}).fit(distiller, _loader(64))
    # stage 1 (epochs 1-2): fc1 frozen, fc2 trained, fc3 untouched (not in the loss)
    torch.testing.assert_close(snapshots[2]["fc1.weight"], snapshots[0]["fc1.weight"])
    assert not torch.equal(snapshots[2]["fc2.weight"], snapshots[0]["fc2.weight"])
    torch.testing.assert_close(snapshots[2]["fc3.weight"], snapshots[0]["fc3.weight"])
    # after the stages: end-to-end fine-tuning moves every layer
    assert not torch.equal(snapshots[3]["fc1.weight"], snapshots[2]["fc1.weight"])
    assert not torch.equal(snapshots[3]["fc3.weight"], snapshots[2]["fc3.weight"])


def test_teacher_forward_runs_once_per_batch(trainer_kwargs: dict[str, Any]) -> None:
    teacher = _tiny_teacher()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    distiller = Distiller(MLP(64, (32, 16), 10), teacher, mode="layerwise", layers={"fc1": "fc1", "fc2": "fc2"})
    calls.clear()
    trainer = pl.Trainer(**{**trainer_kwargs, "max_epochs": 1, "limit_val_batches": 0})
    trainer.fit(distiller, _loader(64, 16))
    assert len(calls) == 4  # 4 batches, 2 mapped layers: one teacher forward per batch


def test_bad_mapping_fails_before_training() -> None:
    teacher = _tiny_teacher()
    with pytest.raises(ModulePathError, match=r"student \(MLP\) has no module 'fc9'.*Valid layer paths: fc1, fc2, fc3"):
        Distiller(MLP(64, (32, 16), 10), teacher, mode="layerwise", layers={"fc9": "fc1"})
    with pytest.raises(ModulePathError, match=r"teacher \(MLP\) has no module 'conv1'"):
        Distiller(MLP(64, (32, 16), 10), teacher, mode="layerwise", layers={"fc1": "conv1"})
    conv = SmallConvNet()
    with pytest.raises(LayerMappingError, match=r"cannot regress student features of shape \(16, 6, 6\)"):
        Distiller(conv, teacher, mode="layerwise", layers={"conv1": "fc1"}, layerwise_schedule="joint")
    with pytest.raises(LayerMappingError, match="input shapes differ"):
        Distiller(MLP(64, (12, 6), 10), teacher, mode="layerwise", layers={"fc2": "fc2"})
    with pytest.raises(LayerMappingError, match="adapters=False"):
        Distiller(MLP(64, (12, 6), 10), teacher, mode="layerwise", layers={"fc1": "fc1"}, adapters=False)
    bare = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no input_shape attribute
    with pytest.raises(LayerMappingError, match="needs the input shape"):
        Distiller(bare, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), mode="layerwise", layers={"1": "1"})
    with pytest.raises(LayerMappingError, match=r"the student \(Sequential\) cannot take inputs of per-sample shape "
                                                r"\(1, 8, 8\) \(a dummy forward failed: .*\)\. Fix: set input_shape"):
        Distiller(nn.Sequential(nn.Linear(64, 10)), teacher, mode="layerwise", layers={"0": "fc3"})
    with pytest.raises(LayerMappingError, match=r"the teacher \(Sequential\) cannot take inputs .*give a teacher "
                                                r"built for the same inputs"):
        Distiller(teacher, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), mode="layerwise", layers={"fc3": "1"})


def test_make_adapter_shapes() -> None:
    assert isinstance(make_adapter((300,), (500,)), nn.Linear)
    conv = make_adapter((8, 4, 4), (50, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv(torch.zeros(1, 8, 4, 4)).shape == (1, 50, 4, 4)
    with pytest.raises(LayerMappingError, match="1x1 convolution"):
        make_adapter((8, 4, 4), (8, 2, 2))


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "teacher"),
    [
        ("mnist/lenet300_100_distill.yaml", LeNet300100),
        ("mnist/lenet300_100_layerwise.yaml", LeNet300100),
        ("mnist/lenet5_to_lenet300_distill.yaml", LeNet5Caffe),
        ("quickstart/student.yaml", lambda: MLP(64, (256, 128), 10)),
    ],
)
def test_configs_parse(config: str, teacher: Any, tmp_path: Path) -> None:
    from distill.cli import DistillCLI

    path = _write_teacher_ckpt(teacher(), tmp_path / "teacher.ckpt")
    cli = DistillCLI(args=["-c", str(CONFIGS / config), f"--model.init_args.teacher={path}"], run=False)
    assert isinstance(cli.model, Distiller)
    assert cli.model.hparams["teacher"] == str(path)


def test_quickstart_cli_teacher_then_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.cli import main

    monkeypatch.chdir(tmp_path)  # runs/ lands here; the student config finds the teacher by its relative path
    fast = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false"]
    main(["fit", "-c", str(CONFIGS / "quickstart/teacher.yaml"), *fast])
    assert (tmp_path / "runs/quickstart_teacher/checkpoints/last.ckpt").is_file()
    main(["fit", "-c", str(CONFIGS / "quickstart/student.yaml"), *fast])
    last = tmp_path / "runs/quickstart_student/checkpoints/last.ckpt"
    student = load_student(last)
    assert isinstance(student, MLP) and student.init_args["hidden_sizes"] == [64, 32]


def test_lenet5_teacher_config_parses() -> None:
    from distill.cli import DistillCLI

    cli = DistillCLI(args=["-c", str(CONFIGS / "mnist/lenet5_caffe_teacher.yaml")], run=False)
    assert isinstance(cli.model, Classifier) and isinstance(cli.model.model, LeNet5Caffe)
