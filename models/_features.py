"""The list of tappable layers of a model (dotted path + output shape), in the spirit of timm's ``feature_info``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "feature_info"]


@dataclass(frozen=True)
class LayerInfo:
    """One layer a user can tap: its dotted module path and the shape of its output for one sample."""

    module: str
    shape: tuple[int, ...]
    kind: str


_TAPPABLE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.MaxPool2d, nn.ReLU)


@torch.no_grad()
def feature_info(
    model: nn.Module, input_shape: tuple[int, ...], kinds: tuple[type[nn.Module], ...] = _TAPPABLE
) -> list[LayerInfo]:
    """Run one dummy sample through ``model`` and record the output shape of every tappable layer.

    Args:
        model: the network.
        input_shape: shape of one input sample, without the batch dimension, e.g. ``(1, 28, 28)``.
        kinds: module types to report.

    Returns:
        The layers in the order their forward ran.
    """
    records: list[LayerInfo] = []
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, kinds):

            def hook(mod: nn.Module, inp: object, out: torch.Tensor, name: str = name) -> None:
                records.append(LayerInfo(name, tuple(out.shape[1:]), type(mod).__name__))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records
