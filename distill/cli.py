"""The ``distill`` command.

``distill fit|validate|test|predict -c CONFIG`` is a :class:`pytorch_lightning.cli.LightningCLI` (one YAML file is
one experiment); ``distill compress|evaluate|report|sweep ...`` are the package's own commands, dispatched before
LightningCLI parses anything. ``python -m distill`` is the same command.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from distill.callbacks.checkpoint import AtomicCheckpointIO
from distill.callbacks.checkpoint import ModelCheckpoint as FastModelCheckpoint
from distill.callbacks.progress import ProgressBar
from distill.compress.pipeline import format_summary
from distill.errors import (
    CheckpointError,
    check_checkpoint_file,
    find_config_error,
    find_exception,
    find_user_error,
    user_message,
)

__all__ = ["DistillCLI", "main"]

# Commands that are not Trainer methods: name -> "module:function(argv) -> int | None".
EXTRA_COMMANDS: dict[str, str] = {
    "compress": "distill.compress.cli:compress_main",
    "evaluate": "distill.compress.cli:evaluate_main",
    "report": "distill.report:main",
    "sweep": "distill.sweep:main",
}

DEFAULT_RUN_ROOT = "runs"

# Trainer settings where an int counts batches and a float is a fraction: see DistillCLI._whole_number_limits
_WHOLE_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                      "overfit_batches", "val_check_interval")


class DistillCLI(LightningCLI):
    """LightningCLI with distill's defaults.

    * any LightningModule / LightningDataModule by ``class_path`` (subclass mode),
    * a TensorBoard logger writing under ``runs/<name>/version_N``,
    * a :class:`~pytorch_lightning.callbacks.ModelCheckpoint` on ``val/acc`` plus ``last.ckpt``, configurable as
      ``checkpoint.*`` (:class:`distill.callbacks.checkpoint.ModelCheckpoint`, Lightning's with less per-step work),
    * a fixed seed (42) unless the config says otherwise,
    * a progress bar that redraws at most every 0.1 s (:class:`distill.callbacks.progress.ProgressBar`; Lightning's
      default redraws after every batch, 8-12% of a small CPU model's throughput),
    * no profiler, without the cost of Lightning's default no-op one (:class:`distill.module_utils.NoOpProfiler`).
    """

    _whole_limits: dict[str, int] = {}  # noqa: RUF012 - replaced, never mutated: _whole_number_limits
    _checked_ckpt_path: Any = None  # the --ckpt_path already checked (_check_ckpt_path runs twice)

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        self._raw_args = list(sys.argv[1:] if args is None else args)  # for _whole_number_limits
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = {
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": DEFAULT_RUN_ROOT, "name": "default"},
            },
            "profiler": {"class_path": "distill.module_utils.NoOpProfiler"},
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Lightning's ModelCheckpoint, minus two per-step costs (distill.callbacks.checkpoint says which)
        parser.add_lightning_class_args(FastModelCheckpoint, "checkpoint")
        # Lightning's save_last only copies last.ckpt when a top-k checkpoint is written, so with a monitored best
        # model last.ckpt would lag behind and a resumed run would restart from an old epoch. A second, unmonitored
        # checkpoint named "last" is rewritten at every validation, in the same folder.
        parser.add_lightning_class_args(FastModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.save_on_interrupt": True,  # Ctrl-C keeps the steps done since the last epoch end
            }
        )
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # jsonargparse turns them into floats again as it instantiates the classes: _whole_number_limits
        section = self._get(self.config_init, "trainer")
        for key, number in self._whole_limits.items():
            section[key] = number
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning adds its own TQDMProgressBar when the config names none; swap in the time-limited one. A progress
        # bar the config gives in trainer.callbacks is the user's choice and stays.
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        # checkpoints written in their own folder and renamed into place (distill.callbacks.checkpoint says why); a
        # checkpoint IO plugin given in the config is kept
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
        for i, cb in enumerate(callbacks):
            if type(cb) is TQDMProgressBar and not any(cb is c for c in configured):
                callbacks[i] = ProgressBar(cb.refresh_rate, cb.process_position)
        return trainer

    def before_instantiate_classes(self) -> None:
        self._whole_number_limits()

    def _whole_number_limits(self) -> None:
        """Give the Trainer the whole numbers the user wrote for ``limit_*_batches`` & co., not floats.

        For these settings Lightning reads an int as a number of batches and a float as a fraction (``1`` = one batch,
        ``1.0`` = all). Their annotation is ``Union[int, float]``, but typing caches unions by equality, so an equal
        ``Union[float, int]`` built earlier by another import may stand in for it, and jsonargparse then parses ``3``
        as ``3.0`` (rejected by Lightning) and ``1`` as all batches. What the user wrote decides: the last config file
        (``-c``) or command-line flag that sets the key, in order, as jsonargparse applies them.
        """
        sub = self.config.get("subcommand")
        trainer = (self.config[sub] if sub else self.config).get("trainer")
        if trainer is None:
            return
        raw: dict[str, Any] = {}
        for name, value in _options(self._raw_args):
            if name in _CONFIG_FLAGS:
                loaded = _load_yaml(value)
                section = loaded.get("trainer") if isinstance(loaded, dict) else None
                if isinstance(section, dict):
                    raw.update({k: section[k] for k in _WHOLE_OR_FRACTION if k in section})
            elif name.startswith("--trainer.") and name[len("--trainer."):] in _WHOLE_OR_FRACTION:
                raw[name[len("--trainer."):]] = int(value) if value.strip().isdigit() else value
        self._whole_limits = {k: v for k, v in raw.items() if type(v) is int and trainer.get(k) == v}
        for key, number in self._whole_limits.items():  # also in the config saved in the run folder
            trainer[key] = number

    def _check_ckpt_path(self) -> None:
        """A missing or unreadable ``--ckpt_path`` fails here, in one line, not after the whole set-up."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        # Lightning's special values ("last", "best", "hpc", "registry[:...]") and remote URLs go to Lightning as given
        if path and str(path) not in ("last", "best", "hpc") and not str(path).startswith("registry") \
                and "://" not in str(path) and self._checked_ckpt_path != path:
            check_checkpoint_file(path, "--ckpt_path", lightning=True)  # reads the file: once per path
            self._checked_ckpt_path = path

    def _parse_ckpt_path(self) -> None:
        # Lightning (>= 2.5) reads the checkpoint's hyper-parameters here, in __init__, with torch's bare errors
        self._check_ckpt_path()
        sub = self.config.get("subcommand")
        before = _network_of(self.config[sub].get("model")) if sub else None
        super()._parse_ckpt_path()
        # ...and lets them replace the config's model: a checkpoint of another network would then train that network
        # on this config's data, and fail at the first batch with a shape error (or worse, not fail)
        after = _network_of(self.config[sub].get("model")) if sub else None
        if before is not None and after is not None and after != before:
            path = self.config[sub].get("ckpt_path")
            raise CheckpointError(
                f"--ckpt_path {str(path)!r} was written for another network: the checkpoint has {_describe(after)}, "
                f"the config {_describe(before)}. Fix: resume from this config's own checkpoint (under its "
                "checkpoint.dirpath), or start without --ckpt_path; to start from another run's weights, use the "
                "LoadWeights callback"
            )

    def before_fit(self) -> None:
        # on Lightning < 2.5 (no _parse_ckpt_path) this is the first place that sees --ckpt_path; later, a repeat
        self._check_ckpt_path()

    before_validate = before_test = before_predict = before_fit

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        fast_dev_run = bool(getattr(trainer, "fast_dev_run", False))
        logger = trainer.logger
        lines: list[tuple[str, str]] = []  # (label, text), printed as one aligned column
        if fast_dev_run:
            lines.append(("fast_dev_run", "no logs or checkpoints were written"))
        elif logger is not None and trainer.log_dir:
            lines.append(("run folder", str(trainer.log_dir)))
        for ckpt in getattr(trainer, "checkpoint_callbacks", []):
            if not isinstance(ckpt, ModelCheckpoint) or not ckpt.best_model_path:
                continue
            lines.append(("best checkpoint" if ckpt.monitor else "last checkpoint", ckpt.best_model_path))
        for cb in getattr(trainer, "callbacks", []):  # callbacks that wrote files say where (e.g. the compressed model)
            outputs = getattr(cb, "output_paths", None)
            if callable(outputs):
                lines += [(label, str(path)) for label, path in outputs().items()]
        for cb in getattr(trainer, "callbacks", []):  # ...and what they measured (e.g. the compression rate)
            results = getattr(cb, "summary", None)
            if callable(results):
                lines += [(label, str(text)) for label, text in results().items()]
        if isinstance(logger, TensorBoardLogger) and not fast_dev_run:  # other loggers write no event files
            lines.append(("tensorboard", f"tensorboard --logdir {logger.root_dir}"))
        if lines:
            print(format_summary(lines))


def _network_of(model: Any) -> tuple[Any, ...] | None:
    """The LightningModule's class and its network's spec (``model`` or ``student``) from a parsed config, plain."""
    if model is None:
        return None
    plain = model.as_dict() if hasattr(model, "as_dict") else model
    if not isinstance(plain, dict):
        return None
    args = plain.get("init_args") or {}
    net = args.get("model", args.get("student")) if isinstance(args, dict) else None
    return plain.get("class_path"), repr(net)


def _describe(network: tuple[Any, ...]) -> str:
    return f"{network[0]} of {network[1]}"


def _extra_command(name: str) -> Callable[[list[str]], int | None]:
    module_name, _, func = EXTRA_COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module_name), func)


def _not_an_advert(record: logging.LogRecord) -> bool:
    # Lightning >= 2.6 logs a "Tip" advertising its cloud logger at every fit that does not use it
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def _quiet_third_party() -> None:
    """What ``distill``'s output leaves out of Lightning's, none of it about the user's run: the advert above, and
    torch's FutureWarning (2.14 here) about ``LeafSpec`` that Lightning 2.6's own pytree code triggers at every fit."""
    rank_zero_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_an_advert not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.")


_CONFIG_FLAGS = ("-c", "--config")
_UNREADABLE = object()  # _load_yaml's result for a file that cannot be read or parsed


def _options(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(name, value)`` for each token of a command line, as ``--key value`` or ``--key=value`` (a value's own token
    comes out as a name too, and matches no option the callers look for)."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        yield name, value if eq else (args[i + 1] if i + 1 < len(args) else "")


def _load_yaml(path: str) -> Any:
    """A config file's contents (``None`` when it holds nothing), or ``_UNREADABLE``: missing or malformed files are
    jsonargparse's to report."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return _UNREADABLE


def _empty_config(args: Sequence[str]) -> str | None:
    """The first config file named by ``-c``/``--config`` that exists but holds nothing (blank, or comments only)."""
    return next((path for name, path in _options(args) if name in _CONFIG_FLAGS and _load_yaml(path) is None), None)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``distill`` and ``python -m distill``."""
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    if args and args[0] in EXTRA_COMMANDS:
        code = _extra_command(args[0])(args[1:])
        raise SystemExit(code or 0)
    torch.set_float32_matmul_precision("high")
    empty = _empty_config(args)
    if empty is not None:  # jsonargparse says only "Unexpected config:"
        print(f"distill: error: config file {empty!r} is empty. Fix: give a config with at least a model and data "
              "section, e.g. configs/quickstart/teacher.yaml", file=sys.stderr)
        raise SystemExit(2)
    try:
        # args=None when reading the command line: LightningCLI warns when given both args and a non-empty sys.argv
        DistillCLI(args=None if argv is None else args)
    except Exception as exc:
        if os.environ.get("DISTILL_TRACEBACK"):
            raise
        err = find_user_error(exc)
        if err is not None:
            message = user_message(err)
        elif (config := find_config_error(exc)) is not None:  # an argument check in a configured class's __init__
            message = f"{config[0]}: {config[1]}. Fix: change it in the config file or on the command line."
        # Lightning's own check of the trainer's settings (accelerator: gpu without a GPU, ...): the user's to fix
        elif (setting := find_exception(exc, MisconfigurationException)) is not None:
            message = (f"{user_message(setting).rstrip('.!')}. Fix: change the trainer setting it names, in the config "
                       "file or on the command line (e.g. --trainer.accelerator cpu where there is no GPU).")
        else:
            raise  # a bug: keep the traceback
        print(f"distill: error: {message}\n(DISTILL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
