"""Initialization rules of the registered architectures, one leaf module at a time.

Re-randomization (DESIGN.md §3) resets a unit to a *fresh draw from its own initialization
distribution*. For a registered architecture that distribution is whatever its constructor
used, so each builder initializes its model by calling the same function that `ArchSpec.init`
exposes: build and re-randomization cannot drift apart.

Each function re-draws ONE module in place (its own parameters, not its children's) and uses
torch's global RNG, so callers control reproducibility with `torch.manual_seed` or
`torch.random.fork_rng`. Normalization layers are reset to their initial state, running
statistics included (weight 1, bias 0, mean 0, var 1): that *is* their init distribution.
"""

from __future__ import annotations

import torch
from torch import nn

# Types whose init is "back to the initial state" rather than a random draw.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
    nn.GroupNorm,
    nn.LayerNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _reset(module: nn.Module) -> None:
    """The module's own `reset_parameters()` (PyTorch's default init), when it has one."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def default_init(module: nn.Module) -> None:
    """PyTorch's default init: `module.reset_parameters()`.

    For nn.Linear that is kaiming_uniform(a=sqrt(5)) on the weight, i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the bias: the "standard init"
    the paper's FCN experiments used.
    """
    _reset(module)


def resnet_init(module: nn.Module) -> None:
    """torchvision's ResNet rule.

    Conv: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. N(0, 2/fan_out) with
    fan_out = out_channels * kh * kw; a conv bias (torchvision's ResNets have none) is zeroed.
    Normalization: weight 1, bias 0, running stats reset. Linear (the head): PyTorch's default
    init, because torchvision leaves `fc` as constructed.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        _reset(module)


def vgg_init(module: nn.Module) -> None:
    """torchvision's VGG rule.

    Conv: kaiming_normal_(mode="fan_out", nonlinearity="relu"), bias 0. Linear: N(0, 0.01²),
    bias 0. Normalization: weight 1, bias 0, running stats reset.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        _reset(module)


@torch.no_grad()
def apply_init(model: nn.Module, init: object, types: tuple[type[nn.Module], ...]) -> None:
    """Apply `init` to every submodule of one of `types`, in `modules()` order.

    Builders call this after construction the way torchvision loops over `self.modules()`,
    so a seeded build draws the same numbers as torchvision's own constructor.
    """
    assert callable(init)
    for m in model.modules():
        if isinstance(m, types):
            init(m)
