"""Models: exact parameter counts, forward/backward, tappable layers, rebuild from arch_spec."""

from __future__ import annotations

import pytest
import torch

from distill.arch import ArchitectureError, arch_spec, build_module
from models import MLP, VGG19BN, LeNet5Caffe, LeNet300100, MNISTConvNet, SmallConvNet


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("cls", "expected", "per_layer"),
    [
        (LeNet300100, 266_610, {"fc1": 235_500, "fc2": 30_100, "fc3": 1_010}),
        (LeNet5Caffe, 431_080, {"conv1": 520, "conv2": 25_050, "fc1": 400_500, "fc2": 5_010}),
        (MNISTConvNet, 642_460, {"conv1": 650, "conv2": 11_300, "fc1": 625_500, "fc2": 5_010}),
    ],
)
def test_lenet_sizes(cls: type, expected: int, per_layer: dict[str, int]) -> None:
    m = cls()
    assert n_params(m) == expected
    for name, count in per_layer.items():
        assert n_params(m.get_submodule(name)) == count


def test_vgg19bn_state_size() -> None:
    with torch.device("meta"):  # 39M numbers: count without allocating them
        m = VGG19BN()
    sd = m.state_dict()
    total = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    weights = sum(v.numel() for k, v in sd.items() if k.endswith("weight"))
    assert total == 38_969_930
    assert weights == 38_939_712
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 4 + [512] * 8


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (LeNet300100(), (1, 28, 28)),
        (LeNet5Caffe(), (1, 28, 28)),
        (MNISTConvNet(), (1, 28, 28)),
        (VGG19BN(width=1 / 16, hidden=256), (3, 32, 32)),
        (MLP(64, (32, 16), 10), (1, 8, 8)),
        (SmallConvNet(), (1, 8, 8)),
    ],
)
def test_forward_backward(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_feature_info_lists_tappable_layers_with_shapes() -> None:
    info = {i.module: i.shape for i in LeNet5Caffe().feature_info}
    assert info == {"conv1": (20, 24, 24), "conv2": (50, 8, 8), "fc1": (500,), "fc2": (10,)}
    lenet = {i.module: i.shape for i in LeNet300100().feature_info}
    assert lenet == {"fc1": (300,), "fc2": (100,), "fc3": (10,)}
    vgg = VGG19BN(width=1 / 16, hidden=64)
    vgg_info = vgg.feature_info
    assert vgg_info[0].module == "features.0" and vgg_info[0].shape == (4, 32, 32)
    assert vgg_info[-1].module == "classifier.6" and vgg_info[-1].shape == (10,)
    assert vgg.training  # feature_info restores the mode it found


def test_arch_spec_round_trip() -> None:
    m = VGG19BN(width=0.0625, hidden=32, dropout=0.3)
    spec = arch_spec(m)
    assert spec == {
        "class_path": "models.vgg.VGG19BN",
        "init_args": {"num_classes": 10, "width": 0.0625, "dropout": 0.3, "hidden": 32},
    }
    rebuilt = build_module(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"class_path": "os.system"}, "not an nn.Module subclass"),
        ({"class_path": "nowhere.Model"}, "cannot import model class"),
        ({"class_path": "models.lenet.MLP", "init_args": {"bogus": 1}}, "rejected init_args"),
        ({"init_args": {}}, "class_path"),
    ],
)
def test_build_module_rejects_bad_specs(spec: dict, match: str) -> None:
    with pytest.raises(ArchitectureError, match=match):
        build_module(spec)


def test_bad_model_arguments() -> None:
    with pytest.raises(ValueError, match="width must be > 0"):
        VGG19BN(width=0)
    with pytest.raises(ValueError, match="sizes must be positive"):
        MLP(64, (0,), 10)
