"""Every config in configs/ parses and fits one fast batch, so none rots.

Teacher configs run first (inside a temporary working directory) so that the configs which read a teacher
checkpoint from ``runs/<name>_teacher/checkpoints/last.ckpt`` find one.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from distill.cli import DistillCLI
from tests.conftest import REPO, ParseOnlyCLI, data_root

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
TEACHERS = [c for c in CONFIGS if c.stem.endswith("_teacher") or c.stem == "teacher"]
OTHERS = [c for c in CONFIGS if c not in TEACHERS]


def _fast_args(config: Path) -> list[str]:
    args = [
        "fit",
        "-c",
        str(config),
        "--trainer.max_steps",
        "2",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.limit_test_batches",
        "2",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.eval_batch_size",
        "256",
    ]
    text = config.read_text()
    if "CIFAR10DataModule" in text:
        subset = "cifar10-subset/cifar10_exact_subset.npz"
        args += ["--data.init_args.subset_file", subset, "--data.init_args.val_size", "100"]
    if "MNISTDataModule" in text or "CIFAR10DataModule" in text:
        args += ["--data.init_args.download", "false"]
    if "VGG19BN" in text:  # full width works too, but a fast test needs a thin network
        args += ["--model.init_args.model.init_args.width", "0.0625"]
    return args


def _checkpoint_dir(config: Path) -> str | None:
    found = re.search(r"^checkpoint:\s*\n\s+dirpath:\s*(\S+)", config.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def _earlier_stages(config: Path) -> list[Path]:
    """The (non-teacher) configs whose ``last.ckpt`` this config reads, e.g. a LoadWeights of an earlier run."""
    read = set(re.findall(r"(runs/[\w.-]+/checkpoints)/last\.ckpt", config.read_text()))
    return [c for c in OTHERS if c != config and _checkpoint_dir(c) in read]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding teacher checkpoints trained for two steps by each teacher config."""
    root = data_root()
    if not (root / "MNIST" / "raw").exists():
        pytest.skip(f"real data not found under {root} (set DISTILL_DATA)")
    wd = tmp_path_factory.mktemp("configs")
    old = Path.cwd()
    os.environ["DISTILL_DATA"] = str(root)
    os.chdir(wd)
    try:
        for cfg in TEACHERS:
            cli = DistillCLI(args=_fast_args(cfg))
            assert cli.trainer.global_step >= 1, cfg
            ckpt = cli.trainer.checkpoint_callback
            assert ckpt is not None and ckpt.dirpath is not None
            assert (Path(ckpt.dirpath) / "last.ckpt").is_file(), cfg
    finally:
        os.chdir(old)
    return wd


def test_there_are_configs() -> None:
    assert TEACHERS and len(CONFIGS) >= 5


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_config_parses(config: Path) -> None:
    cli = ParseOnlyCLI(args=["-c", str(config)], run=False)
    cfg = cli.config
    assert cfg["model"]["class_path"].startswith("distill.")
    assert cfg["data"]["class_path"].startswith("distill.data.")


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_config_saved_in_the_run_folder_reproduces_the_run(config: Path, tmp_path: Path) -> None:
    # what Lightning's SaveConfigCallback writes to runs/<name>/version_N/config.yaml: every value serialised (a
    # value jsonargparse cannot write comes out as the string "Unable to serialize instance ..." with a warning)
    cli = ParseOnlyCLI(args=["-c", str(config)], run=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = cli.parser.dump(cli.config, skip_none=False)  # as SaveConfigCallback calls it
    assert not [w for w in caught if "serialize" in str(w.message)]
    assert "Unable to serialize" not in text
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    again = ParseOnlyCLI(args=["-c", str(saved)], run=False).config
    first = cli.config.clone()
    first.pop("config", None)
    again.pop("config", None)
    assert again == first


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: distill.modules.Classifier\n  init_args:\n    modle: {}\n")
    with pytest.raises(SystemExit):
        ParseOnlyCLI(args=["-c", str(bad)], run=False)
    assert "required: model" in capsys.readouterr().err


def test_teacher_configs_fit_and_checkpoint(workdir: Path) -> None:
    for cfg in TEACHERS:  # the fixture trained each for two steps
        name = cfg.parent.name + "_teacher" if cfg.stem == "teacher" else cfg.stem
        assert list((workdir / "runs").glob(f"*{name.split('_teacher')[0]}*teacher/checkpoints/last.ckpt")), cfg


@pytest.mark.parametrize("config", OTHERS, ids=[str(c.relative_to(REPO / "configs")) for c in OTHERS])
def test_config_fits_two_steps(config: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    for stage in _earlier_stages(config):  # a second stage reads the first one's last.ckpt: make one
        if not (workdir / _checkpoint_dir(stage) / "last.ckpt").is_file():
            DistillCLI(args=_fast_args(stage))
    cli = DistillCLI(args=_fast_args(config))
    assert cli.trainer.global_step >= 1


def test_last_checkpoint_follows_every_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """last.ckpt is the latest epoch even when the monitored accuracy stops improving (resume must not go back)."""
    import torch

    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "quickstart" / "teacher.yaml"
    args = ["fit", "-c", str(config), "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.enable_model_summary", "false", "--model.init_args.optimizer.init_args.lr", "0.0"]
    DistillCLI(args=args)  # lr 0: val/acc never improves after epoch 0
    ckpts = tmp_path / "runs" / "quickstart_teacher" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 2
    assert [p.name.startswith("best-epoch000") for p in ckpts.glob("best-*")] == [True]


def test_command_line_entry_point_reads_argv_without_warnings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``distill fit ...`` from the shell: LightningCLI reads sys.argv itself (no 'args and sys.argv' warning)."""
    import sys
    import warnings

    from distill.cli import main

    config = REPO / "configs" / "quickstart" / "teacher.yaml"
    monkeypatch.setattr(sys, "argv", ["distill", "fit", "-c", str(config), "--print_config"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code in (0, None)
    assert "max_epochs" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_default_profiler_is_the_cheap_no_op_and_a_real_one_replaces_it(tmp_path: Path) -> None:
    from pytorch_lightning.profilers import SimpleProfiler

    from distill.module_utils import NoOpProfiler

    config = REPO / "configs" / "quickstart" / "teacher.yaml"
    base = ["-c", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = DistillCLI(args=base, run=False)
    assert isinstance(cli.trainer.profiler, NoOpProfiler)
    with cli.trainer.profiler.profile("a") as first, cli.trainer.profiler.profile("b") as second:
        assert first is None and second is None  # a shared no-op context, reentrant
    cli = DistillCLI(args=[*base, "--trainer.profiler", "simple"], run=False)
    assert isinstance(cli.trainer.profiler, SimpleProfiler)


def test_whole_number_batch_limits_count_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning reads an int as a number of batches and a float as a fraction; what the user wrote (config file or
    command line, the last one that sets a key) decides, whatever order typing's cached Union puts int and float in."""
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "limits.yaml"
    extra.write_text("trainer:\n  limit_train_batches: 3\n  limit_val_batches: 1.0\n")
    teacher = str(REPO / "configs" / "quickstart" / "teacher.yaml")
    cli = DistillCLI(args=["-c", teacher, "-c", str(extra), "--trainer.limit_test_batches", "2",
                           "--trainer.val_check_interval=5", "--trainer.limit_predict_batches", "1.0"], run=False)
    t = cli.trainer
    assert (t.limit_train_batches, t.limit_test_batches, t.val_check_interval) == (3, 2, 5)
    assert all(type(v) is int for v in (t.limit_train_batches, t.limit_test_batches, t.val_check_interval))
    assert type(t.limit_val_batches) is float and type(t.limit_predict_batches) is float  # 1.0: all batches
    # a later source wins, as jsonargparse applies them: the file's 1.0 after the flag's 1
    cli = DistillCLI(args=["-c", teacher, "--trainer.limit_val_batches", "1", "-c", str(extra)], run=False)
    assert type(cli.trainer.limit_val_batches) is float
    cli = DistillCLI(args=["-c", teacher, "-c", str(extra), "--trainer.limit_val_batches", "1"], run=False)
    assert cli.trainer.limit_val_batches == 1 and type(cli.trainer.limit_val_batches) is int
