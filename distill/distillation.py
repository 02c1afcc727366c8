"""Teacher-student distillation as a LightningModule: end to end on logits, or layer by layer through hooks.

* **End to end** (``mode="end_to_end"``): the student's logits are pulled towards the teacher's, with the MSE of
  the temperature-softened softmaxes (the source design; Ba & Caruana 2014) or Hinton et al.'s :math:`T^2`-scaled
  KL divergence ("Distilling the Knowledge in a Neural Network", 2015), optionally mixed with cross-entropy on
  the labels (``alpha``).
* **Layer by layer** (``mode="layerwise"``): each mapped student layer learns to reproduce a teacher layer's
  output (FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", 2015), either *independently* (every
  student layer is fed the teacher's own input to the matching layer, so all layers train in one pass) or
  *progressively* (stage by stage in mapping order, earlier student layers frozen), or *jointly* (FitNets-style:
  one ordinary student forward, every mapped layer's hint loss summed). Where shapes differ, a
  learned linear / 1x1-conv adapter regresses the student's features onto the teacher's; adapters are trained
  but never exported.

The teacher is frozen, kept in eval mode, run once per batch under ``torch.no_grad()`` and kept *outside* the
module tree: it is not a child module, so it is in neither ``state_dict()`` (checkpoints hold only the student and
the adapters), nor ``parameters()`` (the optimizer and the compression callbacks never see it), nor
``train()``/``eval()`` switches. ``hparams["teacher"]`` stores the checkpoint path it was loaded from, so a
Distiller checkpoint reloads the teacher from there.

Usage in Python::

    distiller = Distiller(student=LeNet300100(), teacher="runs/lenet300_100_teacher/checkpoints/last.ckpt")
    pl.Trainer(max_epochs=10).fit(distiller, datamodule=MNISTDataModule())
    student = load_student("runs/.../last.ckpt")  # a plain nn.Module, no teacher needed
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from distill.arch import arch_spec, build_module
from distill.errors import CheckpointError, DistillError, first_line, producer_hint, read_checkpoint
from distill.hooks import FeatureCapture, get_module
from distill.io import atomic_path
from distill.losses import feature_mse, kd_kl, softmax_mse, weighted_distillation
from distill.module_utils import (
    FastSetattrMixin,
    ResumableRNGMixin,
    as_module,
    configure_optimizers,
    piecewise_schedule,
    raise_batch_error,
    save_arch_hparams,
    save_hparams,
    schedule_at,
    should_log_step,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "Distiller",
    "LayerMappingError",
    "TeacherNotFoundError",
    "load_network",
    "load_student",
    "make_adapter",
]

DEFAULT_TEMPERATURE = 4.0
"""Default softening temperature. At ``T = 1`` a 98-99%-accurate MNIST teacher is nearly one-hot, so the soft
targets carry little beyond the label; at ``T = 4`` the ratios between the wrong classes (the "dark knowledge")
become visible while the correct class still dominates. Hinton et al. (2015) report good MNIST results for
``T >= 8`` with large students and lower temperatures for small ones; 4 is the common middle ground (also the
torchdistill / RepDistiller default for KD) and keeps the softmax-MSE gradients from vanishing as ``1/T^2``."""

_LOGIT_LOSSES = {"mse": softmax_mse, "kd": kd_kl}
_MODES = ("end_to_end", "layerwise")
_SCHEDULES = ("independent", "joint", "progressive")


class TeacherNotFoundError(DistillError, FileNotFoundError):
    """The teacher checkpoint does not exist; the message says which command produces it."""


class LayerMappingError(DistillError, ValueError):
    """A layer mapping names a missing module, or its shapes cannot be matched."""


# --------------------------------------------------------------------------------------------------------------
# Loading networks from checkpoints (never unpickling code: weights_only=True + class_path/init_args).
# --------------------------------------------------------------------------------------------------------------


def _producer_hint(path: Path) -> str:
    """The ``distill fit -c CONFIG`` that writes ``path``, found by the configs' ``checkpoint.dirpath``."""
    return producer_hint(path) or (
        f"Train a teacher first with `distill fit -c <teacher config>` whose checkpoint.dirpath is "
        f"{path.parent.as_posix()}, or point --model.init_args.teacher at an existing checkpoint."
    )


def load_network(path: str | os.PathLike[str], role: str = "teacher") -> nn.Module:
    """Rebuild the network stored in a ``Classifier`` or ``Distiller`` checkpoint (``model`` / ``student``).

    Args:
        path: a Lightning checkpoint written by ``distill fit``.
        role: what the network is for, used in error messages.

    Returns:
        The network with its trained weights, on the CPU.

    Raises:
        TeacherNotFoundError: if ``path`` does not exist (the message names the command that produces it).
        CheckpointError: (a ``ValueError``) if the file is not a readable checkpoint or holds neither a ``model`` nor
            a ``student`` description.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise TeacherNotFoundError(f"{role} checkpoint {str(path)!r} does not exist. {_producer_hint(p)}")
    ckpt = read_checkpoint(p, f"{role} checkpoint")
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{role} checkpoint {str(path)!r} is not a Lightning checkpoint (a "
                              f"{type(ckpt).__name__}, not a dict). Fix: point at a checkpoint written by distill fit.")
    hparams = ckpt.get("hyper_parameters") or {}
    state = ckpt.get("state_dict") or {}
    for key in ("model", "student"):
        spec = hparams.get(key)
        if isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str):
            net = build_module(spec)
            prefix = key + "."
            weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            net.load_state_dict(weights)
            return net
    raise CheckpointError(
        f"{role} checkpoint {str(path)!r} describes no network: expected hyper_parameters['model'] (a Classifier "
        f"checkpoint) or hyper_parameters['student'] (a Distiller checkpoint) with a class_path, found keys "
        f"{sorted(hparams)}"
    )


def load_student(path: str | os.PathLike[str]) -> nn.Module:
    """The student of a ``Distiller`` checkpoint, as a plain ``nn.Module``: the teacher is neither needed nor read.

    Raises:
        MissingCheckpointError: (a ``FileNotFoundError``) if ``path`` does not exist; the message names the config
            that writes it, when one of ``configs/`` does.
        CheckpointError: (a ``ValueError``) if the file is not a readable Distiller checkpoint.
    """
    p = Path(path).expanduser()
    ckpt = read_checkpoint(p, "Distiller checkpoint")
    spec = (ckpt.get("hyper_parameters") or {}).get("student") if isinstance(ckpt, Mapping) else None
    if not (isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str)):
        raise CheckpointError(f"{str(path)!r} is not a Distiller checkpoint: hyper_parameters has no 'student' "
                              "description")
    return load_network(p, role="student")


# --------------------------------------------------------------------------------------------------------------
# FitNets adapters.
# --------------------------------------------------------------------------------------------------------------


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """A learned regressor from student features to teacher features (FitNets, Romero et al. 2015).

    Args:
        student_shape: one sample's student feature shape, ``(C,)`` or ``(C, H, W)``.
        teacher_shape: one sample's teacher feature shape.

    Returns:
        ``nn.Linear(C_s, C_t)`` for vectors, ``nn.Conv2d(C_s, C_t, 1)`` for feature maps of equal spatial size.

    Raises:
        LayerMappingError: for any other pair of shapes.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], kernel_size=1)
    raise LayerMappingError(
        f"cannot regress student features of shape {s} onto teacher features of shape {t}: adapters map vectors "
        f"(C_s,) -> (C_t,) with a linear layer and maps (C_s, H, W) -> (C_t, H, W) with a 1x1 convolution"
    )


def _adapter_key(student_path: str) -> str:
    return student_path.replace(".", "__")  # ModuleDict keys may not contain dots


# --------------------------------------------------------------------------------------------------------------
# The LightningModule.
# --------------------------------------------------------------------------------------------------------------


class Distiller(ResumableRNGMixin, FastSetattrMixin, pl.LightningModule):
    """Train a student network to mimic a frozen teacher.

    Logs ``train/loss`` (the optimised total), ``train/distill_loss``, ``train/ce_loss`` (when ``alpha > 0``),
    ``train/feature_loss/<student layer>`` (layer-wise), on the steps the logger writes (``log_every_n_steps``),
    and ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    (the **student's**), and the teacher's accuracy once per fit / test run as ``val/teacher_acc`` /
    ``test/teacher_acc``.

    Args:
        student: the network to train (or its class_path/init_args description).
        teacher: a trained network, or the path of a ``Classifier`` / ``Distiller`` checkpoint (from
            ``distill fit``). Frozen, in eval mode, never optimised, never saved in this module's checkpoints.
        optimizer: optimizer factory (over the student's and the adapters' parameters).
        lr_scheduler: optional scheduler factory.
        loss: logit loss: ``"mse"`` (softened-softmax MSE, the default) or ``"kd"`` (Hinton's KL times T^2).
        temperature: softening temperature ``T`` (default :data:`DEFAULT_TEMPERATURE` = 4, see there why).
        alpha: weight of the cross-entropy on the labels: ``(1 - alpha) * distill + alpha * CE``; a number, or a
            piecewise-constant mapping ``{first epoch: alpha}`` (YAML ``alpha: {0: 1.0, 20: 0.5}``: labels only
            while a strong prior sparsifies the weights, then half distillation to win the accuracy back).
        mode: ``"end_to_end"`` (logits) or ``"layerwise"`` (mapped layers' outputs).
        layers: layer-wise mapping ``{student_path: teacher_path}`` of dotted module paths. Default: the
            ``nn.Linear`` / ``nn.Conv2d`` paths the two networks share.
        layerwise_schedule: ``"independent"`` (each student layer fed the teacher's input to its teacher layer;
            all layers in one pass; needs equal input shapes), ``"progressive"`` (one stage per mapped layer,
            in mapping order, earlier student layers frozen; afterwards end-to-end fine-tuning on logits), or
            ``"joint"`` (one student forward on the input, all mapped layers' losses summed, as in FitNets).
        stage_epochs: progressive schedule: epochs per stage, one int for all stages or one per mapped layer.
        adapters: allow FitNets adapters where shapes differ (else such a mapping is an error).
        init_from_teacher: start the student from the teacher's weights (same architecture required).
        input_shape: one sample's input shape, for the layer-wise shape check; default the student's (or the
            teacher's) ``input_shape`` attribute, as every model in ``models/`` has.
        num_classes: number of classes for the accuracy metrics.

    Raises:
        ValueError: for an unknown ``loss`` / ``mode`` / ``layerwise_schedule``, a bad ``temperature``, ``alpha``,
            ``stage_epochs``, or ``init_from_teacher`` with a different architecture.
        LayerMappingError: if a mapped path names no module (the message lists the valid paths) or shapes cannot
            be matched; raised here, before any training.
        TeacherNotFoundError: if the teacher checkpoint does not exist.
    """

    def __init__(
        self,
        student: nn.Module,
        # Path in the union: jsonargparse then takes a string as given; otherwise, for an argument that may be a class,
        # it reads the file a string names and, for a text file, passes its contents on as the "path"
        teacher: nn.Module | str | Path,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        loss: Literal["mse", "kd"] = "mse",
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float | dict[int, float] = 0.0,
        mode: Literal["end_to_end", "layerwise"] = "end_to_end",
        layers: dict[str, str] | None = None,
        layerwise_schedule: Literal["independent", "joint", "progressive"] = "independent",
        stage_epochs: int | list[int] = 1,
        adapters: bool = True,
        init_from_teacher: bool = False,
        input_shape: list[int] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if loss not in _LOGIT_LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOGIT_LOSSES)}, got {loss!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if layerwise_schedule not in _SCHEDULES:
            raise ValueError(f"layerwise_schedule must be one of {list(_SCHEDULES)}, got {layerwise_schedule!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha_schedule: dict[int, float] | None = None
        if isinstance(alpha, Mapping):
            self.alpha_schedule = piecewise_schedule(alpha, "alpha", upper=1.0, example="{0: 1.0, 20: 0.5}")
        if self.alpha_schedule is None and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1] or a mapping {{first epoch: alpha}}, got {alpha!r}")

        save_hparams(self, ignore=["optimizer", "lr_scheduler"])
        self.student = as_module(student, "student")
        save_arch_hparams(self, student=self.student)
        teacher_net = self._resolve_teacher(teacher)
        teacher_net.eval()
        teacher_net.requires_grad_(False)
        self.__dict__["_teacher"] = teacher_net  # outside the module tree: see the module docstring

        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.loss_name = loss
        self.logit_loss = _LOGIT_LOSSES[loss]
        self.temperature = float(temperature)
        self.alpha = schedule_at(self.alpha_schedule, 0) if self.alpha_schedule else float(alpha)  # type: ignore[arg-type]
        self.mode = mode
        self.schedule = layerwise_schedule
        self.num_classes = int(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_test_acc = MulticlassAccuracy(num_classes, average="micro")

        if init_from_teacher:
            try:
                self.student.load_state_dict(teacher_net.state_dict())
            except RuntimeError as err:
                raise ValueError(
                    f"init_from_teacher=True needs a student with the teacher's architecture "
                    f"({type(teacher_net).__name__}); loading the teacher's weights into {type(self.student).__name__} "
                    f"failed: {err}"
                ) from err

        self.pairs: list[tuple[str, str]] = []
        self.adapters = nn.ModuleDict()
        self.stage_epochs: list[int] = []
        self._teacher_capture: FeatureCapture | None = None
        self._student_capture: FeatureCapture | None = None
        self._student_layers: dict[str, nn.Module] = {}
        self._frozen: list[nn.Module] = []
        self._stage = 0
        self._teacher_acc_pending = False
        self._teacher_reported = False
        if mode == "layerwise":
            self._setup_layerwise(layers, adapters, input_shape, stage_epochs)
        elif layers:
            rank_zero_warn(
                f"Distiller: layers {dict(layers)} are not used with mode={mode!r}, which distills the logits only. "
                "Set mode: layerwise to train the mapped layers, or drop layers from the config."
            )

    # ---------------------------------------------------------------------------------------------------------
    # construction helpers
    # ---------------------------------------------------------------------------------------------------------

    def _resolve_teacher(self, teacher: nn.Module | str | os.PathLike[str] | Mapping[str, Any]) -> nn.Module:
        if isinstance(teacher, nn.Module):
            if not isinstance(self.hparams.get("teacher"), str | Mapping):
                self.hparams["teacher"] = arch_spec(teacher)
            return teacher
        if isinstance(teacher, str | os.PathLike):
            return load_network(teacher, role="teacher")
        if isinstance(teacher, Mapping):
            rank_zero_warn(
                "Distiller: the teacher was given as an architecture description, so it has untrained weights. "
                "Pass a checkpoint path, or a trained module (e.g. Distiller.load_from_checkpoint(ckpt, "
                "teacher=my_teacher))."
            )
            return build_module(teacher)
        raise TypeError(f"teacher must be an nn.Module or a checkpoint path, got {type(teacher).__name__}")

    def _setup_layerwise(
        self,
        layers: Mapping[str, str] | None,
        adapters: bool,
        input_shape: Sequence[int] | None,
        stage_epochs: int | Sequence[int],
    ) -> None:
        student, teacher = self.student, self.teacher
        if layers is None:
            t_paths = {n for n, m in teacher.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
            layers = {n: n for n, m in student.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n in t_paths}
            if not layers:
                raise LayerMappingError(
                    "mode='layerwise' without `layers`: the student and teacher share no Linear/Conv2d path. Give "
                    "layers: {student_path: teacher_path}"
                )
        if not isinstance(layers, Mapping) or not layers:
            raise LayerMappingError(
                f"layers must be a non-empty mapping {{student_path: teacher_path}}, got {layers!r}"
            )
        for s_path, t_path in layers.items():  # paths first: the error lists the valid ones
            get_module(student, s_path, "student")
            get_module(teacher, t_path, "teacher")
        self.pairs = [(str(s), str(t)) for s, t in layers.items()]

        shape = input_shape or getattr(student, "input_shape", None) or getattr(teacher, "input_shape", None)
        if shape is None:
            raise LayerMappingError(
                "mode='layerwise' needs the input shape to check the mapped layers before training: pass "
                "input_shape: [C, H, W] (or give the student an `input_shape` attribute)"
            )
        s_in, s_out = _probe(student, [s for s, _ in self.pairs], tuple(shape), "student")
        t_in, t_out = _probe(teacher, [t for _, t in self.pairs], tuple(shape), "teacher")
        for s_path, t_path in self.pairs:
            if self.schedule == "independent" and s_in[s_path] != t_in[t_path]:
                raise LayerMappingError(
                    f"layerwise_schedule='independent' feeds student layer {s_path!r} the teacher's input to "
                    f"{t_path!r}, but their input shapes differ: {s_in[s_path]} vs {t_in[t_path]}. Map layers with "
                    f"equal input shapes or use layerwise_schedule='joint' or 'progressive'"
                )
            if s_out[s_path] == t_out[t_path]:
                continue
            if not adapters:
                raise LayerMappingError(
                    f"student layer {s_path!r} outputs {s_out[s_path]} but teacher layer {t_path!r} outputs "
                    f"{t_out[t_path]}, and adapters=False"
                )
            try:
                self.adapters[_adapter_key(s_path)] = make_adapter(s_out[s_path], t_out[t_path])
            except LayerMappingError as err:
                raise LayerMappingError(f"mapping {s_path!r} -> {t_path!r}: {err}") from err

        if isinstance(stage_epochs, int):
            epochs = [stage_epochs] * len(self.pairs)
        else:
            epochs = [int(e) for e in stage_epochs]
        if len(epochs) != len(self.pairs) or any(e < 1 for e in epochs):
            raise ValueError(
                f"stage_epochs must be a positive int or one positive int per mapped layer ({len(self.pairs)}), "
                f"got {stage_epochs!r}"
            )
        self.stage_epochs = epochs
        self._student_layers = {s: get_module(student, s) for s, _ in self.pairs}
        independent = self.schedule == "independent"
        self._teacher_capture = FeatureCapture(teacher, [t for _, t in self.pairs], inputs=independent, what="teacher")
        if not independent:
            self._student_capture = FeatureCapture(student, [s for s, _ in self.pairs], what="student")

    # ---------------------------------------------------------------------------------------------------------
    # the teacher lives outside the module tree
    # ---------------------------------------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network (not a submodule: not saved, not optimised)."""
        return self.__dict__["_teacher"]

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:
            teacher._apply(fn, recurse)  # follow .to(device) / .half() with the rest of the module
        return self

    @override
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for module in self.__dict__.get("_frozen", ()):
            module.eval()  # stays in eval while its progressive stage is over (e.g. after validation)
        return self

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    # ---------------------------------------------------------------------------------------------------------
    # hooks are attached for the fit only
    # ---------------------------------------------------------------------------------------------------------

    def _attach(self) -> None:
        for cap in (self._teacher_capture, self._student_capture):
            if cap is not None:
                cap.attach()

    def _detach(self) -> None:
        for cap in (self._teacher_capture, self._student_capture):
            if cap is not None:
                cap.detach()
        for module in self._frozen:
            module.requires_grad_(True)
        self._frozen = []

    @override
    def on_fit_start(self) -> None:
        self._teacher_reported = False
        self.teacher.eval()
        self._attach()

    @override
    def on_fit_end(self) -> None:
        self._detach()

    @override
    def teardown(self, stage: str) -> None:
        self._detach()  # also after an exception

    # ---------------------------------------------------------------------------------------------------------
    # progressive schedule
    # ---------------------------------------------------------------------------------------------------------

    def stage_at(self, epoch: int) -> int:
        """The progressive stage of ``epoch``: the index of the mapped layer trained, or ``len(layers)`` afterwards."""
        end = 0
        for i, n in enumerate(self.stage_epochs):
            end += n
            if epoch < end:
                return i
        return len(self.stage_epochs)

    @override
    def on_train_epoch_start(self) -> None:
        if self.alpha_schedule:
            self.alpha = schedule_at(self.alpha_schedule, self.current_epoch)
        if self.mode != "layerwise" or self.schedule != "progressive":
            return
        self._stage = self.stage_at(self.current_epoch)
        for module in self._frozen:
            module.requires_grad_(True)
        self._frozen = []
        if self._stage < len(self.pairs):
            for s_path, _ in self.pairs[: self._stage]:
                module = self._student_layers[s_path]
                module.requires_grad_(False)
                module.eval()  # frozen BatchNorm keeps its statistics
                self._frozen.append(module)

    # ---------------------------------------------------------------------------------------------------------
    # steps
    # ---------------------------------------------------------------------------------------------------------

    def _networks(self) -> list[tuple[str, nn.Module]]:
        return [("student", self.student), ("teacher", self.teacher)]

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        try:
            return self._training_step(batch)
        except Exception as err:  # a network built for other data: say which (nothing to pay when the step works)
            raise_batch_error(err, self._networks(), batch, same_outputs=self.mode == "end_to_end")

    def _training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.mode == "end_to_end":
            return self._end_to_end_step(x, y)
        self._attach()  # no-op inside fit; makes a bare training_step call work too
        if self.schedule == "independent":
            return self._independent_step(x, y)
        if self.schedule == "progressive" and self._stage >= len(self.pairs):
            return self._end_to_end_step(x, y)
        return self._hint_step(x, y)

    def _end_to_end_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        distill = self.logit_loss(s_logits, t_logits, self.temperature)
        return self._finish(distill, s_logits, y, {})

    def _independent_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cap = self._teacher_capture
        assert cap is not None
        with torch.no_grad():
            self.teacher(x)  # one teacher pass captures every mapped layer's input and output
        t_in, t_out = cap.inputs, cap.outputs
        per_layer: dict[str, torch.Tensor] = {}
        for s_path, t_path in self.pairs:
            feats = self._student_layers[s_path](t_in[t_path])
            key = _adapter_key(s_path)
            if key in self.adapters:
                feats = self.adapters[key](feats)
            per_layer[s_path] = feature_mse(feats, t_out[t_path])
        cap.clear()
        distill = torch.stack(list(per_layer.values())).sum()
        s_logits = self.student(x) if self.alpha > 0 else None
        return self._finish(distill, s_logits, y, per_layer)

    def _hint_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Joint / progressive: one teacher and one student forward, hooks capture every mapped layer's output."""
        t_cap, s_cap = self._teacher_capture, self._student_capture
        assert t_cap is not None and s_cap is not None
        with torch.no_grad():
            self.teacher(x)
        s_logits = self.student(x)
        pairs = self.pairs if self.schedule == "joint" else self.pairs[self._stage : self._stage + 1]
        per_layer: dict[str, torch.Tensor] = {}
        for s_path, t_path in pairs:
            feats = s_cap.outputs[s_path]
            key = _adapter_key(s_path)
            if key in self.adapters:
                feats = self.adapters[key](feats)
            per_layer[s_path] = feature_mse(feats, t_cap.outputs[t_path])
        t_cap.clear()
        s_cap.clear()
        distill = per_layer[pairs[0][0]] if len(pairs) == 1 else torch.stack(list(per_layer.values())).sum()
        return self._finish(distill, s_logits if self.alpha > 0 else None, y, per_layer)

    def _finish(
        self, distill: torch.Tensor, s_logits: torch.Tensor | None, y: torch.Tensor, per_layer: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        ce = F.cross_entropy(s_logits, y) if (self.alpha > 0 and s_logits is not None) else None
        loss = weighted_distillation(distill, ce, self.alpha)
        if should_log_step(self):
            # Step values, as the logger receives them; tensors, so no .item() synchronisation.
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/distill_loss", distill)
            if ce is not None:
                self.log("train/ce_loss", ce)
            for s_path, value in per_layer.items():
                self.log(f"train/feature_loss/{s_path}", value)
        return loss

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str, metric: MulticlassAccuracy, teacher_metric: Any
    ) -> None:
        x, y = batch
        try:
            logits = self.student(x)
            loss = F.cross_entropy(logits, y)
            if self._teacher_acc_pending:
                with torch.no_grad():
                    t_logits = self.teacher(x)
        except Exception as err:
            raise_batch_error(err, self._networks(), batch)
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        metric(logits, y)
        self.log(f"{split}/acc", metric, prog_bar=split == "val")
        if self._teacher_acc_pending:
            teacher_metric(t_logits, y)
            self.log(f"{split}/teacher_acc", teacher_metric)

    @override
    def on_validation_epoch_start(self) -> None:
        fitting = self.trainer.state.fn == "fit"
        self._teacher_acc_pending = not self.trainer.sanity_checking and not (fitting and self._teacher_reported)

    @override
    def on_validation_epoch_end(self) -> None:
        if self._teacher_acc_pending:
            self._teacher_reported = True
        self._teacher_acc_pending = False

    @override
    def on_test_epoch_start(self) -> None:
        self._teacher_acc_pending = True

    @override
    def on_test_epoch_end(self) -> None:
        self._teacher_acc_pending = False

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc, self.teacher_val_acc)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc, self.teacher_test_acc)

    @override
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        try:
            return self.student(batch[0]).argmax(-1)
        except Exception as err:
            raise_batch_error(err, [("student", self.student)], batch)

    @override
    def configure_optimizers(self) -> Any:

        params = [*self.student.parameters(), *self.adapters.parameters()]
        return configure_optimizers(self, params, self.optimizer, self.lr_scheduler)

    # ---------------------------------------------------------------------------------------------------------
    # export
    # ---------------------------------------------------------------------------------------------------------

    def export_student(self, path: str | os.PathLike[str]) -> Path:
        """Write the student alone as a ``Classifier`` checkpoint (no teacher, no adapters), atomically.

        ``Classifier.load_from_checkpoint(path)``, ``distill test`` with a Classifier config, and a later
        ``Distiller(teacher=path)`` all read it.

        Returns:
            The path written.
        """
        out = Path(path)
        spec = self.hparams.get("student")
        if not isinstance(spec, Mapping):
            spec = arch_spec(self.student)
        ckpt = {
            "state_dict": {f"model.{k}": v.detach().cpu() for k, v in self.student.state_dict().items()},
            "hyper_parameters": {"model": dict(spec), "num_classes": self.num_classes},
            "pytorch-lightning_version": pl.__version__,
        }
        with atomic_path(out) as tmp:
            torch.save(ckpt, tmp)
        return out


@torch.no_grad()
def _probe(
    model: nn.Module, paths: list[str], input_shape: tuple[int, ...], role: str = "student"
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Per-sample input and output shapes of the layers at ``paths`` for one dummy batch (eval mode)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with FeatureCapture(model, paths, inputs=True) as cap:
            try:
                model(torch.zeros(2, *input_shape, device=device))
            except RuntimeError as err:
                raise LayerMappingError(
                    f"the {role} ({type(model).__name__}) cannot take inputs of per-sample shape {input_shape} (a "
                    f"dummy forward failed: {first_line(err)}). Fix: set input_shape to the data's per-sample shape "
                    f"if it is not that; otherwise give a {role} built for the same inputs as the other network "
                    "(trained on the same data)"
                ) from err
            ins = {p: tuple(cap.inputs[p].shape[1:]) for p in paths if p in cap.inputs}
            outs = {p: tuple(cap.outputs[p].shape[1:]) for p in paths if p in cap.outputs}
    finally:
        model.train(was_training)
    unused = [p for p in paths if p not in outs]
    if unused:
        raise LayerMappingError(f"{type(model).__name__}: layers {unused} exist but did not run in forward()")
    return ins, outs
