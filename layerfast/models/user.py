"""User architectures: `--arch package.module:factory`.

The module is imported with the current directory importable (it is put first on `sys.path`
when missing, as `python -m` would), so `--arch mynet:build` finds `./mynet.py`; so is each call
of the factory (which may import a sibling module when called). The entry is removed again
afterwards: `analyze(arch="mynet:build")` in a notebook left the directory on its `sys.path`,
where it shadowed installed packages for every later import. `factory` may
be a dotted attribute path (`mynet:Net.small`). It is called with the keywords `num_classes=`
and `in_shape=` that its signature accepts (a `**kwargs` accepts both), else with no arguments,
and must return an `nn.Module`. A `**kwargs` factory whose callee rejects one of them ("unexpected
keyword argument 'in_shape'", as `torchvision.models:resnet18` does) is called again without it.
A model `torch.compile` wrapped (`return torch.compile(net)`, or a compiled submodule) is used
uncompiled (`uncompiled`): its unit names and state-dict keys are those of the module itself,
which is what checkpoints hold once the loader drops `_orig_mod.` (DESIGN §2).

Everything that can go wrong (no such module, an import that raises, no such attribute, not
callable, the factory raises, it returns something else) is one `LayerfastError` naming the
spec and the underlying message, never a traceback: this is user code, the user needs the
message, not our stack. The user's own exception is chained (`__cause__`), so a notebook or a
Python caller still sees the line of their code that failed; the CLI prints the message only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from layerfast.errors import LayerfastError


def is_user_spec(name: str) -> bool:
    """True for `pkg.mod:factory` (exactly one ':' with text on both sides)."""
    mod, sep, attr = name.partition(":")
    return bool(sep) and bool(mod.strip()) and bool(attr.strip()) and ":" not in attr


def _describe(err: BaseException) -> str:
    msg = str(err)
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


@contextlib.contextmanager
def importable(where: str | None) -> Iterator[None]:
    """`where` first on `sys.path` for the block when it is not on it (None: nothing), and
    removed again afterwards, whatever the block did: the caller's import path as it was."""
    added = where is not None and where not in sys.path
    if added:
        sys.path.insert(0, where)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):  # the block took it off itself
                sys.path.remove(where)


def load_factory(spec: str, where: str | None = None) -> Callable[..., Any]:
    """Import `pkg.mod` with the directory `where` (default: the current one) importable, and
    return the callable `factory` named by `spec`."""
    if not is_user_spec(spec):
        raise LayerfastError(f"arch {spec!r}: expected 'package.module:factory'")
    mod_name, _, attr_path = (s.strip() for s in spec.partition(":"))
    cwd = os.getcwd() if where is None else where
    try:
        with importable(cwd):
            obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        raise LayerfastError(
            f"arch {spec!r}: cannot import module {mod_name!r} ({_describe(err)}); "
            f"the current directory {cwd} is on the import path"
        ) from None
    except BaseException as err:  # noqa: BLE001 - user code: anything it raises is bad input
        if isinstance(err, KeyboardInterrupt):
            raise
        raise LayerfastError(
            f"arch {spec!r}: importing module {mod_name!r} failed: {_describe(err)}"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise LayerfastError(
                f"arch {spec!r}: {getattr(obj, '__name__', mod_name)!r} has no attribute {part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise LayerfastError(f"arch {spec!r}: {attr_path!r} is {type(obj).__name__}, not callable")
    return obj


def _accepted_kwargs(factory: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"num_classes", "in_shape"}
    return {
        p.name
        for p in params
        if p.name in ("num_classes", "in_shape")
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _named_kwargs(factory: Callable[..., Any]) -> set[str]:
    """The keyword names the factory's own signature lists (not its `**kwargs`)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _rejected_keyword(err: BaseException, kwargs: dict[str, Any]) -> str | None:
    """Which of `kwargs` a TypeError says was not expected ("got an unexpected keyword argument
    'in_shape'"), if any."""
    if not isinstance(err, TypeError):
        return None
    msg = str(err)
    return next((k for k in kwargs if f"unexpected keyword argument '{k}'" in msg), None)


def build_user_model(
    spec: str, factory: Callable[..., Any], num_classes: int, in_shape: tuple[int, int, int],
    where: str | None = None,
) -> nn.Module:
    """Call `factory` with the keywords it accepts, with the directory its module was imported
    from (`where`; None for a factory given as an object) importable during the call; check
    that it returned an nn.Module."""
    offered = {"num_classes": num_classes, "in_shape": tuple(in_shape)}
    kwargs = {k: v for k, v in offered.items() if k in _accepted_kwargs(factory)}
    named = _named_kwargs(factory)
    while True:
        try:
            with importable(where):
                model = factory(**kwargs)
            break
        except BaseException as err:  # noqa: BLE001 - user code: anything it raises is bad input
            if isinstance(err, KeyboardInterrupt):
                raise
            # A `**kwargs` factory that hands them on to a class which does not take one of ours
            # (torchvision.models:resnet18 passes `in_shape` to ResNet.__init__): call it again
            # without that keyword. Only for keywords its own signature does not name.
            extra = _rejected_keyword(err, kwargs)
            if extra is None or extra in named:
                raise LayerfastError(f"arch {spec!r}: the factory raised {_describe(err)}") from err
            del kwargs[extra]
    if not isinstance(model, nn.Module):
        raise LayerfastError(
            f"arch {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return uncompiled(model)


def uncompiled(model: nn.Module) -> nn.Module:
    """`model` with every `torch.compile` wrapper (`OptimizedModule`) replaced by the module it
    wraps, at the root and among the submodules.

    A factory returning `torch.compile(net)` gave units named `_orig_mod.fc`, an fx trace that
    failed (normalization layers paired by the fallback rule), and a refusal of every
    checkpoint, whose keys the loader normalises without `_orig_mod.`. The wrapper adds
    nothing here: layerfast runs its own forward passes, and the wrapped module holds the very
    parameters the compiled one would use."""
    # torch._dynamo is imported only by torch.compile: without it there is no wrapper to find
    wrapper = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if wrapper is None:
        return model
    while isinstance(model, wrapper):
        model = model._orig_mod
    for m in model.modules():  # a replaced child's own children are visited after it
        for name, child in m._modules.items():
            while isinstance(child, wrapper):
                child = m._modules[name] = child._orig_mod
    return model
