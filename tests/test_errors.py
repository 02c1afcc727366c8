"""User errors: unreadable checkpoints are named with the fix, and ``distill`` prints them without a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.errors import CheckpointError, DistillError, MissingCheckpointError, find_user_error, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart"


class _Opaque:  # a pickled class: weights_only loading refuses it
    pass


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # the configs' relative run folders land here, if anything is written
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2000)}}, good)
    out = {"good": good, "missing": tmp_path / "missing.ckpt"}
    out["random"] = tmp_path / "random.ckpt"
    out["random"].write_bytes(bytes(range(256)) * 8)
    out["truncated"] = tmp_path / "truncated.ckpt"
    out["truncated"].write_bytes(good.read_bytes()[:1500])
    out["objects"] = tmp_path / "objects.ckpt"
    torch.save({"thing": _Opaque()}, out["objects"])
    return out


def test_read_checkpoint_names_the_problem(files: dict[str, Path]) -> None:
    assert torch.equal(read_checkpoint(files["good"])["state_dict"]["w"], torch.ones(2000))
    with pytest.raises(MissingCheckpointError, match="'.*missing.ckpt' does not exist") as missing:
        read_checkpoint(files["missing"])
    assert isinstance(missing.value, FileNotFoundError)  # the built-in type it always had
    with pytest.raises(CheckpointError, match="random.ckpt'.*not a PyTorch checkpoint.*Fix:"):
        read_checkpoint(files["random"])
    with pytest.raises(CheckpointError, match="truncated.ckpt'.*truncated"):
        read_checkpoint(files["truncated"])
    with pytest.raises(CheckpointError, match="objects.ckpt'.*Python objects.*does not unpickle") as objects:
        read_checkpoint(files["objects"], "teacher checkpoint")
    assert "cannot read teacher checkpoint" in str(objects.value)
    assert "weights_only` set to `False`" not in str(objects.value)  # never torch's advice to unpickle


def test_a_missing_checkpoint_names_the_config_that_writes_it(files: dict[str, Path]) -> None:
    # the second stage of soft weight-sharing reads the first stage's last.ckpt (run from another folder here)
    produced = r"It is produced by: distill fit -c .*configs/mnist/lenet5_caffe_sws\.yaml$"
    with pytest.raises(MissingCheckpointError, match=produced):
        read_checkpoint("runs/lenet5_caffe_sws/checkpoints/last.ckpt", "LoadWeights: checkpoint")
    with pytest.raises(MissingCheckpointError, match="Fix: point at an existing checkpoint"):
        read_checkpoint(files["missing"])  # no config writes there


def test_find_user_error_follows_the_chain() -> None:
    inner = CheckpointError("bad file")
    try:
        try:
            raise inner
        except CheckpointError:
            raise ValueError("Does not validate against any of the Union subtypes")  # noqa: B904 - as jsonargparse
    except ValueError as outer:
        assert find_user_error(outer) is inner
    assert find_user_error(RuntimeError("a bug")) is None


def _fit(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(QUICKSTART / "student.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "teacher checkpoint '.*missing.ckpt' does not exist"),
    ("random", "cannot read teacher checkpoint '.*random.ckpt': not a PyTorch checkpoint"),
    ("truncated", "cannot read teacher checkpoint '.*truncated.ckpt': the file is truncated"),
])
def test_cli_prints_a_bad_teacher_in_one_line(kind: str, message: str, files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_fit(tmp_path, "--model.init_args.teacher", str(files[kind])))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search("distill: error: " + message, err), err
    assert "Traceback" not in err and "Namespace(" not in err and "Union subtypes" not in err


def refused_ckpt_path(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``distill fit`` of the quickstart teacher resuming from ``ckpt``: it must exit with status 2; its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(QUICKSTART / "teacher.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_checks_ckpt_path_before_setting_up(files: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    err = refused_ckpt_path(files["truncated"], tmp_path, capsys)
    assert "distill: error: cannot read --ckpt_path" in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was set up or trained


def test_cli_missing_data_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPO / "configs" / "mnist" / "lenet300_100_teacher.yaml"),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.init_args.download", "false",
              "--data.init_args.data_dir", str(tmp_path / "nowhere"), "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "distill: error: MNIST not found under" in err and "DISTILL_DATA" in err and "Traceback" not in err


def test_traceback_on_request_and_for_bugs(files: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_TRACEBACK", "1")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever jsonargparse wraps it in
        main(_fit(tmp_path, "--model.init_args.teacher", str(files["random"])))
    assert isinstance(find_user_error(raised.value), CheckpointError)
    assert issubclass(CheckpointError, DistillError) and issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize(("old", "new", "message"), [
    ("num_components: 8", "num_components: 0", "GMMPrior: num_components must be an integer J >= 1, got 0"),
    ("tau: 0.05", "tau: -1.0", "GMMPrior: tau must be a number >= 0"),
])
def test_cli_names_the_class_of_a_bad_config_value(old: str, new: str, message: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    text = (QUICKSTART / "student.yaml").read_text()
    assert old in text
    config = tmp_path / "bad.yaml"
    config.write_text(text.replace(old, new))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"distill: error: {message}" in err and "Fix: change it in the config file" in err, err
    assert "Traceback" not in err and "Namespace(" not in err


def test_ckpt_path_of_another_network_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    teacher = str(QUICKSTART / "teacher.yaml")
    main(["fit", "-c", teacher, *quiet, "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--checkpoint.dirpath", "other", "--model.init_args.model.init_args.hidden_sizes", "[32]"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # Lightning would swap in the checkpoint's network (MLP 64-32-10)
        main(["fit", "-c", teacher, *quiet, "--ckpt_path", "other/last.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path 'other/last.ckpt' was written for another network" in err and "hidden_sizes': [32]" in err
    assert "Fix: resume from this config's own checkpoint" in err and "Traceback" not in err
    # the run's own checkpoint resumes as before
    main(["fit", "-c", teacher, *quiet, "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--checkpoint.dirpath", "mine"])
    main(["fit", "-c", teacher, *quiet, "--trainer.max_epochs", "2", "--trainer.logger", "false",
          "--checkpoint.dirpath", "mine", "--ckpt_path", "mine/last.ckpt"])
    assert "last checkpoint:" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--data.val_size", "5000"], "DigitsDataModule: val_size=5000 leaves no training data (the training set has"),
    (["--model.init_args.optimizer.init_args.lr", "-1"], "optimizer: Invalid learning rate: -1.0. Fix: change "
                                                         "model.init_args.optimizer"),
])  # fmt: skip
def test_values_checked_at_fit_time_fail_in_one_line(args: list[str], message: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(QUICKSTART / "teacher.yaml"), "--trainer.enable_progress_bar", "false", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"distill: error: {message}" in err and "Traceback" not in err, err


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill import modules

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not a config value")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(modules.Classifier, "training_step", broken)
    with pytest.raises(ValueError, match="a bug, not a config value"):
        main(["fit", "-c", str(QUICKSTART / "teacher.yaml"), "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false"])


def _flip_bytes_in_a_tensor(src: Path, dst: Path) -> None:
    """A copy of a checkpoint with bytes flipped inside one tensor's data (the zip's sizes and structure intact)."""
    import zipfile

    with zipfile.ZipFile(src) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
        data = bytearray(src.read_bytes())
        # the member's bytes follow its local header (30 bytes + name + extra field)
        name_len, extra_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little"), \
            int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len
    data[start + 8: start + 40] = bytes(b ^ 0xFF for b in data[start + 8: start + 40])
    dst.write_bytes(bytes(data))


def test_checkpoint_checks_catch_corruption_folders_and_plain_dicts(files: dict[str, Path], tmp_path: Path) -> None:
    from distill.errors import check_checkpoint_file

    lightning_like = tmp_path / "run" / "checkpoints" / "last.ckpt"
    lightning_like.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.arange(4000.0)}, "pytorch-lightning_version": "2.6.0"}, lightning_like)
    check_checkpoint_file(lightning_like, "--ckpt_path", lightning=True)  # a good one passes
    corrupt = tmp_path / "corrupt.ckpt"
    _flip_bytes_in_a_tensor(lightning_like, corrupt)
    loaded = torch.load(corrupt, weights_only=True)["state_dict"]["w"]  # torch itself loads it, silently wrong
    assert not torch.equal(loaded, torch.arange(4000.0))
    for check in (lambda p: check_checkpoint_file(p, "--ckpt_path"), lambda p: read_checkpoint(p, "--ckpt_path")):
        with pytest.raises(CheckpointError, match=r"corrupt.ckpt'.*corrupted \(its member '.*' fails its CRC-32"):
            check(corrupt)
        with pytest.raises(MissingCheckpointError, match=r"'.*run' is a folder, not a checkpoint file\. Fix: give "
                                                         r"the checkpoint file in it, e\.g\. .*run/checkpoints/last"):
            check(tmp_path / "run")
    check_checkpoint_file(files["good"], "--ckpt_path")  # any checkpoint, without lightning=True
    with pytest.raises(CheckpointError, match=r"good.ckpt' is not a Lightning checkpoint: it has no "
                                              r"'pytorch-lightning_version' \(it holds \['state_dict'\]\)\. Fix:"):
        check_checkpoint_file(files["good"], "--ckpt_path", lightning=True)
    plain = tmp_path / "plain.ckpt"
    torch.save({"a": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="has no 'state_dict' or 'pytorch-lightning_version'"):
        check_checkpoint_file(plain, "--ckpt_path", lightning=True)
    check_checkpoint_file(files["objects"], "--ckpt_path", lightning=True)  # needs unpickling: left to Lightning


def test_ckpt_path_that_is_not_a_lightning_checkpoint_is_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused_ckpt_path(files["good"], tmp_path, capsys)
    assert "distill: error: --ckpt_path" in err and "is not a Lightning checkpoint" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_lightnings_misconfiguration_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(QUICKSTART / "teacher.yaml"), "--trainer.accelerator", "gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "distill: error: No supported gpu backend found. Fix: change the trainer setting it names" in err, err
    assert "Traceback" not in err


def test_an_empty_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(empty)])
    assert exit_info.value.code == 2
    assert f"distill: error: config file '{empty}' is empty. Fix:" in capsys.readouterr().err
