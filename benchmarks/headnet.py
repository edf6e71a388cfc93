"""An FCN 3x256 whose forward keeps its head in float32 (`torch.autocast(..., enabled=False)`
around `fc4`), the pattern GPU code often uses: the model of BENCHMARKS.md's series 8, where
such a region is replayed on the traced program instead of sending the model untraced.

    layerfast bench --arch benchmarks.headnet:make --data fashion-mnist --device cpu \\
        --precision bf16

(from the repository root). The region names the CPU: set `DEVICE = "cuda"` for a CUDA
bench (autocast for another device type does not touch the pass's ops). fx cannot read
`x.device.type` while tracing, so the device type is a constant here, as in most code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEVICE = "cpu"


class HeadNet(nn.Module):
    def __init__(self, num_classes: int, in_shape: Sequence[int]) -> None:
        super().__init__()
        d = 1
        for s in in_shape:
            d *= s
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 256), nn.Linear(256, 256), nn.Linear(256, 256)
        self.fc4 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        h = torch.relu(self.fc2(h))
        h = torch.relu(self.fc3(h))
        with torch.autocast(DEVICE, enabled=False):
            return self.fc4(h.float())


def make(num_classes: int, in_shape: Sequence[int]) -> nn.Module:
    return HeadNet(num_classes, in_shape)
