"""CIFAR-sized ResNets, named like torchvision's so block/stage units read the same.

- `resnet20` (and `resnet32/44/56/110`): He et al. 2016 §4.2, depth 6n+2: a 3x3 conv stem
  with 16 channels, three stages of n BasicBlocks with 16/32/64 channels (stride 2 at the start
  of stages 2 and 3), global average pool, fc. The shortcut where the shape changes is
  **option B**, a 1x1 stride-2 conv + BN (`layerS.0.downsample.0/.1`), not the paper's
  parameter-free zero-padding (option A): B is what most PyTorch re-implementations train, it
  gives every stage a torchvision-shaped first block, and the conv is a unit like any other.
- `resnet18_cifar`: torchvision's ResNet-18 with a 3x3 stride-1 conv1 and no max-pool
  (`maxpool` is an nn.Identity), the usual CIFAR form (e.g. kuangliu/pytorch-cifar).

Names: `conv1, bn1, relu, maxpool, layer1.., avgpool, fc`. Initialization: torchvision's ResNet
rule (`init.resnet_init`: kaiming-normal fan_out for convs, BN 1/0, default Linear).
"""

from __future__ import annotations

from layerfast.models.resnet import BasicBlock, ResNet

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def cifar_resnet(depth: int, num_classes: int, in_shape: tuple[int, int, int]) -> ResNet:
    """He et al.'s CIFAR ResNet of depth 6n+2 with option-B shortcuts."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        [n, n, n],
        num_classes=num_classes,
        in_channels=in_shape[0],
        widths=(16, 32, 64),
        stem="cifar",
    )


def resnet18_cifar(num_classes: int, in_shape: tuple[int, int, int]) -> ResNet:
    """ResNet-18 with the CIFAR stem: conv1 3x3 stride 1, no max-pool."""
    return ResNet(
        BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_shape[0], stem="cifar"
    )
