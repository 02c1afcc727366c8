"""Helpers shared by distill's LightningModules: networks as arguments, injected optimizers, cheap logging."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.profilers import PassThroughProfiler
from torch import nn

from distill.arch import arch_spec, build_module
from distill.errors import ConfigError, DistillError

__all__ = [
    "RNG_KEY",
    "FastSetattrMixin",
    "NoOpProfiler",
    "ResumableRNGMixin",
    "as_module",
    "batch_error",
    "raise_batch_error",
    "piecewise_schedule",
    "schedule_at",
    "configure_optimizers",
    "skip_idle_graph_capture_check",
    "save_arch_hparams",
    "save_hparams",
    "rng_states",
    "set_rng_states",
    "should_log_step",
]


def as_module(model: nn.Module | Mapping[str, Any], argument: str = "model") -> nn.Module:
    """Accept a module or its ``{"class_path", "init_args"}`` description (as stored in checkpoints)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Mapping):
        return build_module(model)
    raise TypeError(f"{argument} must be an nn.Module or a class_path/init_args mapping, got {type(model).__name__}")


def piecewise_schedule(
    schedule: Mapping[Any, Any], name: str, upper: float | None = None, example: str = "{0: 1.0, 20: 0.1}"
) -> dict[int, float]:
    """A piecewise-constant ``{first epoch: value}`` schedule from YAML, checked and sorted by epoch.

    Keys must be integers >= 0 (strings of them too, as JSON gives them back) and include 0; values finite, >= 0 and
    at most ``upper``.

    Raises:
        ValueError: naming the bad entry and the expected form.
    """
    out: dict[int, float] = {}
    bound = "" if upper is None else f" and <= {upper:g}"
    for e, v in schedule.items():
        try:
            epoch, value = int(e), float(v)
        except (TypeError, ValueError):
            epoch, value = -1, math.nan
        if (
            epoch < 0
            or str(e).strip() != str(epoch)
            or not (math.isfinite(value) and value >= 0 and (upper is None or value <= upper))
        ):
            raise ValueError(
                f"{name} schedule: each entry must be 'first epoch (integer >= 0): {name} (number >= 0{bound})', got "
                f"{e!r}: {v!r} in {dict(schedule)!r}"
            )
        out[epoch] = value
    if 0 not in out:
        raise ValueError(f"{name} schedule {dict(schedule)!r} must give {name} from epoch 0 on, e.g. {example}")
    return dict(sorted(out.items()))


def schedule_at(schedule: dict[int, float], epoch: int) -> float:
    """The value of a :func:`piecewise_schedule` at ``epoch`` (that of the last entry starting at or before it)."""
    return next(v for e, v in reversed(schedule.items()) if epoch >= e)


def configure_optimizers(
    module: pl.LightningModule,
    params: Any,
    optimizer: OptimizerCallable,
    lr_scheduler: LRSchedulerCallable | None,
    monitor: str = "val/loss",
) -> Any:
    """Build the injected optimizer (and scheduler) over ``params``, in Lightning's return format."""
    try:
        opt = optimizer(params)
    except ValueError as err:  # torch checks its arguments only now, at fit time: say where the value came from
        raise ConfigError(f"optimizer: {err}. Fix: change model.init_args.optimizer in the config file or on the "
                          "command line") from err
    skip_idle_graph_capture_check(opt)
    if lr_scheduler is None:
        return opt
    try:
        sched = lr_scheduler(opt)
    except ValueError as err:
        raise ConfigError(f"lr_scheduler: {err}. Fix: change model.init_args.lr_scheduler in the config file or on "
                          "the command line") from err
    config: dict[str, Any] = {"scheduler": sched, "interval": "epoch"}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return {"optimizer": opt, "lr_scheduler": config}


@functools.cache
def _accelerator_available() -> bool:
    accelerator = torch.accelerator  # torch >= 2.6 (pyproject's floor)
    if hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    try:  # torch 2.6 has no is_available, and raises here when no accelerator is available
        return accelerator.current_accelerator() is not None
    except RuntimeError:
        return False


def _no_graph_capture_check() -> None:
    return None


def skip_idle_graph_capture_check(optimizer: torch.optim.Optimizer, always: bool = False) -> bool:
    """Drop torch's per-step CUDA/XPU graph-capture check from ``optimizer`` when the process has no accelerator.

    ``Adam.step`` (and most torch optimizers) first ask whether an accelerator graph is being captured. Lightning sets
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when imported, which turns that question into an NVML discovery (a ``dlopen``)
    on every call on a CUDA build of torch without a GPU: 0.1-0.3 ms a step, 5-8% of a LeNet-300-100 step on a CPU,
    which a plain PyTorch script does not pay. Without an accelerator the check returns without doing anything, so
    skipping it changes nothing else; with one it is left in place, unless ``always`` (an optimizer whose step is
    never captured in a graph, such as the GMM prior's, which runs inside a callback). Returns whether it was skipped.
    """
    if not always and _accelerator_available():
        return False
    skipped = False
    for name in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):  # torch >= / < 2.6
        if hasattr(type(optimizer), name):
            setattr(optimizer, name, _no_graph_capture_check)  # instance attribute: this optimizer only
            skipped = True
    return skipped


class NoOpProfiler(PassThroughProfiler):
    """Lightning's default profiler (none), without its per-call cost: ``distill fit``'s default.

    Lightning wraps every hook call in ``trainer.profiler.profile(name)`` (~60 times a training step); the default
    :class:`~pytorch_lightning.profilers.PassThroughProfiler` builds a generator-based context manager each time
    (~1.5 us, ~2-3% of a LeNet-300-100 step on a CPU). This one returns one shared no-op context. Any real profiler
    (``--trainer.profiler simple``) replaces it.
    """

    _context = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return self._context


RNG_KEY = "distill_rng_states"


def rng_states() -> dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA) as tensors and plain lists, so that a checkpoint
    holding them still loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    states: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (the parts present)."""
    import random

    import numpy as np

    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableRNGMixin:
    """Save the global random states in every checkpoint and restore them on resume (one process only).

    The training loader shuffles with the global torch generator (as PyTorch's ``RandomSampler`` does), and dropout and
    augmentation draw from it too; Lightning restores neither, so a run resumed from ``last.ckpt`` went on with other
    batches than the uninterrupted run. With the states restored, a resume at an epoch boundary ends where the
    uninterrupted run ends (tested); mid-epoch, distill's resumable training loader
    (:class:`distill.data.ResumableDataLoader`) restores the states of its own moment as the rest of the epoch starts.
    Under DDP each process has its own states, and the samplers Lightning installs shuffle by seed and epoch, so
    nothing is restored there.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only when a fit resumes: load_from_checkpoint() in a notebook must not reset the caller's random states
        trainer: Any = getattr(self, "_trainer", None)
        fitting = trainer is not None and getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        if RNG_KEY in checkpoint and fitting and trainer.world_size == 1:
            set_rng_states(checkpoint[RNG_KEY])
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


class FastSetattrMixin:
    """Skip ``nn.Module.__setattr__`` for the string Lightning sets around every hook call.

    Lightning assigns ``_current_fx_name`` twice per hook (~40 times a step); ``nn.Module.__setattr__`` scans the
    parameter, buffer and module dicts each time. For a plain string the result is the same as ``object``'s.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def batch_error(
    err: Exception, networks: Sequence[tuple[str, nn.Module]], batch: Any, same_outputs: bool = False
) -> Exception:
    """The error to raise for ``err``, raised while a step ran ``networks`` on ``batch``: a :class:`ConfigError`
    naming the network that cannot take the data (its inputs' shape, or labels beyond its outputs, or two networks
    whose outputs a loss compares but which differ, with ``same_outputs``) when that is what went wrong, else ``err``.

    A network built for other data fails deep in torch ("mat1 and mat2 shapes cannot be multiplied", "Target 8 is out
    of bounds"), which names neither the network nor the fix. The steps call this only when they fail, so it costs
    nothing on the way that works; it runs each network once more on the batch, in eval mode, without gradients and
    with the random state restored, so that no state of the run changes.
    """
    if isinstance(err, (DistillError, torch.OutOfMemoryError)) or not isinstance(
            err, (RuntimeError, IndexError, ValueError, TypeError)):
        return err
    if not (isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor)):
        return err
    x = batch[0]
    y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
    outputs: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for role, net in networks:
            modes = [(m, m.training) for m in net.modules()]
            net.eval()
            try:
                out = net(x)
            except Exception as probe:  # noqa: BLE001 - whatever it is, it is this network's failure on these inputs
                return ConfigError(
                    f"the {role} ({type(net).__name__}) cannot take this data's inputs: a batch of shape "
                    f"{tuple(x.shape)} ({x.dtype}) fails in its forward ({_first_line(probe)}). Fix: give a {role} "
                    f"built for this data set's inputs, or train on the data it was built for"
                )
            finally:
                for m, mode in modes:
                    m.training = mode
            if isinstance(out, torch.Tensor):
                outputs[role] = (net, out)
    if y is not None and not y.is_floating_point() and y.numel():
        top = int(y.max())
        for role, (net, out) in outputs.items():
            if out.ndim == 2 and top >= out.shape[1]:
                return ConfigError(
                    f"the {role} ({type(net).__name__}) has {out.shape[1]} outputs, but this data's labels go up to "
                    f"{top}. Fix: build it with {top + 1} classes (its num_classes argument), or use data with "
                    f"{out.shape[1]} classes"
                )
    if same_outputs and len(outputs) == 2:
        (r1, (n1, o1)), (r2, (n2, o2)) = outputs.items()
        if o1.shape != o2.shape:
            return ConfigError(
                f"the {r1} ({type(n1).__name__}) gives outputs of shape {tuple(o1.shape)} and the {r2} "
                f"({type(n2).__name__}) {tuple(o2.shape)}: the loss compares the two. Fix: give both the same "
                "number of classes"
            )
    return err


def raise_batch_error(
    err: Exception, networks: Sequence[tuple[str, nn.Module]], batch: Any, same_outputs: bool = False
) -> NoReturn:
    """Raise :func:`batch_error`'s error for ``err`` (``err`` itself, its traceback kept, if the networks take the
    batch)."""
    new = batch_error(err, networks, batch, same_outputs)
    if new is err:
        raise err
    raise new from err


def should_log_step(module: pl.LightningModule) -> bool:
    """Whether this training step's scalars would reach the logger (every ``log_every_n_steps``).

    ``self.log`` costs about as much as a LeNet-300-100 step on a CPU, so per-step scalars are only logged on the
    steps where Lightning writes them anyway.
    """
    trainer = module._trainer
    if trainer is None:
        return True
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own rule, so the two never disagree
    return bool(connector is None or connector.should_update_logs or getattr(trainer, "fast_dev_run", False))


def save_hparams(module: pl.LightningModule, ignore: list[str]) -> None:
    """``save_hyperparameters`` of the caller's arguments, without Lightning's warning about module arguments.

    Modules are not pickled: :func:`save_arch_hparams` replaces them by their class_path/init_args.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        module.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)  # type: ignore[union-attr]


def save_arch_hparams(module: pl.LightningModule, **networks: nn.Module) -> None:
    """Store networks in ``hparams`` as class_path/init_args, never as pickled modules.

    Under LightningCLI ``hparams`` already holds the YAML's description; otherwise it holds the module object,
    which is replaced by :func:`distill.arch.arch_spec`.
    """
    for name, net in networks.items():
        if not isinstance(module.hparams.get(name), Mapping):
            module.hparams[name] = arch_spec(net)
