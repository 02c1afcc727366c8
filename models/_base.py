"""A base class that records the arguments a model was built with, so it can be rebuilt from a file."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["ZooModel"]


class ZooModel(nn.Module):
    """``nn.Module`` that remembers its constructor arguments in ``init_args`` (outermost subclass wins).

    The compressed-file writer and the checkpoints store ``{"class_path", "init_args"}`` instead of pickling the
    module, so a model is rebuilt by importing its class and calling it: no code runs from the file.
    """

    init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self: ZooModel, *args: Any, **kw: Any) -> None:
            original(self, *args, **kw)
            if type(self) is cls:  # only the most derived class records its own arguments
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                args_ = dict(bound.arguments)
                args_.pop("self", None)
                object.__setattr__(self, "init_args", {k: _plain(v) for k, v in args_.items()})

        cls.__init__ = __init__  # type: ignore[method-assign,assignment]


def _plain(value: Any) -> Any:
    """Tuples become lists so the arguments survive JSON and YAML."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
