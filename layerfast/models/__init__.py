"""Architecture registry: names -> how to build a model, re-draw its init, and cut it into units.

An `ArchSpec` carries everything the analysis needs to know about an architecture beyond its
weights: how to build it for a dataset (`build(num_classes, in_shape)`), how to re-draw one
module from the architecture's own initialization distribution (`init`, for re-randomization:
the paper's re-randomization is a draw from the *training* init, which is not always PyTorch's
default, e.g. torchvision's kaiming-normal fan_out convs), and what its blocks and stages are
(for `--granularity block|stage`, DESIGN.md §3).

Registered names (`ARCHS`):

- `fcn3x256` (the paper's FCN) and any `fcnDxW` (D hidden layers of width W), see `fcn.py`;
- `vgg11 vgg13 vgg16 vgg19` and `*_bn`, torchvision's definitions, and the CIFAR forms
  `vgg11_cifar` ... `vgg19_bn_cifar`, see `vgg.py`;
- `resnet18 resnet34 resnet50 resnet101 resnet152`, torchvision's definitions, see `resnet.py`;
- `resnet20 resnet32 resnet44 resnet56 resnet110` and `resnet18_cifar`, see `resnet_cifar.py`.

Anything of the form `package.module:factory` is a user architecture (`user.py`): init None
(the modules' own `reset_parameters()`), blocks/stages None (units fall back to the top-level
children).
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.models import fcn as _fcn
from layerfast.models import resnet as _resnet
from layerfast.models import resnet_cifar as _cifar
from layerfast.models import user as _user
from layerfast.models import vgg as _vgg
from layerfast.models.init import default_init, resnet_init, vgg_init

Units = list[tuple[str, list[str]]]

__all__ = ["ARCHS", "ArchSpec", "build_model", "get_arch", "input_dtype", "load_tensors"]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture.

    build:  (num_classes, in_shape=(C, H, W)) -> a freshly initialized model.
    init:   re-draws ONE leaf module in place from the architecture's init rule, using torch's
            global RNG (callers seed it); None means `module.reset_parameters()`.
    blocks: model -> [(unit name, [module-name prefixes])] for `--granularity block`, or None
            (top-level children).
    stages: the same for `--granularity stage`.
    factory: a user arch's `module:factory` callable (part of the model's definition in the
            resume fingerprint, `models.identity`); None for the registry's.
    """

    name: str
    build: Callable[[int, tuple[int, int, int]], nn.Module]
    init: Callable[[nn.Module], None] | None = None
    blocks: Callable[[nn.Module], Units] | None = None
    stages: Callable[[nn.Module], Units] | None = None
    factory: Callable[..., Any] | None = None


def _checked(
    name: str, build: Callable[[int, tuple[int, int, int]], nn.Module]
) -> Callable[[int, tuple[int, int, int]], nn.Module]:
    """Wrap a builder so bad num_classes / in_shape is a LayerfastError, not a torch error."""

    def checked_build(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise LayerfastError(
                f"arch {name!r}: num_classes must be a positive int, got {num_classes!r}"
            )
        shape = tuple(in_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise LayerfastError(
                f"arch {name!r}: in_shape must be (C, H, W) of positive ints, got {in_shape!r}"
            )
        return build(num_classes, shape)  # type: ignore[arg-type]

    return checked_build


def _fcn_spec(name: str, depth: int, width: int) -> ArchSpec:
    return ArchSpec(name, _checked(name, partial(_fcn.fcn, depth, width)), default_init)


def _register() -> dict[str, ArchSpec]:
    archs: dict[str, ArchSpec] = {"fcn3x256": _fcn_spec("fcn3x256", 3, 256)}
    for cifar in (False, True):  # torchvision's names are torchvision's models (DESIGN §6)
        for depth in _vgg.CONFIGS:
            for bn in (False, True):
                name = f"vgg{depth}{'_bn' if bn else ''}{'_cifar' if cifar else ''}"
                archs[name] = ArchSpec(
                    name,
                    _checked(name, partial(_vgg.vgg, depth, bn, cifar)),
                    vgg_init,
                    _vgg.vgg_blocks,
                    _vgg.vgg_stages,
                )
    for name in _resnet._IMAGENET:
        archs[name] = ArchSpec(
            name,
            _checked(name, partial(_resnet.imagenet_resnet, name)),
            resnet_init,
            _resnet.resnet_blocks,
            _resnet.resnet_stages,
        )
    cifar: dict[str, Callable[[int, tuple[int, int, int]], nn.Module]] = {
        f"resnet{d}": partial(_cifar.cifar_resnet, d) for d in _cifar.CIFAR_DEPTHS
    }
    cifar["resnet18_cifar"] = _cifar.resnet18_cifar
    for name, build in cifar.items():
        archs[name] = ArchSpec(
            name, _checked(name, build), resnet_init, _resnet.resnet_blocks, _resnet.resnet_stages
        )
    return archs


ARCHS: dict[str, ArchSpec] = _register()


def _user_spec(spec: str, factory: Callable[..., Any] | None = None) -> ArchSpec:
    where = None  # a factory given as an object: its module is the caller's business
    if factory is None:
        where = os.getcwd()  # importable again while the factory is called (`user.importable`)
        factory = _user.load_factory(spec, where)  # import errors surface here, before any data

    def build(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        return _user.build_user_model(spec, factory, num_classes, in_shape, where)

    return ArchSpec(spec, _checked(spec, build), None, None, None, factory)


def _callable_name(f: Callable[..., Any]) -> str:
    """`module:qualname` of a factory given as an object; a functools.partial named by its
    function (`functools.partial(module:qualname)`), another callable without a __qualname__
    by its class (`module:Class instance`).

    Never its repr: `<function f at 0x7f...>` is another name in every process, and the name
    is part of the resume fingerprint, so the same script run again refused its own out dir
    ("differs in: arch"). What a partial binds is in the model's definition digest
    (`models.identity`), which refuses a changed one."""
    if isinstance(f, partial):
        return f"functools.partial({_callable_name(f.func)})"
    mod, qual = getattr(f, "__module__", None), getattr(f, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qual, str):
        return f"{mod}:{qual}"
    cls = type(f)
    return f"{cls.__module__}:{cls.__qualname__} instance"


def get_arch(name: str | Callable[..., nn.Module]) -> ArchSpec:
    """A registry name (case-insensitive), `fcnDxW`, or `package.module:factory`; or (from
    Python) the factory itself, a class or function returning an nn.Module, built as that
    string's factory is and named `module:qualname`."""
    if isinstance(name, nn.Module):  # callable too, but a model, not what builds one
        raise LayerfastError(
            f"arch is an nn.Module instance ({type(name).__name__}); pass its class or a "
            "function that builds it: layerfast builds fresh models (re-randomization draws)"
        )
    if callable(name) and not isinstance(name, str):
        return _user_spec(_callable_name(name), name)
    if not isinstance(name, str) or not name.strip():
        raise LayerfastError(f"arch must be a non-empty name, got {name!r}")
    if _user.is_user_spec(name):
        return _user_spec(name.strip())
    key = name.strip().lower()
    if key in ARCHS:
        return ARCHS[key]
    dims = _fcn.parse_fcn(key)
    if dims is not None:
        return _fcn_spec(key, *dims)
    close = difflib.get_close_matches(key, list(ARCHS), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise LayerfastError(
        f"unknown arch {name!r}{hint}; registered: {', '.join(ARCHS)}; also fcnDxW (D hidden "
        "layers of width W, e.g. fcn2x100) or 'package.module:factory'"
    )


def build_model(
    arch: str | Callable[..., nn.Module], num_classes: int, in_shape: tuple[int, int, int]
) -> tuple[nn.Module, ArchSpec]:
    """Look `arch` up and build it: the model (train mode, freshly initialized) and its spec.

    A model too large to allocate (`fcn1x99999999999`, a head for a stray label of 15075141 or
    2**62) is a LayerfastError for every caller (analyze, train, bench, --list-units), not
    torch's allocator traceback: torch says "can't allocate memory", or from about 2**63 bytes
    on "Storage size calculation overflowed", or fails to unpack a size past int64."""
    spec = get_arch(arch)
    arch = arch if isinstance(arch, str) else spec.name  # a callable: `module:qualname`
    try:
        model = spec.build(num_classes, tuple(in_shape))  # type: ignore[arg-type]
    except (MemoryError, RuntimeError, TypeError, OverflowError) as exc:
        text = str(exc).lower()
        if isinstance(exc, (TypeError, RuntimeError)) and not any(
            w in text for w in ("alloc", "overflow")
        ):
            raise
        why = "its size overflows" if "overflow" in text else "out of memory"
        msg = " ".join(str(exc).split())[:200]
        raise LayerfastError(
            f"cannot build {arch} for {num_classes:,} classes and inputs {tuple(in_shape)}: "
            f"{why} ({msg})"
        ) from None
    _materialize(model, arch, tuple(in_shape))
    return model, spec


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model takes its inputs in: its own floating dtype (a float64 model gets
    float64 data, as in its own loop), float32 when it holds no floating tensor. Read from the
    dtype alone, which a lazy module's uninitialized parameter has too."""
    for t in (*model.parameters(), *model.buffers()):
        if t.dtype.is_floating_point:
            return t.dtype
    return torch.float32


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """`model.load_state_dict(tensors, strict=strict)` for a plain dict of tensors (a
    checkpoint's, a variant's, a saved copy), with the model's own version metadata attached.

    A module whose `_load_from_state_dict` reads its state-dict version (torchvision's MNASNet:
    "version should be set to 1 or 2 instead of None") refuses a dict without `_metadata`; the
    tensors were saved from, or drawn for, this very model, so its current versions are theirs.
    """
    own = getattr(tensors, "_metadata", None)
    if own is None:
        own = getattr(model.state_dict(keep_vars=True), "_metadata", None)
    loaded = OrderedDict(tensors)
    if own is not None:
        loaded._metadata = own  # type: ignore[attr-defined]
    return model.load_state_dict(loaded, strict=strict)


def _materialize(model: nn.Module, arch: str, in_shape: tuple[int, ...]) -> None:
    """Give lazy modules (`nn.LazyLinear`, ...) their shapes with one forward of two zero
    samples, in eval mode (a lazy BatchNorm must not count zeros into its statistics): until
    then their parameters have no shape, and checking a checkpoint against the model, or
    saving θ⁰, fails on them."""
    from torch.nn.parameter import is_lazy

    if not any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        return
    dtype = input_dtype(model)
    modes = [(m, m.training) for m in model.modules()]  # a factory may freeze some in eval
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *in_shape, dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - a user's model that cannot take the inputs
        msg = " ".join(str(exc).split())[:200]
        raise LayerfastError(f"cannot build {arch}: its lazy modules take their shapes from a "
                             f"forward of inputs {in_shape}, which failed: "
                             f"{type(exc).__name__}: {msg}") from exc
    finally:
        model.train(modes[0][1])  # the model's own train() (an override may keep state in step)
        for m, mode in modes:  # then each module's own flag (a factory may freeze some in eval)
            m.training = mode
