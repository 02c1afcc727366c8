"""What ``distill fit`` prints at the end: where the run's files went, never a ``None`` path."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.cli import main
from tests.conftest import REPO

TEACHER = str(REPO / "configs" / "quickstart" / "teacher.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _fit(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    main(["fit", "-c", TEACHER, *QUIET, *args])
    return capsys.readouterr().out


def test_summary_names_the_run_folder_and_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    out = _fit(["--trainer.max_epochs", "1"], capsys)
    assert "run folder:        runs/quickstart_teacher/version_0" in out
    assert "last checkpoint:" in out and "tensorboard:       tensorboard --logdir runs/quickstart_teacher" in out


def test_summary_without_logger_or_in_fast_dev_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    out = _fit(["--trainer.max_epochs", "1", "--trainer.logger", "false"], capsys)
    assert "last checkpoint:" in out
    assert "None" not in out and "tensorboard" not in out and "run folder" not in out  # nothing to point at
    out = _fit(["--trainer.fast_dev_run", "true"], capsys)
    assert "fast_dev_run:      no logs or checkpoints were written" in out
    assert "None" not in out and "tensorboard" not in out


def test_summary_gives_the_compression_rate_and_the_files_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_epochs", "1", "--trainer.callbacks+=distill.callbacks.PruneQuantize",
            "--trainer.callbacks.init_args.quality", "0.5", "--trainer.callbacks.init_args.finetune_epochs", "0"]
    out = _fit(args, capsys)
    run = tmp_path / "runs" / "quickstart_teacher" / "version_0"
    totals = json.loads((run / "compression_report.json").read_text())["totals"]
    acc = json.loads((run / "accuracy.json").read_text())
    line = next(x for x in out.splitlines() if x.startswith("compression:"))
    assert f"{totals['compression_rate']:.1f}x: {totals['file_bytes']:,} bytes in the file" in line
    line = next(x for x in out.splitlines() if x.startswith("test accuracy:"))
    assert f"{100 * acc['decoded']:.2f}% read back from the file ({100 * acc['before']:.2f}% before" in line
    summary = out[out.index("run folder:") :].splitlines()
    assert "compression report:" in out and len({len(x) - len(x.split(":", 1)[1].lstrip()) for x in summary}) == 1


def test_no_advert_for_lightnings_cloud_logger(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        _fit(["--trainer.max_epochs", "1"], capsys)
    assert "GPU available" in caplog.text  # Lightning's other messages still come through
    assert "Tip:" not in caplog.text + capsys.readouterr().err


def test_lightnings_leafspec_future_warning_is_left_out() -> None:
    """Lightning 2.6's pytree code makes torch warn about ``LeafSpec`` at every fit: ``distill`` leaves that one out,
    not other warnings from Lightning or that message from elsewhere."""
    import warnings

    from distill.cli import _quiet_third_party

    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and " \
        "treespec.is_leaf()` instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_third_party()
        for text, module in ((message, "pytorch_lightning.utilities._pytree"),
                             ("something else", "pytorch_lightning.x"), (message, "my_project.trees")):
            warnings.warn_explicit(text, FutureWarning, "f.py", 1, module=module)
    assert [(str(w.message), w.filename) for w in seen] == [("something else", "f.py"), (message, "f.py")]
