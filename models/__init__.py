"""Model zoo for distill: the networks of the papers we reproduce.

Every model exposes ``feature_info``: the layers a user can tap for layer-wise distillation, as dotted module
paths with their output shapes (per sample), in forward order.
"""

from models._features import LayerInfo, feature_info
from models.lenet import MLP, LeNet5Caffe, LeNet300100, MNISTConvNet, SmallConvNet
from models.vgg import VGG19BN

__all__ = [
    "MLP",
    "VGG19BN",
    "LayerInfo",
    "LeNet300100",
    "LeNet5Caffe",
    "MNISTConvNet",
    "SmallConvNet",
    "feature_info",
]
