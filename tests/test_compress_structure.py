"""Dead-unit clean-up (distill.compress.structure) and the sparse raw records it makes worthwhile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.compress import load_compressed_state_dict, read_header, remove_dead_units, save_compressed
from distill.compress.structure import unit_chains
from models import MLP, LeNet5Caffe, LeNet300100


def _pruned_mlp() -> MLP:
    torch.manual_seed(0)
    net = MLP(20, (12, 8), 5)
    with torch.no_grad():
        net.fc1.bias.uniform_(-1, 1)
        net.fc2.bias.uniform_(-1, 1)
        net.fc1.weight[[0, 1, 2]] = 0  # units 0-2 of fc1: no inputs (constant relu(b))
        net.fc1.bias[0] = 0.7  # ... one of them a positive constant
        net.fc1.bias[1] = -0.3  # ... one a dead zero
        net.fc2.weight[:, [5, 6]] = 0  # units 5, 6 of fc1: nobody reads them
        net.fc3.weight[:, 3] = 0  # unit 3 of fc2: nobody reads it
    return net


def test_chains_are_found_by_tracing() -> None:
    chains = unit_chains(LeNet300100()) or []
    assert [(c.producer, c.consumer) for c in chains] == [("fc1", "fc2"), ("fc2", "fc3")]
    assert all(c.exact_constant and c.relu for c in chains)


def test_clean_up_keeps_the_function_and_zeroes_dead_units() -> None:
    net = _pruned_mlp()
    x = torch.randn(64, 20)
    before = net(x)
    nz_before = sum(int((m.weight != 0).sum()) for m in (net.fc1, net.fc2, net.fc3))
    result = remove_dead_units(net)
    torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)
    assert (net.fc1.weight[[5, 6]] == 0).all() and (net.fc1.bias[[5, 6]] == 0).all()
    assert (net.fc2.weight[:, [0, 1, 2]] == 0).all() and (net.fc1.bias[[0, 1, 2]] == 0).all()
    assert (net.fc2.weight[3] == 0).all() and net.fc2.bias[3] == 0
    nz_after = sum(int((m.weight != 0).sum()) for m in (net.fc1, net.fc2, net.fc3))
    assert result.weights_zeroed == nz_before - nz_after > 0
    assert result.unused >= 3 and result.constant >= 3 and result.traced
    again = remove_dead_units(net)  # idempotent
    assert again.unused == again.constant == again.weights_zeroed == 0


def test_convolution_chains_are_found() -> None:
    chains = {(c.producer, c.consumer): c for c in unit_chains(LeNet5Caffe()) or []}
    assert list(chains) == [("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")]
    assert all(c.exact_constant and c.relu for c in chains.values())

    class Padded(nn.Module):  # conv -> BN -> ReLU -> padded conv: channels can be cleared, constants not folded
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.bn(self.a(x))))

    (chain,) = unit_chains(Padded()) or []
    assert (chain.producer, chain.consumer, chain.exact_constant) == ("a", "b", False)


def _pruned_lenet5() -> LeNet5Caffe:
    torch.manual_seed(0)
    net = LeNet5Caffe()
    with torch.no_grad():
        for m in (net.conv1, net.conv2, net.fc1):
            m.bias.uniform_(-0.5, 0.5)
        net.conv1.bias[3] = 0.4
        net.conv1.weight[3] = 0  # conv1 channel 3: constant relu(0.4), folded into conv2's bias
        net.conv2.weight[:, 7] = 0  # conv1 channel 7: read by no conv2 filter
        net.fc1.weight.view(500, 50, 16)[:, 11] = 0  # conv2 channel 11: read by nothing in fc1
        net.conv2.weight[20] = 0  # conv2 channel 20: constant, folded into fc1's bias
        net.conv2.bias[20] = 0.3
    return net


def test_convolution_clean_up_keeps_the_function() -> None:
    net = _pruned_lenet5().eval()
    x = torch.randn(32, 1, 28, 28)
    before = net(x)
    result = remove_dead_units(net)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    assert (net.conv1.weight[7] == 0).all() and net.conv1.bias[7] == 0  # unread channel cleared
    assert (net.conv2.weight[11] == 0).all() and net.conv2.bias[11] == 0
    assert (net.conv2.weight[:, 3] == 0).all() and net.conv1.bias[3] == 0  # constant channel folded
    assert (net.fc1.weight.view(500, 50, 16)[:, 20] == 0).all() and net.conv2.bias[20] == 0
    assert result.unused == 2 and result.constant == 2
    # conv1[7]; conv2's filter 11 (19 live inputs) and input 3 (49 live filters), sharing [11, 3]; fc1's block of 20
    assert result.weights_zeroed == 25 + (19 * 25 + 49 * 25 - 25) + 500 * 16
    again = remove_dead_units(net)
    assert again.unused == again.constant == again.weights_zeroed == 0


def test_unread_channels_are_cleared_through_batch_norm() -> None:
    """VGG's conv -> BN -> ReLU -> padded conv: a channel the next conv no longer reads loses its filter and bias."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[3].weight[:, 2] = 0  # channel 2 is read by nothing
    x = torch.randn(5, 3, 8, 8)
    before = net(x)
    result = remove_dead_units(net)
    torch.testing.assert_close(net(x), before)
    assert (net[0].weight[2] == 0).all() and net[0].bias[2] == 0
    assert result.unused == 1 and result.constant == 0 and result.weights_zeroed == 27


def test_padded_consumer_keeps_constant_channels() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight[1] = 0
        net[0].bias[1] = 0.5  # constant 0.5 inside, but the padded border of conv2 would read 0 there
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = remove_dead_units(net)
    assert result.constant == 0 and result.unused == 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_untraceable_network_is_left_alone() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.b(F.relu(self.a(x)))

    net = Dynamic()
    with torch.no_grad():
        net.a.weight[0] = 0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert not remove_dead_units(net).traced
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_a_second_reader_of_the_hidden_layer_blocks_the_rewrite() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(F.relu(h)) + h  # h is read twice

    assert unit_chains(Skip()) == []


def test_sparse_raw_records_round_trip(tmp_path: Path) -> None:
    net = _pruned_mlp()
    remove_dead_units(net)
    with torch.no_grad():
        net.fc2.bias.copy_(net.fc2.bias.half().float())  # float16-exact values: float16 sparse values
    header = save_compressed(net, tmp_path / "m.dstl")
    recs = {r["name"]: r for r in header["tensors"]}
    assert recs["fc1.bias"]["encoding"] == "raw-sparse" and recs["fc1.bias"]["value_dtype"] == "float32"
    assert recs["fc1.bias"]["nonzero"] == int((net.fc1.bias != 0).sum())
    state, _ = load_compressed_state_dict(tmp_path / "m.dstl")
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v), k
    assert read_header(tmp_path / "m.dstl")["tensors"][1]["name"] == "fc1.bias"


@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
def test_sparse_raw_record_lengths_are_checked(tmp_path: Path, value_dtype: str) -> None:
    from distill.compress.fileformat import _decode_record

    rec = {"name": "b", "shape": [10], "dtype": "float32", "encoding": "raw-sparse", "nonzero": 2,
           "value_dtype": value_dtype}
    itemsize = 2 if value_dtype == "float16" else 4
    good = bytes([0b00000101, 0]) + bytes(2 * itemsize)
    assert _decode_record(rec, memoryview(good)).shape == (10,)
    with pytest.raises(ValueError, match="sparse tensor holds"):
        _decode_record(rec, memoryview(good[:-1]))
    with pytest.raises(ValueError, match="bitmap marks 3 non-zeros"):
        _decode_record(rec, memoryview(bytes([0b00000111, 0]) + bytes(2 * itemsize)))
