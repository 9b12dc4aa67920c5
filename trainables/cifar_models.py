"""CIFAR-style networks from the pruning literature: ResNet-20/56/110 (He et al. 2016, option-A
shortcuts, widths 16/32/64) and VGG-16 with batch norm (as in Li et al. 2017 / Liu et al. 2017)."""
from __future__ import annotations

from torch import nn

from methods.layers import ChannelPadShortcut
from methods.errors import ArgumentError

__all__ = ["CifarResNet", "BasicBlock", "VGGCifar", "scaled"]

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(width: int, width_mult: float) -> int:
    """Channel count after a width multiplier; never below 1."""
    return max(1, int(round(width * width_mult)))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ChannelPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``depth`` 20, 56 or 110."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ArgumentError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [scaled(w, width_mult) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class VGGCifar(nn.Module):
    """VGG-16 with batch norm for 32x32 inputs: 13 convs, global average pool, one classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, cfg=VGG16_CFG):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            c_out = scaled(v, width_mult)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))
