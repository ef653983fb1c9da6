"""ResNet backbones (torchvision definitions), shared by pretraining and every transfer stage.

The backbone is a torchvision ResNet whose ``fc`` is replaced by ``nn.Identity``, so its state_dict keys
are exactly torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) minus ``fc.*``.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
BOTTLENECK_ARCHS = ("resnet50", "resnet101")  # bottleneck blocks (conv1-3, bn1-3); the others: basic blocks


def build_resnet(arch: str = "resnet50", small_stem: bool = False, zero_init_residual: bool | None = None) -> nn.Module:
    """A torchvision ResNet without its classifier.

    small_stem: the CIFAR-style stem for 32-px images (3x3 stride-1 conv1, no max-pool).
    zero_init_residual: zero-init the last BN of each residual block; default True for the
    bottleneck ResNets (50/101), as in the paper's code, False otherwise.
    """
    if arch not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(FEATURE_DIMS)}")
    if zero_init_residual is None:
        zero_init_residual = arch in BOTTLENECK_ARCHS
    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if small_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.feature_dim = FEATURE_DIMS[arch]
    return model


def feature_dim(arch: str) -> int:
    if arch not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(FEATURE_DIMS)}")
    return FEATURE_DIMS[arch]
