"""VGG19 with batch normalisation for CIFAR-10.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015), with batch
norm after every convolution (Ioffe & Szegedy, 2015) and the CIFAR-10 head used by the Deep Compression
reproductions: dense 512 -> 4096 -> 4096 -> 10 with dropout. At ``width=1`` the state dict holds 38,969,930 numbers
counting BN running statistics (without ``num_batches_tracked``).

Initialisation as in torchvision's VGG: Kaiming-normal (fan-out) convolutions, N(0, 0.01) dense weights, zero
biases, BN scale 1 and shift 0.
"""

from __future__ import annotations

import torch
from torch import nn

from models._base import ZooModel
from models._features import LayerInfo, feature_info

__all__ = ["VGG19BN", "VGG19_CFG"]

# "M" is a 2x2 max-pool; numbers are conv output channels (3x3, padding 1).
VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                              512, 512, 512, 512, "M"]  # fmt: skip


class VGG19BN(ZooModel):
    """VGG19-BN for 32x32 inputs.

    Args:
        num_classes: number of outputs.
        width: multiplier on every channel count and hidden width (use < 1 for fast tests).
        dropout: dropout probability before each hidden dense layer's output.
        hidden: width of the two hidden dense layers (4096 in the reference model).

    Raises:
        ValueError: if ``width`` is not positive or ``dropout`` is outside [0, 1).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.5, hidden: int = 4096) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VGG19BN width must be > 0, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"VGG19BN dropout must be in [0, 1), got {dropout}")
        self.input_shape = (3, 32, 32)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_ch = max(1, round(int(v) * width))
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        h = max(1, round(hidden * width))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch, h),  # 32x32 input is 1x1 after five pools: (B, C)
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h, h),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, 1, 1)
        return self.classifier(x.flatten(1))

    @property
    def feature_info(self) -> list[LayerInfo]:
        """The tappable layers (dotted path, output shape): convs, BNs, ReLUs, pools and dense layers."""
        return feature_info(self, self.input_shape)
