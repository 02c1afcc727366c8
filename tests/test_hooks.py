"""Forward-hook capture by dotted module path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.hooks import FeatureCapture, ModulePathError, get_module, has_hooks, module_paths
from models.lenet import MLP, SmallConvNet


def test_capture_equals_manual_forward() -> None:
    torch.manual_seed(0)
    net = MLP(64, (32, 16), 10)
    x = torch.randn(5, 1, 8, 8)
    with FeatureCapture(net, ["fc1", "fc2", "fc3"], inputs=True) as cap:
        logits = net(x)
        h0 = x.flatten(1)
        h1 = net.fc1(h0)
        h2 = net.fc2(F.relu(h1))
        torch.testing.assert_close(cap.inputs["fc1"], h0)
        torch.testing.assert_close(cap.outputs["fc1"], h1)
        torch.testing.assert_close(cap.inputs["fc2"], F.relu(h1))
        torch.testing.assert_close(cap.outputs["fc2"], h2)
        torch.testing.assert_close(cap.outputs["fc3"], logits)
    assert not has_hooks(net)
    assert cap.outputs == {} and cap.inputs == {}


def test_capture_nested_paths_and_conv() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))
    x = torch.randn(2, 1, 6, 6)
    with FeatureCapture(net, ["1.1"]) as cap:
        net(x)
        torch.testing.assert_close(cap.outputs["1.1"], net[1][1](F.relu(net[0](x))))


def test_capture_keeps_autograd_graph() -> None:
    net = MLP(8, (4,), 2)
    with FeatureCapture(net, ["fc1"]) as cap:
        net(torch.randn(3, 8))
        cap.outputs["fc1"].sum().backward()
    assert net.fc1.weight.grad is not None


def test_attach_detach_idempotent() -> None:
    net = SmallConvNet()
    cap = FeatureCapture(net, ["conv1", "fc1"])
    assert not cap.attached and not has_hooks(net)
    cap.attach()
    cap.attach()
    assert cap.attached
    assert sum(len(m._forward_hooks) for m in net.modules()) == 2
    cap.detach()
    cap.detach()
    assert not has_hooks(net)


def test_detach_on_exception() -> None:
    net = MLP(8, (4,), 2)
    with pytest.raises(RuntimeError), FeatureCapture(net, ["fc1"]):
        raise RuntimeError("boom")
    assert not has_hooks(net)


def test_bad_path_lists_valid_paths() -> None:
    net = SmallConvNet()
    with pytest.raises(ModulePathError, match=r"no module 'fc9'.*Valid layer paths: conv1, conv2, fc1, fc2"):
        FeatureCapture(net, ["fc1", "fc9"], what="student")
    with pytest.raises(ModulePathError, match="student"):
        get_module(net, "conv3", "student")
    with pytest.raises(ValueError, match="at least one"):
        FeatureCapture(net, [])
    with pytest.raises(ValueError, match="outputs=True or inputs=True"):
        FeatureCapture(net, ["fc1"], outputs=False)
    assert module_paths(net) == ["conv1", "conv2", "fc1", "fc2"]
