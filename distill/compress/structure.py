"""Exact clean-up of the units that pruning leaves dead, in ``Linear -> ReLU -> Linear`` chains.

After aggressive pruning, many hidden units of a dense layer ``A`` (followed by a ReLU and a dense layer ``B``) are
useless, and storing their remaining weights and biases wastes bytes of the compressed file:

* a unit whose **outgoing** column in ``B`` is all zero never influences the output: its incoming row of ``A`` and its
  bias are set to zero;
* a unit whose **incoming** row in ``A`` is all zero outputs the constant ``relu(b_j)``: that constant's contribution
  ``B[:, j] * relu(b_j)`` is folded into ``B``'s bias, and ``B[:, j]`` and ``b_j`` are set to zero.

Both rewrites leave the network's function unchanged (the second up to float rounding of the folded bias), so the
compressed file stores fewer non-zero weights and biases. The chains are found by tracing the network with
``torch.fx`` (part of torch): no model-specific code. A network that cannot be traced is left as it is. Convolution
channels are not touched: their constant outputs pass through pooling and flattening, whose layout the trace does not
give without shape propagation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DeadUnits", "linear_relu_chains", "remove_dead_units"]

@dataclass
class DeadUnits:
    """What :func:`remove_dead_units` changed."""

    chains: list[tuple[str, str]]  # (A, B) module paths of the Linear -> ReLU -> Linear chains found
    unused: int = 0  # units whose outgoing weights were all zero: incoming row and bias zeroed
    constant: int = 0  # units whose incoming weights were all zero: constant folded into the next bias
    weights_zeroed: int = 0  # non-zero weights set to zero
    traced: bool = True  # False if the network could not be traced by torch.fx


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def linear_relu_chains(net: nn.Module) -> list[tuple[str, str]] | None:
    """``(A, B)`` module paths where ``B(relu(A(x)))`` and ``A``'s output feeds nothing else; None if untraceable."""
    try:
        graph = fx.symbolic_trace(net).graph
    except Exception:  # noqa: BLE001 - any tracing failure (data-dependent control flow, ...): no clean-up
        return None
    modules = dict(net.named_modules())
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Linear):
            continue
        users = list(node.users)
        if len(users) != 1 or not _is_relu(users[0], modules) or users[0].args[0] is not node:
            continue
        after = list(users[0].users)
        if len(after) != 1 or after[0].op != "call_module" or after[0].args[0] is not users[0]:
            continue
        if not isinstance(modules.get(str(after[0].target)), nn.Linear):
            continue
        chains.append((str(node.target), str(after[0].target)))
    return chains


@torch.no_grad()
def remove_dead_units(net: nn.Module) -> DeadUnits:
    """Zero the weights and biases of dead hidden units in ``Linear -> ReLU -> Linear`` chains, in place (exact).

    Repeats until nothing changes (a unit cleared in one chain can make units of a neighbouring chain dead).

    Returns:
        :class:`DeadUnits`.
    """
    chains = linear_relu_chains(net)
    if chains is None:
        return DeadUnits(chains=[], traced=False)
    result = DeadUnits(chains=chains)
    modules = dict(net.named_modules())
    changed = True
    while changed:
        changed = False
        for a_name, b_name in chains:
            a, b = modules[a_name], modules[b_name]
            assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
            if b.in_features != a.out_features:
                continue
            wa, wb = a.weight, b.weight
            ba = a.bias
            # units nobody reads: clear what feeds them
            has_input = (wa != 0).any(dim=1)
            if ba is not None:
                has_input |= ba != 0
            unused = (wb == 0).all(dim=0) & has_input
            if bool(unused.any()):
                result.weights_zeroed += int((wa[unused] != 0).sum())
                wa[unused] = 0
                if ba is not None:
                    ba[unused] = 0
                result.unused += int(unused.sum())
                changed = True
            # units fed by nothing: a constant relu(b_j) -> into B's bias
            if ba is None:
                continue
            constant = (wa == 0).all(dim=1) & (wb != 0).any(dim=0)
            if bool(constant.any()):
                value = torch.relu(ba[constant])
                if bool((value != 0).any()):
                    if b.bias is None:
                        continue  # nowhere to fold the constant: leave the unit as it is
                    b.bias.add_(wb[:, constant] @ value)
                result.weights_zeroed += int((wb[:, constant] != 0).sum())
                wb[:, constant] = 0
                ba[constant] = 0
                result.constant += int(constant.sum())
                changed = True
    return result
