"""VGG in two forms, with and without BatchNorm: torchvision's (ImageNet) and the CIFAR form.

`vgg11` ... `vgg19_bn` are torchvision's definitions, so torchvision checkpoints load
(DESIGN.md §6); `vgg11_cifar` ... `vgg19_bn_cifar` are the CIFAR form of the paper's CIFAR-10
experiments. Both are an nn.Sequential with named children and torchvision's names:

    [pad]      nn.ZeroPad2d, present only when the input is smaller than 32x32 (see below)
    features   torchvision's VGG conv stack: 3x3 conv (+BN) + ReLU, 2x2 max-pool after each of
               the five stages, so 32x32 becomes 1x1x512 (224x224: 7x7x512)
    avgpool    torchvision: nn.AdaptiveAvgPool2d(7); CIFAR: nn.AdaptiveAvgPool2d(1), the
               identity at 32x32, which lets larger inputs work
    flatten
    classifier torchvision: Linear(512*7*7, 4096) -> ReLU -> Dropout -> Linear(4096, 4096) ->
               ReLU -> Dropout -> Linear(4096, num_classes) (`classifier.0/.3/.6`);
               CIFAR: Linear(512, 512) -> ReLU -> Linear(512, 512) -> ReLU ->
               Linear(512, num_classes) (`classifier.0/.2/.4`)

The CIFAR classifier is the common CIFAR form with three FC layers (the paper's CIFAR-10 VGGs
had FC layers), without dropout: dropout only acts in training and would make the head's three
linears harder to read. torchvision's `VGG` is a Module whose forward flattens between avgpool
and classifier; the Sequential with a stateless `flatten` child has the same keys, shapes,
forward and, built in the same order under the same seed, the same initial weights.

Input adaptation: conv1 takes C = in_shape[0] channels, so grayscale MNIST works; an input
smaller than 32 in H or W is zero-padded to 32 (centred, the extra pixel on the bottom/right)
by the first module `pad`, because five 2x2 pools need at least 32 pixels. The module exists
only when needed, so models for larger inputs have exactly torchvision's children. `pad` owns
no state, so checkpoints are unaffected either way.

Initialization (torchvision's VGG rule, `init.vgg_init`): kaiming-normal fan_out for convs with
bias 0, N(0, 0.01²) for linears with bias 0, BN weight 1 bias 0.

Units: block granularity = one unit per conv (with its BN, per the BN policy) and per linear,
named like the layer units (`features.0`, `classifier.4`); VGG has no residual blocks, so
that is the natural "block". Stage granularity: `stage1`..`stage5` (the convs between two
pools) and `classifier`.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from layerfast.models.init import NORM_TYPES, apply_init, vgg_init

M = "M"  # a 2x2 max-pool in a configuration
CONFIGS: dict[int, list[int | str]] = {
    11: [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    13: [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    16: [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    19: [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M,
         512, 512, 512, 512, M],
}  # fmt: skip
MIN_SIZE = 32


def _features(cfg: list[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == M:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    return nn.Sequential(*layers)


def _pad(h: int, w: int) -> nn.ZeroPad2d | None:
    if h >= MIN_SIZE and w >= MIN_SIZE:
        return None
    dh, dw = max(MIN_SIZE - h, 0), max(MIN_SIZE - w, 0)
    return nn.ZeroPad2d((dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))  # left right top bottom


def _classifier(num_classes: int, cifar: bool) -> nn.Sequential:
    if cifar:
        return nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
    return nn.Sequential(  # torchvision's, dropout 0.5
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(4096, num_classes),
    )


class VGG(nn.Sequential):
    """torchvision's VGG, or (`cifar`) the CIFAR form; see the module docstring for both
    layouts and the input adaptation."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_shape: tuple[int, int, int],
        batch_norm: bool,
        cifar: bool = True,
    ) -> None:
        c, h, w = in_shape
        children: list[tuple[str, nn.Module]] = []
        pad = _pad(h, w)
        if pad is not None:
            children.append(("pad", pad))
        children += [
            ("features", _features(CONFIGS[depth], c, batch_norm)),
            ("avgpool", nn.AdaptiveAvgPool2d(1 if cifar else 7)),
            ("flatten", nn.Flatten()),
            ("classifier", _classifier(num_classes, cifar)),
        ]
        super().__init__(OrderedDict(children))
        apply_init(self, vgg_init, (nn.Conv2d, nn.Linear, *NORM_TYPES))


def vgg(
    depth: int, batch_norm: bool, cifar: bool, num_classes: int, in_shape: tuple[int, int, int]
) -> VGG:
    return VGG(depth, num_classes, in_shape, batch_norm, cifar)


def vgg_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """One unit per conv and per linear, named by its module (BN joins per the BN policy)."""
    return [
        (name, [name]) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def vgg_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """`stage1`..`stage5`: the conv (+BN) modules between two max-pools; then `classifier`."""
    stages: list[tuple[str, list[str]]] = []
    current: list[str] = []
    for name, m in model.features.named_children():
        if isinstance(m, nn.MaxPool2d):
            if current:
                stages.append((f"stage{len(stages) + 1}", current))
            current = []
        elif isinstance(m, (nn.Conv2d, *NORM_TYPES)):
            current.append(f"features.{name}")
    if current:
        stages.append((f"stage{len(stages) + 1}", current))
    return stages + [("classifier", ["classifier"])]
