"""The CIFAR ResNets of He et al. (2016) used in the ManiDP paper, registered in timm's registry.

3x3 stem with 16 channels and no max-pool, three stages of 16-32-64 channels with n basic blocks
each (depth = 6n + 2), identity shortcuts that subsample and zero-pad the channels when the shape
changes ("option A": no parameters), global average pooling and a linear classifier.
``timm.create_model("cifar_resnet56", num_classes=10)`` works once manidp_cli is imported.

Parameter counts (10 classes): ResNet-20 0.27 M, ResNet-32 0.46 M, ResNet-56 0.85 M, ResNet-110 1.7 M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

_DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride = stride
        self.extra_channels = channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, **kwargs):
        super().__init__()
        blocks = _DEPTHS[depth]
        self.num_classes = num_classes
        self.num_features = 64
        self.pretrained_cfg = {  # what timm's config.json writer and weight loader read
            "architecture": f"cifar_resnet{depth}",
            "first_conv": "conv1",
            "classifier": "fc",
            "input_size": (in_chans, 32, 32),
            "num_classes": num_classes,
        }
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            stage_blocks = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                stage_blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _create(depth: int, pretrained: bool, kwargs: dict) -> CifarResNet:
    if pretrained:
        raise ValueError(f"cifar_resnet{depth} has no published weights here; train one with `manidp train`")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return CifarResNet(depth, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(20, pretrained, kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(32, pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(56, pretrained, kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create(110, pretrained, kwargs)
