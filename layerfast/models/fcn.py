"""The paper's fully connected networks: `fcnDxW` = D hidden ReLU layers of width W.

`fcn3x256` (the paper's MNIST FCN) is

    flatten -> fc1: Linear(C*H*W, 256) -> relu1 -> fc2: Linear(256, 256) -> relu2
            -> fc3: Linear(256, 256) -> relu3 -> fc4: Linear(256, num_classes)

The input width comes from the data (784 on MNIST, 64 on the 8x8 `digits`). The model is an
nn.Sequential with named children, so the layer units read `fc1`..`fc4` in a results table
(the paper's figures number the FCN's layers the same way) and the engine can cut it between
any two children. Initialization: PyTorch's default Linear init (`reset_parameters()`), the
"standard init" the paper used.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

FCN_NAME = re.compile(r"^fcn(\d+)x(\d+)$")


class FCN(nn.Sequential):
    """`depth` hidden Linear+ReLU layers of `width`, then a Linear head."""

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        fan_in = in_features
        for i in range(1, depth + 1):
            layers += [(f"fc{i}", nn.Linear(fan_in, width)), (f"relu{i}", nn.ReLU())]
            fan_in = width
        layers.append((f"fc{depth + 1}", nn.Linear(fan_in, num_classes)))
        super().__init__(OrderedDict(layers))


def parse_fcn(name: str) -> tuple[int, int] | None:
    """`"fcn3x256"` -> (3, 256); None if `name` is not of the form fcnDxW with D, W >= 1."""
    m = FCN_NAME.match(name)
    if m is None:
        return None
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 1 or width < 1:
        return None
    return depth, width


def fcn(depth: int, width: int, num_classes: int, in_shape: tuple[int, int, int]) -> FCN:
    c, h, w = in_shape
    return FCN(c * h * w, num_classes, depth, width)
