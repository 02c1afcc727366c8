"""``distill sweep -c CONFIG --trials N``: multi-objective hyper-parameter search over a compression run.

The soft weight-sharing paper (Ullrich, Meeds & Welling 2017) tuned tau, the learning rates, the number of components
and the hyper-prior parameters with Bayesian optimisation (Spearmint). Here Optuna's TPE sampler searches a space of
dotted config keys with two objectives, **accuracy loss** (percentage points, minimised) and **compression rate**
(maximised). Each trial is a real ``distill fit`` of the config (shortened by the config itself, or by ``--set``),
run in a subprocess:

1. the base YAML is loaded, the trial's values are set by dotted path (``trainer.callbacks.0.init_args.tau``: list
   entries by index), the logger and checkpoints are redirected into ``STUDY_DIR/trial_NNNN/``, and the result is
   written to ``STUDY_DIR/trial_NNNN/trial_config.yaml``;
2. ``python -m distill fit -c that/config.yaml`` runs, its output goes to ``trial_NNNN/fit.log``;
3. the objectives are read from the run folder (:func:`read_objectives`): ``accuracy.json`` and
   ``compression_report.json`` when the run compressed, else the last ``test/acc`` / ``val/acc`` scalar and a
   compression rate of 1.

The study lives in ``STUDY_DIR/study.db`` (SQLite): running the same command again resumes it, and ``--trials N``
is the number of finished trials the study should reach. A trial that fails (non-zero exit, non-finite loss or
metrics, missing outputs) is recorded as failed and the sweep goes on; a trial interrupted by Ctrl-C, or left
running by a killed sweep (detected by Optuna's heartbeat), is re-run with the same values on resume. The Pareto
front is drawn as figure 7 (``STUDY_DIR/pareto_front.png``) and all trials are listed in ``STUDY_DIR/trials.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill import plots
from distill.errors import ConfigError
from distill.io import atomic_write_text
from distill.report import NotARunError, load_run

__all__ = [
    "Objectives",
    "SearchParam",
    "TrialFailed",
    "default_space",
    "find_run_dir",
    "get_by_path",
    "main",
    "parse_space",
    "prepare_trial_config",
    "read_objectives",
    "run_sweep",
    "set_by_path",
    "split_path",
]

TRIAL_LOG = "fit.log"


class TrialFailed(RuntimeError):
    """A trial's run failed or diverged: recorded as a failed trial, the sweep goes on."""


# -------------------------------------------------------------------------------------------------------------------
# dotted paths
# -------------------------------------------------------------------------------------------------------------------
def split_path(key: str) -> list[str | int]:
    """Split a dotted key into its parts; integer parts (``callbacks.0``, or ``callbacks[0]``) index lists.

    Raises:
        ValueError: on an empty key or an empty part.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"a dotted key must be a non-empty string, got {key!r}")
    parts: list[str | int] = []
    for raw in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        if raw == "":
            raise ValueError(f"dotted key {key!r} has an empty part")
        parts.append(int(raw) if raw.isdigit() else raw)
    return parts


def _step(node: Any, part: str | int, key: str, create: bool) -> Any:
    if isinstance(node, list):
        if not isinstance(part, int):
            raise KeyError(f"{key!r}: {part!r} indexes a list, expected an integer index")
        if not -len(node) <= part < len(node):
            raise KeyError(f"{key!r}: index {part} out of range for a list of {len(node)} entries")
        return node[part]
    if isinstance(node, dict):
        name = str(part)
        if name not in node or node[name] is None:
            if not create:
                raise KeyError(f"{key!r}: no {name!r} in the config")
            node[name] = {}
        return node[name]
    raise KeyError(f"{key!r}: cannot descend into {type(node).__name__} at {part!r}")


def get_by_path(config: Any, key: str) -> Any:
    """The value at a dotted path of a loaded YAML config.

    Raises:
        KeyError: if the path does not exist.
    """
    node = config
    for part in split_path(key):
        node = _step(node, part, key, create=False)
    return node


def set_by_path(config: dict[str, Any], key: str, value: Any) -> None:
    """Set the value at a dotted path of a loaded YAML config, in place.

    Missing mapping keys are created (an argument the config left at its default); list indices must exist.

    Raises:
        KeyError: if a list index is out of range or a scalar is in the way.
    """
    parts = split_path(key)
    node: Any = config
    for part in parts[:-1]:
        node = _step(node, part, key, create=True)
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise KeyError(f"{key!r}: {last!r} is not a valid index of a list of {len(node)} entries")
        node[last] = value
    elif isinstance(node, dict):
        node[str(last)] = value
    else:
        raise KeyError(f"{key!r}: cannot set {last!r} in a {type(node).__name__}")


# -------------------------------------------------------------------------------------------------------------------
# search space
# -------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search space: a dotted config key and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low or 0), int(self.high or 0), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))


def parse_space(space: Mapping[str, Any]) -> list[SearchParam]:
    """Validate a search space: ``{dotted key: {type: float|int|categorical, low, high, log, choices}}``.

    Raises:
        ValueError: naming the key, for an unknown type, missing or inverted bounds, a log range not above 0, or
            empty choices.
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"the search space must be a non-empty mapping of dotted keys, got {space!r}")
    params = []
    for key, spec in space.items():
        split_path(key)
        if not isinstance(spec, Mapping):
            raise ValueError(f"space[{key!r}] must be a mapping with a type, got {spec!r}")
        kind = spec.get("type")
        unknown = set(spec) - {"type", "low", "high", "log", "choices"}
        if unknown:
            raise ValueError(f"space[{key!r}] has unknown fields {sorted(unknown)}: expected type/low/high/log/choices")
        if kind in ("float", "int"):
            low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
            if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
                raise ValueError(f"space[{key!r}] needs numbers low < high, got low={low!r}, high={high!r}")
            if log and low <= 0:
                raise ValueError(f"space[{key!r}] has log: true, so low must be > 0, got {low}")
            params.append(SearchParam(key, kind, float(low), float(high), log))
        elif kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(
                    f"space[{key!r}] is categorical and needs a non-empty list of choices, got {choices!r}"
                )
            params.append(SearchParam(key, kind, choices=tuple(choices)))
        else:
            raise ValueError(f"space[{key!r}] has type {kind!r}: expected 'float', 'int' or 'categorical'")
    return params


# Defaults for GMMPrior arguments (Ullrich et al. searched tau, learning rates, J and the hyper-priors).
_GMM_DEFAULTS: tuple[tuple[Callable[[str], bool], dict[str, Any]], ...] = (
    (lambda n: n == "tau", {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}),
    (
        lambda n: n in {"num_components", "n_components", "components"},
        {"type": "int", "low": 4, "high": 24},
    ),
    (
        lambda n: n == "lr" or n.endswith("_lr") or n.startswith("lr_"),
        {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    ),
    (
        lambda n: n.startswith(("gamma_", "beta_")) and n.endswith(("alpha", "beta", "_a", "_b", "shape", "rate")),
        {"type": "float", "low": 1e-1, "high": 1e4, "log": True},
    ),
)


def _init_arg_names(entry: Mapping[str, Any]) -> set[str]:
    names = set((entry.get("init_args") or {}).keys())
    module_name, _, cls_name = str(entry.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        names |= {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    except (ImportError, AttributeError, ValueError, TypeError):
        pass
    return names


def default_space(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The default search space of a config: the model's optimizer learning rate and, for each ``GMMPrior`` in
    ``trainer.callbacks``, its tau, number of components, learning rates and Gamma/Beta hyper-prior parameters
    (those of its arguments that exist, by name).

    Returns:
        A space mapping as accepted by :func:`parse_space` (empty if nothing is known to tune).
    """
    space: dict[str, dict[str, Any]] = {}
    lr_key = "model.init_args.optimizer.init_args.lr"
    try:
        if isinstance(get_by_path(config, lr_key), (int, float)):
            space[lr_key] = {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}
    except KeyError:
        pass
    try:
        callbacks = get_by_path(config, "trainer.callbacks")
    except KeyError:
        callbacks = []
    for i, entry in enumerate(callbacks if isinstance(callbacks, list) else []):
        if not isinstance(entry, Mapping) or not str(entry.get("class_path", "")).endswith("GMMPrior"):
            continue
        for name in sorted(_init_arg_names(entry)):
            for match, spec in _GMM_DEFAULTS:
                if match(name):
                    space[f"trainer.callbacks.{i}.init_args.{name}"] = dict(spec)
                    break
    return space


# -------------------------------------------------------------------------------------------------------------------
# trial configs and objectives
# -------------------------------------------------------------------------------------------------------------------
def prepare_trial_config(base: Mapping[str, Any], values: Mapping[str, Any], trial_dir: Path) -> dict[str, Any]:
    """A copy of ``base`` with ``values`` set by dotted path and outputs redirected into ``trial_dir``.

    The TensorBoard/CSV logger writes to ``trial_dir/run/version_0`` (a TensorBoard logger is added if the config
    has none), checkpoints to ``trial_dir/checkpoints``, and ``trainer.default_root_dir`` is ``trial_dir``.
    """
    cfg: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in values.items():
        set_by_path(cfg, key, value)
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(trial_dir)
    logger = trainer.get("logger")
    if logger is None or logger is True:
        logger = {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {}}
        trainer["logger"] = logger
    entries = logger if isinstance(logger, list) else [logger]
    for entry in entries:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith(("TensorBoardLogger", "CSVLogger")):
            entry["init_args"] = {
                **(entry.get("init_args") or {}),
                "save_dir": str(trial_dir),
                "name": "run",
                "version": 0,
            }
            break
    checkpoint = cfg.get("checkpoint")
    cfg["checkpoint"] = {
        **(checkpoint if isinstance(checkpoint, dict) else {}),
        "dirpath": str(trial_dir / "checkpoints"),
    }
    return cfg


def find_run_dir(trial_dir: Path) -> Path | None:
    """The run folder inside a trial folder: the most recently written folder holding run outputs."""
    candidates = []
    for folder in [trial_dir, *(p for p in trial_dir.rglob("*") if p.is_dir())]:
        try:
            candidates.append(load_run(folder, scalars=False).run_dir)
        except NotARunError:
            continue
    candidates = [c for c in candidates if c.name != "checkpoints"]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


@dataclass(frozen=True)
class Objectives:
    """What a trial achieved.

    Attributes:
        accuracy_loss: reference minus compressed accuracy, in percentage points (minimised).
        compression_rate: original size / compressed size (maximised; 1 without compression).
        accuracy: the compressed (or, without compression, the trained) network's accuracy in [0, 1].
        reference: the accuracy the loss is measured from.
        source: where the accuracy was read.
    """

    accuracy_loss: float
    compression_rate: float
    accuracy: float
    reference: float
    source: str


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else math.nan


def read_objectives(run_dir: str | os.PathLike[str], reference_acc: float | None = None) -> Objectives:
    """The two objectives of a finished run.

    * With ``accuracy.json`` (a compression run): the accuracy is ``decoded`` (else ``quantized``), measured from
      ``reference_acc``, else ``accuracy.json["original"]``, else ``accuracy.json["before"]``.
    * Without it: the last logged ``test/acc``, else ``val/acc`` (TensorBoard), measured from ``reference_acc``, else
      from 1.0 (the loss is then the error rate).
    * The compression rate is ``compression_report.json["totals"]["compression_rate"]``, else 1.0.

    Raises:
        TrialFailed: if the run diverged (non-finite last ``train/loss`` or objective) or logged no accuracy.
    """
    run = load_run(run_dir)
    losses = run.scalars.get("train/loss") or []
    if losses and not math.isfinite(losses[-1][1]):
        raise TrialFailed(f"diverged: last train/loss is {losses[-1][1]} in {run.run_dir}")
    acc_json = run.accuracy or {}
    accuracy: float | None = None
    reference: float | None = reference_acc
    source = ""
    for key in ("decoded", "quantized"):
        accuracy, source = _finite(acc_json.get(key)), f"accuracy.json[{key!r}]"
        if accuracy is not None:
            break
    if accuracy is not None:
        for key in ("original", "before"):
            if reference is None:
                reference = _finite(acc_json.get(key))
    else:
        for tag in ("test/acc", "val/acc"):
            accuracy, source = _finite(run.last_scalar(tag)), f"last {tag}"
            if accuracy is not None:
                break
    if accuracy is None:
        raise TrialFailed(f"no accuracy in {run.run_dir}: expected accuracy.json or a test/acc or val/acc scalar")
    if reference is None:
        reference = 1.0
    totals = (run.compression_report or {}).get("totals") or {}
    rate = _finite(totals.get("compression_rate")) if totals else 1.0
    if rate is None:
        rate = 1.0
    if not (math.isfinite(accuracy) and math.isfinite(reference) and math.isfinite(rate)):
        raise TrialFailed(f"non-finite objectives in {run.run_dir}: accuracy={accuracy}, rate={rate}")
    return Objectives(100.0 * (reference - accuracy), rate, accuracy, reference, source)


# -------------------------------------------------------------------------------------------------------------------
# running trials
# -------------------------------------------------------------------------------------------------------------------
TrialRunner = Callable[[Path, Path], int]


def run_fit_subprocess(config_path: Path, trial_dir: Path, timeout: float | None = None) -> int:
    """Run ``python -m distill fit -c config_path`` in a subprocess, output to ``trial_dir/fit.log``.

    The sweep's own ``distill`` package is put first on ``PYTHONPATH`` so a checkout works without installing.
    Ctrl-C (or SIGTERM) stops the child too.

    Returns:
        The exit code (``-9``-style negative for a signal, 124 for a timeout).
    """
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "distill", "fit", "-c", str(config_path)]
    with open(trial_dir / TRIAL_LOG, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return 124
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def _finished_count(study: Any) -> int:
    """Trials that count towards ``--trials``: complete, pruned, or failed for a reason of their own (not those
    interrupted or left stale by a stopped sweep, which are re-run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    count = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            count += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and t.number not in retried:
            count += 1
    return count


def _retry_callback() -> Any:
    """Optuna's callback that re-queues a trial with the same values (renamed in Optuna 4.9)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=None)


def _retried_numbers(trials: Sequence[Any]) -> set[int]:
    """Numbers of the trials that were re-queued (the retry callback records each chain in ``retry_history``)."""
    retried: set[int] = set()
    for t in trials:
        retried.update(t.system_attrs.get("retry_history", []))
    return retried


def _requeue_interrupted(study: Any) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            _retry_callback()(study, t)


def _fail(trial: Any, message: str) -> None:
    trial.set_user_attr("fail_reason", message)
    raise TrialFailed(message)


def _write_outputs(study: Any, study_dir: Path) -> dict[str, Path]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "values": t.values,
                "params": t.params,
                **{k: v for k, v in t.user_attrs.items()},
            }
        )
    written = {"trials": atomic_write_text(study_dir / "trials.json", json.dumps(rows, indent=2) + "\n")}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    fig = plots.pareto_figure(
        [(f"#{t.number}", float(t.values[0]), float(t.values[1])) for t in complete],
        title=f"sweep {study.study_name}: accuracy loss vs compression rate ({len(complete)} trials)",
    )
    written["pareto front"] = plots.save_figure(fig, study_dir / "pareto_front.png")
    return written


def run_sweep(
    config: str | os.PathLike[str],
    trials: int,
    study_dir: str | os.PathLike[str],
    *,
    space: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    reference_acc: float | None = None,
    study_name: str | None = None,
    seed: int = 0,
    timeout: float | None = None,
    runner: TrialRunner | None = None,
    heartbeat_interval: int = 30,
    grace_period: int | None = None,
) -> Any:
    """Run (or resume) a sweep until the study holds ``trials`` finished trials.

    Args:
        config: the base ``distill fit`` YAML.
        trials: number of finished trials to reach (a resumed sweep runs only the missing ones).
        study_dir: folder of the study (``study.db``), the trial folders and the outputs.
        space: search space (see :func:`parse_space`); default :func:`default_space` of the config.
        overrides: fixed ``dotted key -> value`` settings for every trial (e.g. ``trainer.max_epochs``).
        reference_acc: accuracy the loss is measured from (see :func:`read_objectives`).
        study_name: the Optuna study name (default: the config's file name without suffix).
        seed: sampler seed (offset by the number of trials already in the study, so a resumed sweep does not
            repeat the first samples).
        timeout: seconds a trial may run before it is killed and recorded as failed.
        runner: ``runner(config_path, trial_dir) -> exit code`` (default: :func:`run_fit_subprocess`).
        heartbeat_interval: seconds between a running trial's heartbeats in the database.
        grace_period: seconds without a heartbeat after which a running trial is stale (default twice the interval).

    Returns:
        The Optuna study.

    Raises:
        ValueError: for a bad ``trials``, config or space (naming the key). FileNotFoundError: missing config.
    """
    import optuna

    with warnings.catch_warnings():  # heartbeats and retries are marked experimental in Optuna
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return _run_sweep(
            config,
            trials,
            study_dir,
            space=space,
            overrides=overrides,
            reference_acc=reference_acc,
            study_name=study_name,
            seed=seed,
            timeout=timeout,
            runner=runner,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )


def _run_sweep(
    config: str | os.PathLike[str],
    trials: int,
    study_dir: str | os.PathLike[str],
    *,
    space: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None,
    reference_acc: float | None,
    study_name: str | None,
    seed: int,
    timeout: float | None,
    runner: TrialRunner | None,
    heartbeat_interval: int,
    grace_period: int | None,
) -> Any:
    import optuna

    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if reference_acc is not None and not 0.0 <= reference_acc <= 1.0:
        raise ValueError(f"reference_acc must be an accuracy in [0, 1], got {reference_acc}")
    config_path = Path(config)
    if not config_path.is_file():
        raise FileNotFoundError(f"config {str(config_path)!r} does not exist")
    base = _read_yaml(config_path, "config", "give a `distill fit` YAML config, e.g. configs/quickstart/teacher.yaml")
    if not isinstance(base, dict):
        raise ValueError(f"config {str(config_path)!r} must be a YAML mapping, got {type(base).__name__}")
    fixed = dict(overrides or {})
    space_map = dict(space) if space is not None else default_space(base)
    if not space_map:
        raise ValueError(
            f"no default search space for {str(config_path)!r} (no optimizer lr, no GMMPrior): pass a space"
        )
    params = parse_space(space_map)
    probe = copy.deepcopy(base)
    for key in [*fixed, *(p.key for p in params)]:
        try:
            set_by_path(probe, key, 0)
        except KeyError as err:
            raise ValueError(f"cannot set {key!r} in {str(config_path)!r}: {err.args[0]}") from None
    run = runner or (lambda cfg, trial_dir: run_fit_subprocess(cfg, trial_dir, timeout))

    study_root = Path(study_dir).resolve()
    study_root.mkdir(parents=True, exist_ok=True)
    # A trial left running by a killed sweep stops sending heartbeats: it is then marked failed and re-queued with
    # the same values (Optuna >= 4.9 names the argument heartbeat_stale_trial_callback).
    retry = _retry_callback()
    stale_arg = "heartbeat_stale_trial_callback"
    if stale_arg not in inspect.signature(optuna.storages.RDBStorage).parameters:
        stale_arg = "failed_trial_callback"
    stale_kwargs: dict[str, Any] = {stale_arg: retry}
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{study_root / 'study.db'}",
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        **stale_kwargs,
    )
    study = optuna.create_study(
        storage=storage,
        study_name=study_name or config_path.stem,
        directions=["minimize", "maximize"],
        load_if_exists=True,
    )
    study.set_metric_names(["accuracy_loss_pp", "compression_rate"])
    _requeue_interrupted(study)

    def objective(trial: Any) -> tuple[float, float]:
        values = {p.key: p.suggest(trial) for p in params}
        trial_dir = study_root / f"trial_{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial_cfg = trial_dir / "trial_config.yaml"
        atomic_write_text(trial_cfg, yaml.safe_dump(prepare_trial_config(base, {**fixed, **values}, trial_dir)))
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("interrupted", False)  # a re-run trial inherits the user attributes of the original
        try:
            code = run(trial_cfg, trial_dir)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        if code != 0:
            _fail(trial, f"distill fit exited with code {code}; see {trial_dir / TRIAL_LOG}")
        run_dir = find_run_dir(trial_dir)
        if run_dir is None:
            _fail(trial, f"no run outputs under {trial_dir}")
        assert run_dir is not None
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            obj = read_objectives(run_dir, reference_acc)
        except TrialFailed as err:
            _fail(trial, str(err))
        trial.set_user_attr("accuracy", obj.accuracy)
        trial.set_user_attr("reference_acc", obj.reference)
        trial.set_user_attr("accuracy_source", obj.source)
        return obj.accuracy_loss, obj.compression_rate

    # One trial per optimize call: the count is re-read each time, so stale trials re-queued by the heartbeat check
    # and failures are accounted for. The bound only guards against a study that never finishes trials.
    for _ in range(4 * trials + 8):
        if _finished_count(study) >= trials:
            break
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        last = study.trials[-1]
        if last.state.name == "FAIL":
            print(
                f"trial {last.number} failed: {last.user_attrs.get('fail_reason', 'see its fit.log')}", file=sys.stderr
            )
        elif last.values is not None:
            print(f"trial {last.number}: accuracy loss {last.values[0]:.3f} pp, compression rate {last.values[1]:.2f}x")
    _write_outputs(study, study_root)
    return study


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(err, yaml.MarkedYAMLError):
        what = ", ".join(str(part) for part in (err.context, err.problem) if part)
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{what or type(err).__name__}{where}"
    return " ".join(str(err).split()) or type(err).__name__


def _read_yaml(path: str | os.PathLike[str], what: str, fix: str) -> Any:
    """The parsed YAML file ``path``.

    Raises:
        ConfigError: if it cannot be read or is not valid YAML, naming ``what`` (e.g. "config"), the file, the
            problem and ``fix``.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {err.strerror or err}. Fix: {fix}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not a UTF-8 text file ({err.reason} at byte {err.start}). "
                          f"Fix: {fix}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {_yaml_problem(err)}. Fix: correct the YAML "
                          "there (indentation, an unclosed bracket or quote, a missing ': ')") from err


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        split_path(key)
        return key, yaml.safe_load(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
    except yaml.YAMLError as err:  # argparse reports only ValueError/TypeError/ArgumentTypeError of a type function
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value is not valid YAML ({_yaml_problem(err)}); write it as YAML, e.g. quote a "
            "string that holds brackets, braces or ': '"
        ) from err


def main(argv: Sequence[str] | None = None) -> int:
    """``distill sweep -c CONFIG --trials N [--study-dir DIR] [--space SPACE.yaml] [--set KEY=VALUE ...]``."""
    parser = argparse.ArgumentParser(
        prog="distill sweep",
        description="Multi-objective hyper-parameter search (accuracy loss, compression rate) of a fit config. "
        "Run the same command again to resume.",
    )
    parser.add_argument("-c", "--config", required=True, help="the base `distill fit` YAML")
    parser.add_argument("--trials", type=int, required=True, help="number of finished trials the study should reach")
    parser.add_argument("--study-dir", default=None, help="study folder (default: sweeps/<config name>)")
    parser.add_argument(
        "--space", default=None, help="YAML search space: dotted key -> {type, low, high, log, choices}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="fixed setting for every trial, e.g. trainer.max_epochs=5",
    )
    parser.add_argument("--reference-acc", type=float, default=None, help="accuracy the loss is measured from")
    parser.add_argument("--study-name", default=None, help="Optuna study name (default: the config's name)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a trial is killed (failed)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    if args.timeout is not None and not 0 < args.timeout < math.inf:
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout}; leave it out for no limit")
    space = None
    if args.space is not None:
        try:
            space = _read_yaml(args.space, "--space file", "give an existing YAML search space (dotted key -> {type, "
                              "low, high, log, choices}), or leave --space out to search the config's default space")
        except ConfigError as err:
            print(f"distill sweep: error: {err}", file=sys.stderr)
            return 2
    study_dir = args.study_dir or str(Path("sweeps") / Path(args.config).stem)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is printed below, one line each
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        study = run_sweep(
            args.config,
            args.trials,
            study_dir,
            space=space,
            overrides=dict(args.overrides),
            reference_acc=args.reference_acc,
            study_name=args.study_name,
            seed=args.seed,
            timeout=args.timeout,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"distill sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"distill sweep: interrupted; run the same command again to resume the study in {study_dir}",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"study:        {Path(study_dir) / 'study.db'} ({len(study.trials)} trials)")
    for t in study.best_trials:
        print(f"pareto #{t.number}: accuracy loss {t.values[0]:.3f} pp, compression {t.values[1]:.2f}x, {t.params}")
    print(f"pareto front: {Path(study_dir) / 'pareto_front.png'}")
    print(f"trials:       {Path(study_dir) / 'trials.json'}")
    return 0
