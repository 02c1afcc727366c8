"""Capture the outputs (and inputs) of layers picked by dotted module path, with forward hooks.

A layer is named as in ``model.named_modules()`` (``"fc1"``, ``"features.3"``), so a config picks layers with no
code change, as in torchdistill. :class:`FeatureCapture` attaches one hook per layer, keeps the latest tensors in
``outputs`` / ``inputs`` and removes every hook on :meth:`FeatureCapture.detach` (or when its ``with`` block ends)::

    with FeatureCapture(model, ["fc1", "fc2"]) as cap:
        logits = model(x)
        h1 = cap.outputs["fc1"]  # (B, 300)
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from distill.errors import DistillError

__all__ = ["FeatureCapture", "ModulePathError", "get_module", "has_hooks", "module_paths"]


class ModulePathError(DistillError, ValueError):
    """A dotted module path does not name a submodule."""


def module_paths(model: nn.Module) -> list[str]:
    """Every dotted path of ``model``'s submodules, in registration order (the root ``""`` excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _leaf_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and next(m.children(), None) is None]


def get_module(model: nn.Module, path: str, what: str = "model") -> nn.Module:
    """The submodule of ``model`` at the dotted ``path``.

    Args:
        model: the network.
        path: a dotted module path as in ``named_modules()``, e.g. ``"features.3"``.
        what: how to call the model in the error message (``"student"``, ``"teacher"``).

    Raises:
        ModulePathError: if no submodule has that path; the message lists the valid paths.
    """
    modules = dict(model.named_modules())
    if not path or path not in modules:
        valid = ", ".join(_leaf_paths(model)) or "(none)"
        raise ModulePathError(
            f"{what} ({type(model).__name__}) has no module {path!r}. Valid layer paths: {valid}"
            + ("" if path else " (the empty path would name the whole model)")
        )
    return modules[path]


def has_hooks(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` (or the model itself) carries a forward or forward-pre hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class FeatureCapture:
    """Record the outputs and/or inputs of named layers during a forward pass.

    The tensors are kept as produced (with their autograd history, if any): the caller decides whether to run
    the forward under ``torch.no_grad()``. Each forward overwrites the previous tensors; :meth:`clear` drops them.

    Args:
        model: the network to tap.
        paths: dotted module paths of the layers.
        outputs: record each layer's output (``outputs[path]``).
        inputs: record each layer's first positional input (``inputs[path]``).
        what: how to call the model in error messages.

    Raises:
        ModulePathError: if a path names no submodule (raised at construction, before any forward).
        ValueError: if neither ``outputs`` nor ``inputs`` is requested, or ``paths`` is empty.
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Iterable[str],
        *,
        outputs: bool = True,
        inputs: bool = False,
        what: str = "model",
    ) -> None:
        self.paths = list(dict.fromkeys(paths))
        if not self.paths:
            raise ValueError("paths must name at least one layer")
        if not (outputs or inputs):
            raise ValueError("FeatureCapture needs outputs=True or inputs=True")
        self.model = model
        self.modules = {p: get_module(model, p, what) for p in self.paths}
        self.capture_outputs = outputs
        self.capture_inputs = inputs
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> FeatureCapture:
        """Register the hooks (idempotent). Returns ``self``."""
        if self._handles:
            return self
        for path, module in self.modules.items():
            if self.capture_inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(path)))
            if self.capture_outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(path)))
        return self

    def detach(self) -> None:
        """Remove every hook and drop the recorded tensors (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the recorded tensors (frees their memory and autograd graphs)."""
        self.outputs.clear()
        self.inputs.clear()

    def _output_hook(self, path: str) -> Any:
        store = self.outputs

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            store[path] = output

        return hook

    def _input_hook(self, path: str) -> Any:
        store = self.inputs

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            store[path] = args[0]

        return hook

    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}, paths={self.paths}, outputs={self.capture_outputs}, "
            f"inputs={self.capture_inputs}, attached={self.attached})"
        )
