"""LeNet-family networks for MNIST.

* ``LeNet300100``: the fully connected LeNet-300-100 of LeCun, Bottou, Bengio & Haffner, "Gradient-based
  learning applied to document recognition" (1998), as used by Han et al. ("Deep Compression", 2016) and
  Ullrich et al. ("Soft Weight-Sharing for Neural Network Compression", 2017).
* ``LeNet5Caffe``: the Caffe variant of LeNet-5 (20 and 50 5x5 filters, 500 hidden units) used by both papers.
* ``MNISTConvNet``: the LeNet-like MNIST classifier of the soft weight-sharing tutorial/poster
  (conv 1->25 5x5, conv 25->50 3x3, dense 1250->500->10; 642,460 parameters).
* ``MLP`` / ``SmallConvNet``: quickstart-sized networks for the embedded 8x8 digits.

Initialisation follows Caffe's ``xavier`` filler used for the original models: Glorot-uniform weights, zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models._base import ZooModel
from models._features import LayerInfo, feature_info

__all__ = ["MLP", "LeNet300100", "LeNet5Caffe", "MNISTConvNet", "SmallConvNet"]


def _glorot_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(ZooModel):
    """A fully connected ReLU network ``in_features -> hidden_sizes... -> num_classes``.

    Layers are named ``fc1, fc2, ...`` so they can be tapped by dotted path.

    Args:
        in_features: size of the flattened input.
        hidden_sizes: widths of the hidden layers.
        num_classes: number of outputs (logits).
        input_shape: shape of one input sample (defaults to ``(in_features,)``); inputs are flattened.

    Raises:
        ValueError: if a size is not positive.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden_sizes: Sequence[int] = (64, 32),
        num_classes: int = 10,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden_sizes, num_classes]
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be positive integers, got {sizes}")
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_features,)
        self.num_layers = len(sizes) - 1
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
        _glorot_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = F.relu(x)
        return x

    @property
    def feature_info(self) -> list[LayerInfo]:
        """The tappable layers (dotted path, output shape)."""
        return feature_info(self, self.input_shape)


class LeNet300100(MLP):
    """LeNet-300-100: 784-300-100-10 with ReLU, 266,610 parameters (LeCun et al., 1998)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(in_features=784, hidden_sizes=(300, 100), num_classes=num_classes, input_shape=(1, 28, 28))


class _ConvNet(ZooModel):
    """Two conv + max-pool stages followed by two dense layers (``conv1, conv2, fc1, fc2``)."""

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, int],
        kernels: tuple[int, int],
        hidden: int,
        num_classes: int,
        input_hw: int,
    ) -> None:
        super().__init__()
        self.input_shape = (in_channels, input_hw, input_hw)
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernels[1])
        hw = ((input_hw - kernels[0] + 1) // 2 - kernels[1] + 1) // 2
        self.fc1 = nn.Linear(channels[1] * hw * hw, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        _glorot_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C1, H1, W1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, C2, H2, W2)
        x = F.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.fc2(x)

    @property
    def feature_info(self) -> list[LayerInfo]:
        """The tappable layers (dotted path, output shape)."""
        return feature_info(self, self.input_shape)


class LeNet5Caffe(_ConvNet):
    """LeNet-5 as in Caffe's MNIST example: conv 1->20 5x5, pool, conv 20->50 5x5, pool, 800->500->10.

    431,080 parameters. Used by "Deep Compression" (Han et al., 2016) and "Soft Weight-Sharing" (Ullrich et al., 2017).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(1, (20, 50), (5, 5), 500, num_classes, 28)


class MNISTConvNet(_ConvNet):
    """The LeNet-like classifier of the soft weight-sharing tutorial: conv 1->25 5x5, conv 25->50 3x3, 1250->500->10.

    642,460 parameters (per layer 650 / 11,300 / 625,500 / 5,010).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(1, (25, 50), (5, 3), 500, num_classes, 28)


class SmallConvNet(_ConvNet):
    """A quickstart-sized conv net for 8x8 digits: conv 1->c1 3x3, pool, conv c1->c2 2x2, pool, dense.

    Args:
        channels: output channels of the two convolutions.
        hidden: width of the hidden dense layer.
        num_classes: number of outputs.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__(1, (int(channels[0]), int(channels[1])), (3, 2), hidden, num_classes, 8)
