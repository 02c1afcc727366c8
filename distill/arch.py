"""Describe a model by ``{"class_path", "init_args"}`` and rebuild it, without pickling.

Checkpoints and compressed files store this description instead of a pickled module: rebuilding imports the
named class (which must be an ``nn.Module`` subclass) and calls it with plain arguments, so nothing in a file can
run code of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from distill.errors import DistillError

__all__ = ["ArchitectureError", "arch_spec", "build_module"]


class ArchitectureError(DistillError, ValueError):
    """An architecture description cannot be turned into a module."""


def arch_spec(module: nn.Module) -> dict[str, Any]:
    """The ``{"class_path", "init_args"}`` of ``module``.

    ``init_args`` come from :class:`models._base.ZooModel` (every model in ``models/``); for other classes they
    are empty, which rebuilds correctly only if the class's defaults give the same architecture.
    """
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(module, "init_args", {}))}


def build_module(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a module from :func:`arch_spec`'s description.

    Raises:
        ArchitectureError: if the description is malformed, the class cannot be imported, is not an
            ``nn.Module`` subclass, or rejects its arguments.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
        raise ArchitectureError(f"an architecture needs a 'class_path' string and 'init_args', got {spec!r}")
    path = spec["class_path"]
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ArchitectureError(f"'init_args' of {path} must be a mapping, got {type(init_args).__name__}")
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ArchitectureError(f"class_path {path!r} must be a dotted path such as 'models.lenet.LeNet300100'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ArchitectureError(
            f"cannot import model class {path!r}: {err}. Fix: install the package that defines it."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArchitectureError(f"{path!r} is not an nn.Module subclass; refusing to call it")
    try:
        return cls(**dict(init_args))
    except TypeError as err:
        raise ArchitectureError(f"{path} rejected init_args {dict(init_args)}: {err}") from err
