"""Bad input to ``distill compress|evaluate|sweep`` and to ``load_compressed``: one clear line naming the problem and
the fix, never a raw traceback from torch, numpy or yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distill import sweep
from distill.arch import ArchitectureError, arch_spec
from distill.compress import CompressedFileError, decode_into, load_compressed, save_compressed
from distill.compress.cli import compress_main, evaluate_main
from distill.compress.pipeline import deep_compress
from distill.errors import ConfigError
from models import MLP

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "teacher.yaml"


class Net(nn.Module):
    """A plain module (no ``init_args``) whose shapes depend on a constructor argument with a default."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class NeedsWidth(nn.Module):
    """A plain module whose constructor argument has no default."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A minimal Classifier-style checkpoint of a tiny digits MLP (no training)."""
    net = MLP(64, (16,), 10)
    path = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": arch_spec(net)}}, path)
    return path


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.dstl"
    save_compressed(MLP(64, (16,), 10), path)
    return path


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    return err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--bits-fc", "0", "--bits-fc must be an integer in 1..16 (k-means code bits), got 0"),
        ("--bits-conv", "17", "--bits-conv must be an integer in 1..16 (k-means code bits), got 17"),
        ("--quality", "-1", "--quality must be a finite number >= 0"),
        ("--quality", "nan", "--quality must be a finite number >= 0"),
        ("--sparsity", "2", "--sparsity must be a fraction of zeros in [0, 1], got 2.0"),
        ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ],
)
def test_compress_rejects_out_of_range_options(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, option: str, value: str, expected: str
) -> None:
    out = tmp_path / "x.dstl"
    assert compress_main([str(checkpoint), "--out", str(out), option, value]) == 2
    err = _error(capsys)
    assert expected in err and "Fix:" in err
    assert not out.exists()


def test_compress_rejects_out_that_is_a_folder(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert compress_main([str(checkpoint), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder; give a file path such as {folder / 'model.dstl'}" in _error(capsys)
    assert compress_main([str(checkpoint), "--out", str(checkpoint / "m.dstl")]) == 2
    assert f"{checkpoint} is a file, not a folder" in _error(capsys)


def test_evaluate_rejects_a_bad_batch_size(good_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert evaluate_main([str(good_file), "--data", "digits", "--batch-size", "-5"]) == 2
    assert "--batch-size must be an integer >= 1, got -5" in _error(capsys)


def test_a_checkpoint_given_as_compressed_file_says_how_to_compress_it(
    checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(CompressedFileError, match=r"not a distill compressed file .*Fix: .*`distill compress "):
        load_compressed(checkpoint)
    assert evaluate_main([str(checkpoint), "--data", "digits"]) == 2
    err = _error(capsys)
    assert "not a distill compressed file" in err and f"`distill compress {checkpoint} --out model.dstl`" in err


def test_evaluate_missing_mnist_names_its_own_options(
    good_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_main([str(good_file), "--data", "mnist", "--data-dir", str(empty)]) == 2
    err = _error(capsys)
    assert "MNIST not found under" in err and "Fix: pass --data-dir" in err
    assert "--data.data_dir" not in err and "--data.download" not in err


def test_evaluate_on_damaged_mnist_says_to_replace_the_files(
    good_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, shape in (("train-images-idx3-ubyte", (6, 28, 28)), ("train-labels-idx1-ubyte", (6,)),
                        ("t10k-images-idx3-ubyte", (2, 28, 28)), ("t10k-labels-idx1-ubyte", (2,))):
        header = (0x0800 | len(shape)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        (raw / name).write_bytes(header + bytes(6 * 28 * 28 if len(shape) > 1 else shape[0]))
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:100])
    assert evaluate_main([str(good_file), "--data", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = _error(capsys)
    assert "t10k-images-idx3-ubyte is damaged" in err and "Fix: replace the damaged files" in err, err
    assert "`distill evaluate` does not download data sets" in err


def test_plain_module_built_with_other_arguments_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net = Net(16)
    path = tmp_path / "net.dstl"
    save_compressed(net, path)
    with pytest.raises(CompressedFileError, match=r"cannot rebuild .*Net.*fc.weight is \[16, 4\] in the file but "
                                                   r"\[8, 4\] in the rebuilt model.*Fix: .*decode_into"):
        load_compressed(path)
    with pytest.raises(ArchitectureError):  # still what deep_compress falls back to decode_into on
        load_compressed(path)
    assert torch.equal(decode_into(Net(16), path).fc.weight, net.fc.weight)  # the fix the message names works
    assert evaluate_main([str(path), "--data", "digits"]) == 2
    assert "cannot rebuild the stored architecture" in _error(capsys)

    needs = tmp_path / "needs.dstl"
    save_compressed(NeedsWidth(3), needs)
    with pytest.raises(CompressedFileError, match=r"missing 1 required positional argument.*records no constructor "
                                                   r"arguments.*Fix: "):
        load_compressed(needs)


def test_deep_compress_of_a_plain_module_with_arguments_reads_it_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = deep_compress(Net(16), tmp_path / "net.dstl", bits_fc=2)
    assert result["paths"]["compressed model"].is_file()


def test_load_compressed_rejects_a_bad_map_location(good_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"map_location='gpu' is not a torch device\. Fix: pass 'cpu'"):
        load_compressed(good_file, map_location="gpu")


def test_sweep_reports_unreadable_space_and_config_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    study = ["--study-dir", str(tmp_path / "study")]
    assert sweep.main(["-c", str(QUICKSTART), "--trials", "1", "--space", "missing.yaml", *study]) == 2
    err = _error(capsys)
    assert "cannot read --space file 'missing.yaml': No such file or directory. Fix:" in err
    (tmp_path / "space.yaml").write_text("a: [1\n")
    assert sweep.main(["-c", str(QUICKSTART), "--trials", "1", "--space", "space.yaml", *study]) == 2
    assert "--space file 'space.yaml' is not valid YAML: " in _error(capsys)
    (tmp_path / "bad.yaml").write_text("model:\n  class_path: x\n   bad: [1\n")
    assert sweep.main(["-c", "bad.yaml", "--trials", "1", *study]) == 2
    assert "config 'bad.yaml' is not valid YAML: mapping values are not allowed here (line 3" in _error(capsys)
    with pytest.raises(ConfigError, match="is not valid YAML"):
        sweep.run_sweep(tmp_path / "bad.yaml", 1, tmp_path / "study")
    assert not (tmp_path / "study").exists()  # rejected before anything was created


def test_sweep_rejects_bad_set_values_and_timeout(capsys: pytest.CaptureFixture) -> None:
    for extra, expected in ((["--set", "a=[1"], "argument --set: 'a=[1': the value is not valid YAML"),
                            (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0.0")):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["-c", str(QUICKSTART), "--trials", "1", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
