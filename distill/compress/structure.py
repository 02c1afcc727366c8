"""Exact clean-up of the units and channels that pruning leaves dead.

After aggressive pruning, many hidden units of a dense layer, and channels of a convolution, are useless, and storing
their remaining weights and biases wastes bytes of the compressed file. For a layer ``A`` whose output reaches
exactly one layer ``B`` (dense or convolution) through channel-wise operations only (ReLU, max/average pooling,
batch norm, dropout, flattening; found by :func:`unit_chains`):

* a unit or channel whose **outgoing** weights in ``B`` are all zero never influences the output: its incoming
  weights in ``A`` and its bias are set to zero;
* a unit or channel whose **incoming** weights in ``A`` are all zero outputs a constant (its bias, through ReLU and
  max pooling): that constant's contribution is folded into ``B``'s bias, and ``B``'s weights reading it and the
  bias are set to zero. This rewrite is made only where it is exact: nothing but ReLU, max pooling, flattening and
  identities between ``A`` and ``B``, and a convolution ``B`` without padding (a padded border would read zeros where
  the constant was).

Both rewrites leave the network's function unchanged (the second up to float rounding of the folded bias), so the
compressed file stores fewer non-zero weights and biases. On soft weight-sharing's LeNet-5-Caffe networks the first
rule clears the filters of 17-32 of conv2's 50 channels that fc1 no longer reads (74-170 weights, BENCHMARKS.md).

The chains are found by tracing the network with ``torch.fx`` (part of torch): no model-specific code, and a layer
whose output is read twice (a residual connection) or passes through anything else is left alone, as is a network
that cannot be traced. Written here because the pruning libraries (torch's ``prune``, NNI's speed-up) either leave
such weights in place or remove whole channels by rebuilding the modules, which changes the architecture the file
records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DeadUnits", "UnitChain", "remove_dead_units", "unit_chains"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER = (nn.Linear, *_CONV)
# modules that act on each channel separately; the first group also maps a constant channel to the same constant
_CONSTANT_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity)
_CHANNELWISE_MODULES = (
    *_CONSTANT_MODULES,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_CONSTANT_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    torch.max_pool1d,
    torch.max_pool2d,
    torch.max_pool3d,
}
_CHANNELWISE_FUNCTIONS = {
    *_CONSTANT_FUNCTIONS,
    F.dropout,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}


@dataclass(frozen=True)
class UnitChain:
    """Layer ``producer``'s units (output features or channels) are read by layer ``consumer`` and nothing else."""

    producer: str
    consumer: str
    exact_constant: bool  # a constant unit reaches the consumer as the same constant (after ReLU: relu(b))
    relu: bool  # a ReLU lies on the path


@dataclass
class DeadUnits:
    """What :func:`remove_dead_units` changed."""

    chains: list[tuple[str, str]]  # (A, B) module paths of the chains found
    unused: int = 0  # units whose outgoing weights were all zero: incoming weights and bias zeroed
    constant: int = 0  # units whose incoming weights were all zero: constant folded into the next bias
    weights_zeroed: int = 0  # non-zero weights set to zero
    traced: bool = True  # False if the network could not be traced by torch.fx


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``flatten(x, 1)`` in any spelling: channel-major columns, so unit ``c`` owns a contiguous block of them."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return bool(start == 1 and end == -1)
    return False


def _step(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How ``node`` treats each channel of its first argument: ``"constant"`` (keeps a constant channel constant),
    ``"channelwise"`` (acts per channel), ``"flatten"``, or None (anything else: the chain stops)."""
    if _is_flatten(node, modules):
        return "flatten"
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, _CONSTANT_MODULES):
            return "constant"
        return "channelwise" if isinstance(m, _CHANNELWISE_MODULES) else None
    if node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS:
        if node.kwargs.get("inplace", False):
            return None
        return "constant" if node.target in _CONSTANT_FUNCTIONS else "channelwise"
    if node.op == "call_method" and node.target == "relu":
        return "constant"
    return None


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels  # type: ignore[return-value]


def unit_chains(net: nn.Module) -> list[UnitChain] | None:
    """Every dense or convolution layer ``A`` whose output reaches exactly one dense or convolution layer ``B``
    through channel-wise operations (and at most one ``flatten(1)``), with ``B`` reading each of ``A``'s units in
    its own block of input weights; None if the network cannot be traced."""
    try:
        graph = fx.symbolic_trace(net).graph
    except Exception:  # noqa: BLE001 - any tracing failure (data-dependent control flow, ...): no clean-up
        return None
    modules = dict(net.named_modules())
    chains: list[UnitChain] = []
    for node in graph.nodes:
        producer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(producer, _LAYER) or (isinstance(producer, _CONV) and producer.groups != 1):
            continue
        cur, exact, relu, flattened = node, True, False, False
        while True:
            users = list(cur.users)
            if len(users) != 1 or not users[0].args or users[0].args[0] is not cur:
                break
            nxt = users[0]
            consumer = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if isinstance(consumer, _LAYER):
                if isinstance(consumer, _CONV):
                    ok = isinstance(producer, _CONV) and not flattened and consumer.groups == 1
                    ok = ok and consumer.in_channels == _units(producer)
                    padded = any(p != 0 for p in consumer.padding) if isinstance(consumer.padding, tuple) else True
                    exact = exact and not padded
                elif isinstance(producer, nn.Linear):  # a dense layer reads the last axis: one column per unit
                    ok = consumer.in_features == _units(producer)
                else:  # flatten(1) of (N, C, *spatial): channel c owns columns [c * S, (c + 1) * S)
                    ok = flattened and consumer.in_features % _units(producer) == 0
                if ok:
                    chains.append(UnitChain(str(node.target), str(nxt.target), exact, relu))
                break
            kind = _step(nxt, modules)
            if kind is None or (kind == "flatten" and flattened):
                break
            flattened = flattened or kind == "flatten"
            exact = exact and kind in ("constant", "flatten")
            relu = relu or _is_relu(nxt, modules)
            cur = nxt
    return chains


@torch.no_grad()
def remove_dead_units(net: nn.Module) -> DeadUnits:
    """Zero the weights and biases of dead units and channels along :func:`unit_chains`, in place (exact).

    Repeats until nothing changes (a unit cleared in one chain can make units of a neighbouring chain dead).

    Returns:
        :class:`DeadUnits`.
    """
    chains = unit_chains(net)
    if chains is None:
        return DeadUnits(chains=[], traced=False)
    result = DeadUnits(chains=[(c.producer, c.consumer) for c in chains])
    modules = dict(net.named_modules())
    changed = True
    while changed:
        changed = False
        for chain in chains:
            a, b = modules[chain.producer], modules[chain.consumer]
            units = _units(a)
            if not (a.weight.is_contiguous() and b.weight.is_contiguous()):
                continue
            wa = a.weight.view(units, -1)  # views: writes go into the layers' weights
            wb = b.weight.view(b.weight.shape[0], units, -1)  # (out, unit, the unit's block: kernel or H*W)
            ba = a.bias
            reads = (wb != 0).any(dim=2).any(dim=0)
            # units nobody reads: clear what feeds them
            has_input = (wa != 0).any(dim=1)
            if ba is not None:
                has_input |= ba != 0
            unused = ~reads & has_input
            if bool(unused.any()):
                result.weights_zeroed += int((wa[unused] != 0).sum())
                wa[unused] = 0
                if ba is not None:
                    ba[unused] = 0
                result.unused += int(unused.sum())
                changed = True
            # units fed by nothing: a constant relu(b_j) (or b_j) -> into B's bias
            if ba is None or not chain.exact_constant:
                continue
            constant = (wa == 0).all(dim=1) & reads
            if bool(constant.any()):
                value = torch.relu(ba[constant]) if chain.relu else ba[constant]
                if bool((value != 0).any()):
                    if b.bias is None:
                        continue  # nowhere to fold the constant: leave the unit as it is
                    b.bias.add_(wb[:, constant].sum(dim=2) @ value)
                result.weights_zeroed += int((wb[:, constant] != 0).sum())
                wb[:, constant] = 0
                ba[constant] = 0
                result.constant += int(constant.sum())
                changed = True
    return result
