"""`distill sweep`: dotted overrides, objectives, resumable studies (fake runner), and a real sweep on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from run_artifacts import write_run

from distill import sweep

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "teacher.yaml"


def test_dotted_paths_set_and_get() -> None:
    cfg: dict[str, Any] = {"trainer": {"callbacks": [{"class_path": "A", "init_args": {"tau": 1.0}}, "B"]}}
    sweep.set_by_path(cfg, "trainer.callbacks.0.init_args.tau", 0.5)
    sweep.set_by_path(cfg, "trainer.callbacks[0].init_args.new_arg", 3)
    sweep.set_by_path(cfg, "model.init_args.optimizer.init_args.lr", 1e-3)  # missing mappings are created
    sweep.set_by_path(cfg, "trainer.callbacks.1", "C")
    assert cfg["trainer"]["callbacks"] == [{"class_path": "A", "init_args": {"tau": 0.5, "new_arg": 3}}, "C"]
    assert sweep.get_by_path(cfg, "model.init_args.optimizer.init_args.lr") == 1e-3
    assert sweep.split_path("a.b[2].c") == ["a", "b", 2, "c"]
    with pytest.raises(KeyError, match="index 2 out of range for a list of 2 entries"):
        sweep.set_by_path(cfg, "trainer.callbacks.2.init_args.tau", 1)
    with pytest.raises(KeyError, match="expected an integer index"):
        sweep.get_by_path(cfg, "trainer.callbacks.first")
    with pytest.raises(KeyError, match="cannot set .init_args. in a str"):
        sweep.set_by_path(cfg, "trainer.callbacks.1.init_args", 1)
    with pytest.raises(ValueError, match="empty part"):
        sweep.split_path("a..b")


def test_parse_space_validates() -> None:
    params = sweep.parse_space(
        {
            "a.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "a.j": {"type": "int", "low": 4, "high": 8},
            "a.opt": {"type": "categorical", "choices": ["sgd", "adam"]},
        }
    )
    assert [(p.key, p.type) for p in params] == [("a.lr", "float"), ("a.j", "int"), ("a.opt", "categorical")]
    with pytest.raises(ValueError, match=r"space\['x'\] has type 'uniform'"):
        sweep.parse_space({"x": {"type": "uniform", "low": 0, "high": 1}})
    with pytest.raises(ValueError, match=r"space\['x'\] needs numbers low < high, got low=2, high=1"):
        sweep.parse_space({"x": {"type": "float", "low": 2, "high": 1}})
    with pytest.raises(ValueError, match="log: true, so low must be > 0"):
        sweep.parse_space({"x": {"type": "float", "low": 0, "high": 1, "log": True}})
    with pytest.raises(ValueError, match="non-empty list of choices"):
        sweep.parse_space({"x": {"type": "categorical", "choices": []}})
    with pytest.raises(ValueError, match=r"unknown fields \['hi'\]"):
        sweep.parse_space({"x": {"type": "int", "low": 0, "hi": 1}})


def test_default_space_finds_the_prior_by_callback_index() -> None:
    cfg = {
        "model": {"init_args": {"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}}},
        "trainer": {
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor"},
                {
                    "class_path": "distill.callbacks.GMMPrior",
                    "init_args": {
                        "tau": 5e-3,
                        "num_components": 16,
                        "means_lr": 1e-4,
                        "gamma_alpha": 250,
                        "beta_beta": 2.0,
                        "warmup_epochs": 5,
                    },
                },
            ]
        },
    }
    space = sweep.default_space(cfg)
    for key in (
        "model.init_args.optimizer.init_args.lr",
        "trainer.callbacks.1.init_args.tau",
        "trainer.callbacks.1.init_args.num_components",
        "trainer.callbacks.1.init_args.means_lr",
        "trainer.callbacks.1.init_args.gamma_alpha",
        "trainer.callbacks.1.init_args.beta_beta",
    ):
        assert key in space, key
    assert "trainer.callbacks.1.init_args.warmup_epochs" not in space
    assert space["trainer.callbacks.1.init_args.num_components"]["type"] == "int"
    sweep.parse_space(space)


def test_prepare_trial_config_redirects_outputs(tmp_path: Path) -> None:
    base = yaml.safe_load(QUICKSTART.read_text())
    cfg = sweep.prepare_trial_config(base, {"model.init_args.optimizer.init_args.lr": 0.01}, tmp_path / "t")
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    assert cfg["trainer"]["logger"]["init_args"] == {"save_dir": str(tmp_path / "t"), "name": "run", "version": 0}
    assert cfg["checkpoint"]["dirpath"] == str(tmp_path / "t" / "checkpoints")
    assert base["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.001  # the base is not modified
    no_logger = sweep.prepare_trial_config({"model": {}}, {}, tmp_path / "u")
    assert no_logger["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")


def test_read_objectives(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a", rate=30.0, accuracy={"before": 0.98, "quantized": 0.975, "decoded": 0.97})
    obj = sweep.read_objectives(run)
    assert (obj.compression_rate, obj.accuracy, obj.reference) == (30.0, 0.97, 0.98)
    assert obj.accuracy_loss == pytest.approx(1.0)
    assert sweep.read_objectives(run, reference_acc=0.99).accuracy_loss == pytest.approx(2.0)
    plain = write_run(tmp_path / "b", gmm=False, compress=False, scalars={"train/loss": [1.0], "val/acc": [0.5, 0.8]})
    obj = sweep.read_objectives(plain)
    assert (obj.compression_rate, obj.source) == (1.0, "last val/acc")
    assert obj.accuracy_loss == pytest.approx(20.0, rel=1e-5)
    diverged = write_run(tmp_path / "c", compress=False, scalars={"train/loss": [1.0, math.nan], "val/acc": [0.1]})
    with pytest.raises(sweep.TrialFailed, match="diverged"):
        sweep.read_objectives(diverged)
    nan_acc = write_run(tmp_path / "d", accuracy={"before": 0.9, "quantized": float("nan"), "decoded": None})
    with pytest.raises(sweep.TrialFailed, match="non-finite"):
        sweep.read_objectives(nan_acc)
    empty = write_run(tmp_path / "e", compress=False, scalars={"train/loss": [1.0]})
    with pytest.raises(sweep.TrialFailed, match="no accuracy"):
        sweep.read_objectives(empty)


class FakeRunner:
    """Writes a run folder whose objectives depend on the sampled lr; fails or interrupts on request."""

    def __init__(self, fail_at: set[int] | None = None, interrupt_at: int | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_at = fail_at or set()
        self.interrupt_at = interrupt_at

    def __call__(self, config_path: Path, trial_dir: Path) -> int:
        cfg = yaml.safe_load(config_path.read_text())
        self.calls.append(cfg)
        n = len(self.calls) - 1
        if n == self.interrupt_at:
            raise KeyboardInterrupt
        if n in self.fail_at:
            return 1
        lr = cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"]
        assert cfg["trainer"]["max_epochs"] == 1  # the fixed override reached the trial
        run_dir = Path(cfg["trainer"]["logger"]["init_args"]["save_dir"]) / "run" / "version_0"
        write_run(
            run_dir,
            gmm=False,
            pruning=False,
            rate=1.0 / lr,
            accuracy={"before": 0.9, "quantized": 0.9 - lr, "decoded": 0.9 - lr},
        )
        return 0


def _sweep(tmp_path: Path, trials: int, runner: FakeRunner, **kwargs: Any) -> optuna.Study:
    return sweep.run_sweep(
        QUICKSTART, trials, tmp_path / "study", overrides={"trainer.max_epochs": 1}, runner=runner, **kwargs
    )


def test_sweep_resumes_records_failures_and_reruns_interrupted_trials(tmp_path: Path) -> None:
    runner = FakeRunner(fail_at={1})
    study = _sweep(tmp_path, 2, runner)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]  # a failed trial is not fatal
    assert "exited with code 1" in study.trials[1].user_attrs["fail_reason"]
    lr0 = study.trials[0].params["model.init_args.optimizer.init_args.lr"]
    assert study.trials[0].values == pytest.approx([100 * lr0, 1 / lr0])

    interrupting = FakeRunner(interrupt_at=0)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, 4, interrupting)
    interrupted = optuna.load_study(study_name="teacher", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert interrupted.trials[2].user_attrs["interrupted"] is True

    resumed = _sweep(tmp_path, 4, FakeRunner())
    states = [t.state.name for t in resumed.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]  # the interrupted one does not count
    assert resumed.trials[3].params == resumed.trials[2].params  # and is re-run with the same values
    assert resumed.trials[3].user_attrs["interrupted"] is False
    rows = json.loads((tmp_path / "study" / "trials.json").read_text())
    assert [r["state"] for r in rows] == states
    assert (tmp_path / "study" / "pareto_front.png").stat().st_size > 10_000
    assert len({r["trial_dir"] for r in rows}) == 5

    again = _sweep(tmp_path, 4, FakeRunner())  # already complete: nothing runs
    assert len(again.trials) == 5


def test_sweep_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trials must be a positive integer, got 0"):
        sweep.run_sweep(QUICKSTART, 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sweep.run_sweep(tmp_path / "nope.yaml", 1, tmp_path)
    with pytest.raises(ValueError, match="cannot set 'trainer.callbacks.3.init_args.tau'"):
        sweep.run_sweep(
            QUICKSTART,
            1,
            tmp_path,
            space={"trainer.callbacks.3.init_args.tau": {"type": "float", "low": 0.1, "high": 1.0}},
            overrides={"trainer.callbacks": []},
        )
    assert sweep.main(["-c", str(tmp_path / "nope.yaml"), "--trials", "1", "--study-dir", str(tmp_path)]) == 2


def test_real_sweep_on_digits_interrupted_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trial is a real `distill fit` subprocess; --trials 2, then 3: one more trial, and the front."""
    monkeypatch.chdir(tmp_path)
    args = [
        "-c",
        str(QUICKSTART),
        "--study-dir",
        "study",
        "--set",
        "trainer.max_epochs=1",
        "--set",
        "trainer.limit_train_batches=3",
        "--set",
        "trainer.limit_val_batches=2",
        "--set",
        "trainer.enable_progress_bar=false",
        "--set",
        "trainer.enable_model_summary=false",
    ]
    assert sweep.main([*args, "--trials", "2"]) == 0
    assert sweep.main([*args, "--trials", "3"]) == 0
    study = optuna.load_study(study_name="teacher", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t in study.trials:
        acc = t.user_attrs["accuracy"]
        assert 0.0 <= acc <= 1.0 and t.values == pytest.approx([100 * (1 - acc), 1.0])
        assert Path(t.user_attrs["run_dir"]).name == "version_0"
    lrs = [t.params["model.init_args.optimizer.init_args.lr"] for t in study.trials]
    assert len(set(lrs)) == 3
    assert (tmp_path / "study" / "pareto_front.png").is_file()
    assert not (tmp_path / "runs").exists()  # every output went into the study folder
