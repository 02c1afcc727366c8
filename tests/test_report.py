"""`distill report` and the FigureLogger callback on real run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from matplotlib.image import imread
from pytorch_lightning.loggers import TensorBoardLogger
from run_artifacts import compression_report, write_run
from torch import nn

from distill import report
from distill.callbacks import FigureLogger
from distill.cli import main as cli_main
from distill.report import FIGURES, figure_filename


def test_report_writes_every_figure_and_the_summary(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs" / "lenet" / "version_0")
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--original-acc", "0.97"]) == 0
    for name in FIGURES:
        image = imread(tmp_path / "out" / figure_filename(name))
        assert image.ndim == 3 and image[..., :3].std() > 0.01, name
    summary = (tmp_path / "out" / "summary.md").read_text()
    for layer in compression_report()["layers"]:
        assert f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {layer['params']:,} |" in summary
    assert "| original | 97.00% |" in summary
    assert "| retrained | 96.00% |" in summary
    assert "| pruned and quantized | 95.50% |" in summary
    assert "| decoded from file | 95.50% |" in summary
    assert "Compression rate: **24.5x**" in summary
    assert "Accuracy loss: 1.50 percentage points." in summary
    assert "6 components at the start, 6 -> 2 significant, 3 after merging; 100.00% -> 60.00% of the weights" in summary
    assert "| val/acc | 0.93 |" in summary
    assert "![figure 2: mixture_dynamics](fig2_mixture_dynamics.png)" in summary


def test_report_shows_what_a_partial_run_allows(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "run",
        gmm=False,
        compress=False,
        pruning=False,
        scalars={"train/loss": [1.0], "val/acc": [0.5, 0.75]},
    )
    (run / "figure_weights.npz").unlink()
    written = report.write_report(run)
    assert set(written) == {"summary"}
    summary = written["summary"].read_text()
    assert "| retrained | 75.00% | last val/acc (TensorBoard) |" in summary
    assert "No compression report" in summary and "| decoded from file | n/a |" in summary
    assert written["summary"].parent == run / "report"


def test_report_resolves_the_latest_version(tmp_path: Path) -> None:
    write_run(tmp_path / "exp" / "version_0", compress=False)
    write_run(tmp_path / "exp" / "version_2", rate=50.0)
    run = report.load_run(tmp_path / "exp")
    assert run.run_dir.name == "version_2" and run.compression_report["totals"]["compression_rate"] == 50.0
    assert [s for s, _ in run.scalars["val/acc"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in run.scalars["val/acc"]], [0.8, 0.9, 0.93], rtol=1e-6)


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert report.main([str(tmp_path)]) == 2
    assert "is not a run folder: expected hparams.yaml" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt' is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(report.NotARunError, match="not a run folder"):
        report.load_run(tmp_path)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--original-acc", "97"])


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv1(x)).flatten(1))


class PlainModule(pl.LightningModule):
    """Knows nothing about FigureLogger."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyConvNet()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class WritesHistory(pl.Callback):
    """Stands in for GMMPrior: writes gmm_history.json in on_fit_end, after FigureLogger in the list."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from run_artifacts import gmm_history

        Path(trainer.log_dir, "gmm_history.json").write_text(json.dumps(gmm_history()))


def test_figure_logger_in_a_plain_module(tmp_path: Path, trainer_kwargs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x = torch.randn(32, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=8)
    model = PlainModule()
    before = model.net.conv1.weight.detach().clone()
    cb = FigureLogger()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**{**trainer_kwargs, "logger": logger, "max_epochs": 2}, callbacks=[cb, WritesHistory()])
    trainer.fit(model, loader)
    run = Path(trainer.log_dir)
    with np.load(run / "figure_weights.npz", allow_pickle=False) as data:
        assert str(data["layer_name"]) == "net.conv1.weight"
        np.testing.assert_array_equal(data["layer_before"], before.numpy())
        np.testing.assert_array_equal(data["layer_after"], model.net.conv1.weight.detach().numpy())
        assert data["initial"].size == before.numel() + model.net.fc.weight.numel()
        assert not np.array_equal(data["initial"], data["final"])
    pngs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert pngs == [
        "fig1_weight_change.png",
        "fig2_mixture_dynamics.png",
        "fig3_prior_scatter.png",  # the weights FigureLogger kept, with the history written after it
        "fig4_filters.png",
        "fig6_hyperprior.png",
    ]
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted("figures/" + p[5:-4] for p in pngs)
    assert cb.output_paths()["figures"] == str(run / "figures")
    state = cb.state_dict()
    fresh = FigureLogger()
    fresh.load_state_dict(state)
    assert torch.equal(fresh._layer_before, before)


def test_figure_logger_validates_arguments() -> None:
    with pytest.raises(ValueError, match="figures: unknown figure names \\['nope'\\]"):
        FigureLogger(figures=["nope"])
    with pytest.raises(ValueError, match="max_points must be a positive integer, got 0"):
        FigureLogger(max_points=0)
    with pytest.raises(ValueError, match="dirname must be a relative folder"):
        FigureLogger(dirname="/abs")


def test_report_on_a_quickstart_cli_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "teacher.yaml"
    callbacks = '[{"class_path": "distill.callbacks.FigureLogger", "init_args": {"max_points": 1000}}]'
    cli_main(
        [
            "fit",
            "-c",
            str(config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.callbacks={callbacks}",
        ]
    )
    run = tmp_path / "runs" / "quickstart_teacher" / "version_0"
    assert report.main([str(tmp_path / "runs" / "quickstart_teacher")]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "last val/acc (TensorBoard)" in summary
    assert (run / "report" / "fig1_weight_change.png").is_file()
    assert (run / "report" / "fig4_filters.png").is_file()  # fc1 over 64 = 8 x 8 inputs
    assert (run / "figures" / "fig1_weight_change.png").is_file()  # FigureLogger at fit end
