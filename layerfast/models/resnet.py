"""ResNets with torchvision's exact structure, so torchvision checkpoints load unchanged.

The module tree, state-dict keys, shapes, forward computation and initialization follow
torchvision's `torchvision/models/resnet.py` (BSD-3-Clause; structure re-implemented here so
layerfast does not depend on torchvision): `conv1, bn1, relu, maxpool, layer1..layer4, avgpool,
fc`, blocks `conv1/bn1/conv2/bn2(/conv3/bn3)` plus `downsample.0` (1x1 conv) and
`downsample.1` (BN), the stride of a Bottleneck on its 3x3 conv (ResNet v1.5), no
zero-init of the last BN. Construction order matches torchvision too, so under the same seed
a freshly built model has the same weights as `torchvision.models.resnet50()`.

Two generalisations, both off by default: `in_channels` (conv1 reads C channels from the
data) and, for the CIFAR forms in `resnet_cifar.py`, the stage widths and a 3x3 stride-1 stem
without max-pool. Units (DESIGN.md §3): block granularity gives `stem` (conv1 + bn1), each
residual block `layerS.B`, and `fc`; stage granularity gives `stem`, `layer1`.., `fc`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from layerfast.models.init import NORM_TYPES, resnet_init


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first carries the stride. Used by ResNet-18/34 and the CIFAR forms."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet, with the stem and stage widths as options (defaults = torchvision).

    `stem="imagenet"`: 7x7 stride-2 conv + 3x3 stride-2 max-pool. `stem="cifar"`: 3x3 stride-1
    conv, and `maxpool` is an nn.Identity (kept so the forward and the module names are the
    same for both stems; it owns no state, so state dicts are unaffected).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"{len(layers)} stages but {len(widths)} widths")
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(
                in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
            )
        elif stem == "cifar":
            self.conv1 = conv3x3(in_channels, self.inplanes)
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if stem == "imagenet"
            else nn.Identity()
        )
        self.num_stages = len(layers)
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            stage = self._make_layer(block, width, n, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        # torchvision's loop: convs and norms re-drawn, fc left at PyTorch's default init.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, *NORM_TYPES)):
                resnet_init(m)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        # The downsample is constructed before the first block, as in torchvision, so the RNG
        # stream (and thus a seeded build) matches.
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Block units: `stem` (conv1 + bn1), every residual block `layerS.B`, `fc` (the head).

    The stem is named "stem" as in the paper's ResNet figures (a unit named "conv1" would read
    like the first conv of a block). ResNet-50 gives 1 + 16 + 1 = 18 units.
    """
    units: list[tuple[str, list[str]]] = [("stem", ["conv1", "bn1"])]
    for stage_name, stage in _stages(model):
        units += [(f"{stage_name}.{b}", [f"{stage_name}.{b}"]) for b, _ in stage.named_children()]
    return units + [("fc", ["fc"])]


def resnet_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Stage units: `stem`, `layer1`..`layerN`, `fc`."""
    units: list[tuple[str, list[str]]] = [("stem", ["conv1", "bn1"])]
    units += [(name, [name]) for name, _ in _stages(model)]
    return units + [("fc", ["fc"])]


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, child)
        for name, child in model.named_children()
        if name.startswith("layer") and name[5:].isdigit()
    ]


_IMAGENET: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def imagenet_resnet(name: str, num_classes: int, in_shape: tuple[int, int, int]) -> ResNet:
    """torchvision's `name` (resnet18/34/50/101/152) with C = in_shape[0] input channels.

    Any H, W works (the adaptive average pool makes the head size-independent), so the ImageNet
    forms also run on CIFAR or MNIST-sized inputs, as in torchvision.
    """
    block, layers = _IMAGENET[name]
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_shape[0])
