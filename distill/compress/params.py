"""Which parameters are compressed: by default the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d``.

Biases and batch-norm parameters are few and sensitive; they stay float32 (as in Han et al., "Deep Compression",
and Ullrich et al., "Soft Weight-Sharing for Neural Network Compression").
"""

from __future__ import annotations

import difflib
from typing import Literal

from torch import nn

from distill.errors import ConfigError

__all__ = ["COMPRESSIBLE_TYPES", "NETWORK_ATTRS", "closest_name", "compressible_parameters", "network_of",
           "parameter_kinds"]

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
NETWORK_ATTRS = ("student", "model")


def network_of(module: nn.Module, attr: str | None = None) -> tuple[nn.Module, str]:
    """The network that the compression callbacks work on inside a LightningModule, and its parameter-name prefix.

    One rule for ``GMMPrior``, ``MagnitudePruning``, ``PruneQuantize`` and ``FigureLogger``: ``module.<attr>`` when
    ``attr`` is given, else ``module.student`` (a ``Distiller``: never the frozen teacher nor the FitNets adapters,
    which are not exported), else ``module.model`` (a ``Classifier`` or a user module holding its network there),
    else the module itself.

    Returns:
        ``(network, prefix)`` with ``prefix`` = ``"student."``, ``"model."``, ``"<attr>."`` or ``""``, so that
        ``prefix + name`` is the parameter's name in ``module.named_parameters()``.

    Raises:
        ConfigError: (a ``ValueError``) if ``attr`` is given and ``module.<attr>`` is not an ``nn.Module``; the
            message lists the module's ``nn.Module`` attributes.
    """
    if attr is not None:
        net = getattr(module, attr, None)
        if not isinstance(net, nn.Module):
            raise ConfigError(_bad_module_attr(module, attr))
        return net, f"{attr}."
    for name in NETWORK_ATTRS:
        net = getattr(module, name, None)
        if isinstance(net, nn.Module) and net is not module:
            return net, f"{name}."
    return module, ""


def closest_name(word: str, choices: list[str]) -> str | None:
    """The one name of ``choices`` that ``word`` is a likely misspelling of, or ``None`` if none is clearly closest
    (``fc9`` is as close to ``fc1`` as to ``fc2``: no guess)."""
    scores = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in choices), reverse=True)
    if not scores or scores[0][0] < 0.6 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return scores[0][1]


def _bad_module_attr(module: nn.Module, attr: str) -> str:
    """Why ``module_attr=attr`` names no network of ``module``: the valid choices (its ``nn.Module`` attributes, i.e.
    its children), the closest one, and the fix."""
    choices = [name for name, _ in module.named_children()]
    close = closest_name(attr, choices)
    hint = f" (did you mean {close!r}?)" if close else ""
    valid = ", ".join(repr(c) for c in choices) if choices else "none"
    return (f"module_attr={attr!r} is not an nn.Module attribute of {type(module).__name__}{hint}; valid: {valid}. "
            f"Fix: set module_attr to one of them, or leave it unset to take {NETWORK_ATTRS[0]!r}, else "
            f"{NETWORK_ATTRS[1]!r}, else the module itself")


def compressible_parameters(
    module: nn.Module, types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES
) -> dict[str, nn.Parameter]:
    """The weights compressed by default, by dotted name (as in ``module.named_parameters()``).

    Args:
        module: any module (a network, or a LightningModule holding one).
        types: module types whose ``weight`` is compressed.

    Returns:
        ``{"fc1.weight": Parameter, ...}`` in registration order; shared parameters are listed once.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for mname, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, types) and isinstance(w, nn.Parameter) and id(w) not in seen:
            seen.add(id(w))
            out[f"{mname}.weight" if mname else "weight"] = w
    return out


def parameter_kinds(module: nn.Module) -> dict[str, Literal["conv", "fc"]]:
    """``"conv"`` or ``"fc"`` for each of :func:`compressible_parameters` (Han used 8 bits for conv, 5 for fc)."""
    kinds: dict[str, Literal["conv", "fc"]] = {}
    for mname, m in module.named_modules():
        if isinstance(m, COMPRESSIBLE_TYPES):
            kinds[f"{mname}.weight" if mname else "weight"] = "fc" if isinstance(m, nn.Linear) else "conv"
    return kinds
