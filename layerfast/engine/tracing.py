"""Tracing a model with torch.fx without losing what the engine's program needs, and without
leaving a mark on the model.

- `x += y` and `x[i] = v` are recorded as the in-place calls they are (`_AugProxy`), so that
  an alias of x sees the update, as in eager mode;
- buffers read in forward are Proxies (`_Tracer`), so a branch on a buffer's value does not
  trace instead of being frozen into the program;
- the model's plain attributes come back as they were (`attributes_kept`): a trace leaves fx
  constants and Proxies in caches, and a run leaves the last variant's derived tensors;
- code the trace cannot see (forward hooks, functions the user `torch.fx.wrap`ped) is named
  here (`hooked`, `global_hooks`, `opaque_function`) for the program to treat as opaque;
- a forward that sets `torch.autocast` itself for part of it keeps its trace: fx records the
  ops, not the `with` around them, so each op's autocast state is recorded beside it
  (`node.meta["autocast"]`) and the program replays it (`trace_for_pass`, below).

Autocast regions, relative to the pass. A program runs in two autocast states: the pass's own
(bf16: on, bfloat16; fp32 and tf32: off) and off (the first-batch check, in fp32). A `with
torch.autocast(...)` sets an absolute state for the ops inside it; an op outside every region
inherits whatever state is in force when it runs. So the program is traced in both states (one
trace where the pass's state is off), and each op is classed by what it was in the two:
- the ambient state in each (off in the off trace, the pass's in the pass's): it inherits, and
  runs as it is (no context; a model without regions pays nothing else);
- one and the same state in both: a region, an absolute state recorded on the program's step
  (`Step.autocast`); it runs under that state wherever that differs from the one in force
  (`Program.regions_here`: `enabled=False` around a float32 head is a context under a bf16
  pass and none in the fp32 check, a bf16 region of the model's own the other way round);
- anything else (a region whose state follows the pass's, `enabled=not
  torch.is_autocast_enabled()`) cannot be pinned down from two states: NotTraced, untraced and
  exact, as is a forward that takes another path under the pass's autocast (`if
  torch.is_autocast_enabled(...)`: the two traces differ), or that leaves the state switched.
Only the pass's device type is followed: autocast for another device type touches only ops on
that device's tensors, which the pass does not have unless the forward moves some there itself
(CPU tensors under its own `torch.autocast("cpu")` in a CUDA pass: not replayed, docs/engine.md).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn

# ---- what the tracer must not lose: augmented assignment is in place -----------------------

_AUG_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "__iadd__": operator.iadd,
    "__isub__": operator.isub,
    "__imul__": operator.imul,
    "__itruediv__": operator.itruediv,
    "__ifloordiv__": operator.ifloordiv,
    "__imod__": operator.imod,
    "__ipow__": operator.ipow,
    "__imatmul__": operator.imatmul,
    "__iand__": operator.iand,
    "__ior__": operator.ior,
    "__ixor__": operator.ixor,
    "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


class _AugProxy(fx.Proxy):
    """A Proxy on which `x += y` records `operator.iadd(x, y)`. Plain fx.Proxy has no in-place
    dunders, so Python falls back to `x = x + y`: a new value, while eager mode writes into x's
    tensor, which every alias of x (`z = x`) sees. `x[i] = v` is recorded too."""


def _aug(fn: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def impl(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    return impl


for _name, _fn in _AUG_OPS.items():
    setattr(_AugProxy, _name, _aug(_fn))


def _setitem(self: fx.Proxy, key: Any, value: Any) -> None:
    """`x[idx] = v` (plain fx cannot trace it): recorded as the in-place `operator.setitem`."""
    self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


_AugProxy.__setitem__ = _setitem  # type: ignore[method-assign]


class _Tracer(fx.Tracer):
    """Buffers read in forward are Proxies, as parameters are: fx's default hands the Python
    code the buffer's value at trace time, and a branch on it (`if self.initialized.item()`,
    ActNorm's flag) is frozen into the program, where a variant that changes the buffer
    would take the other branch. As a Proxy the branch cannot trace, and the model runs
    untraced (exact)."""

    def __init__(self, autocast: str | None = None) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True
        #: the device type whose autocast state is recorded on each node (None: not followed)
        self._autocast = autocast

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's trace; NotTraced where the forward returns with the followed device's
        autocast state switched (set without a `with`): no program step replays that."""
        if self._autocast is None:
            return super().trace(root, concrete_args)
        before = autocast_state(self._autocast)
        graph = super().trace(root, concrete_args)
        if autocast_state(self._autocast) != before:
            raise NotTraced(f"its forward leaves torch.autocast for {self._autocast} switched "
                            "after it returns, which a traced program would not replay")
        return graph

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any,
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        """fx's node, with the autocast state the forward had set when it was recorded
        (`node.meta["autocast"]`, where followed): fx records the ops, not a `with
        torch.autocast(...)` around them."""
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self._autocast is not None:
            node.meta["autocast"] = autocast_state(self._autocast)
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """A `torch.jit.script`ed module is one step: fx cannot trace into its compiled
        forward (called with a Proxy, it raises, and the whole model ran untraced). What the
        step reads and writes past its own parameters the first batch shows
        (`Program.unseen_effects`); the rest of the model traces and shares its prefixes."""
        return isinstance(m, torch.jit.ScriptModule) or super().is_leaf_module(
            m, module_qualified_name)


class NotTraced(Exception):
    pass


#: An autocast state for one device type: (enabled, dtype when enabled).
AutocastState = tuple[bool, torch.dtype | None]


def autocast_state(device_type: str) -> AutocastState:
    """Whether autocast is on for `device_type` here, and its dtype when it is."""
    on = torch.is_autocast_enabled(device_type)
    return on, torch.get_autocast_dtype(device_type) if on else None


def autocast_as(device_type: str, state: AutocastState) -> torch.autocast:
    """The `with` that sets `state` for `device_type`, as the forward's own region did."""
    on, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=on)


def trace(model: nn.Module, autocast: str | None = None) -> tuple[fx.Graph, dict[str, Any]]:
    """`torch.fx.symbolic_trace`'s graph, with augmented assignments recorded in place, and the
    constants the graph reads by name (`get_attr`) that are not the model's own.

    fx stores a tensor the forward uses but the model does not hold (a module-level constant)
    as a new attribute of the model (`_tensor_constant0`); those are taken off the user's model
    again and returned, so tracing leaves it as it was.

    `autocast`: a device type whose autocast state is recorded on every node
    (`node.meta["autocast"]`): a forward that sets it for some of its ops (`with
    torch.autocast("cpu", enabled=False)` around a head it keeps in float32) runs them so, and
    the graph alone would not say it (`trace_for_pass` makes regions of it)."""
    return trace_with(_Tracer(autocast), model)


#: The constants a trace computed for real that come out otherwise under the pass's autocast
#: (`trace_for_pass`): that state, and those constants' values in it.
PassConstants = tuple[AutocastState, dict[str, Any]]


def trace_for_pass(model: nn.Module, precision: str,
                   device: torch.device) -> tuple[fx.Graph, dict[str, Any], PassConstants]:
    """`trace`'s graph for a pass at `precision` on `device`, recorded with autocast off, the
    state the first-batch check runs the program in (`verify.trace_differs`, fp32), each node
    whose ops run in an autocast region of the forward's own marked with that region's state
    (`node.meta["autocast_region"]`, the module docstring's rule); NotTraced where a region's
    state cannot be pinned down, or the forward takes another path under the pass's autocast
    than with it off.

    A trace runs for real the ops of the forward that read only constants (a fixed matrix it
    builds each call, `q @ q.T`): recorded under a bf16 pass's autocast, that product became
    a bfloat16 constant of the graph, the fp32 check failed on it ("expected m1 and m2 to have
    the same dtype") and the pass ran untraced, without its prefix sharing. So where the pass
    turns autocast on, a second trace under it shows each op's state there, and a path that
    depends on autocast (`if torch.is_autocast_enabled("cpu"): ...`), which the program
    recorded with autocast off would not take in the pass and the fp32 check cannot see.
    Such a constant computed outside every region is the pass's own where the pass runs
    (bfloat16 under bf16, as in the eager forward; the float32 one read there instead was off
    by bf16's rounding): the third item holds the pass's state and the constants that trace
    computed otherwise, which `Program.fetch` reads while that state is in force. A
    `get_attr` is never a region's step (it reads, it runs no op that autocast casts): it
    reads the constant of the state in force outside the regions, the one its value was
    computed in when no region was around it."""
    from layerfast.engine.precision import precision_context

    kind = device.type
    with precision_context(precision, device):
        ambient = autocast_state(kind)
        under, under_constants = trace(model, kind) if ambient[0] else (None, {})
    with precision_context("fp32", device):
        off = autocast_state(kind)
        graph, constants = trace(model, kind)
    if under is not None and _steps(under) != _steps(graph):
        raise NotTraced(f"its forward takes another path under {kind} autocast than without "
                        "it, which the program the first-batch check runs (fp32) would not")
    pairs = zip(graph.nodes, under.nodes if under is not None else graph.nodes, strict=True)
    for n, u in pairs:
        if n.op in ("placeholder", "get_attr", "output"):
            continue  # no op autocast casts: it runs in the state in force
        s0, su = n.meta["autocast"], (u.meta["autocast"] if under is not None else ambient)
        if s0 == off and su == ambient:
            continue  # inherits the state in force
        if under is not None and s0 != su:
            raise NotTraced(f"its forward sets torch.autocast for {kind} at its op {n.name!r} "
                            f"to a state that follows the pass's ({_name(s0)} with autocast "
                            f"off, {_name(su)} under the pass's), which a traced program "
                            "cannot pin down")
        n.meta["autocast_region"] = s0
    differ = {k: v for k, v in under_constants.items()
              if k in constants and not _same_tensor(v, constants[k])}
    return graph, constants, (ambient, differ)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values (a NaN equal to a NaN where it is in both)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b) or (
        a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


def _name(state: AutocastState) -> str:
    on, dtype = state
    return str(dtype).removeprefix("torch.") if on else "off"


def _steps(graph: fx.Graph) -> list[str]:
    """A graph's nodes as text: equal for two traces that took the same path (constants are
    named, not shown: their values may differ under autocast, their use may not; an object
    the forward makes afresh on each call is shown without its address)."""
    return [re.sub(r" at 0x[0-9a-fA-F]+", "", f"{n.op} {n.target} {n.args} {n.kwargs}")
            for n in graph.nodes]


def trace_with(tracer: fx.Tracer, model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """`tracer.trace(model)`, and the tensors it stored on the model as new attributes, taken
    off it again; attributes the forward set while tracing (a cache it fills on first use
    holds a Proxy then) are put back as they were."""
    before = set(vars(model))
    with attributes_kept(list(model.modules())), _state_kept(model):
        graph = tracer.trace(model)
        added = {k: v for k, v in vars(model).items()
                 if k not in before and isinstance(v, torch.Tensor)}
    return graph, added


@contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Every module's parameters and buffers come back as the same objects after a trace.

    A forward that re-assigns a buffer (`self.calls += 1`: an in-place add, then `setattr`)
    stores the tracer's Proxy in `_buffers` while tracing; left there, the eager forward that
    checks the program (and every untraced run) read a Proxy and returned one instead of
    logits. `attributes_kept` does not see it: `_buffers` is a module slot, not an attribute.

    A `torch.jit.script`ed module is left out: its `_parameters` and `_buffers` are views of
    the compiled module (no `update`, no deletion), and nothing a trace does can store a Proxy
    there (the compiled module refuses what is not a tensor of the declared type)."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()
             if not isinstance(m, torch.jit.ScriptModule)]
    try:
        yield
    finally:
        for m, params, buffers in saved:
            for store, before in ((m._parameters, params), (m._buffers, buffers)):
                for k in [k for k, v in store.items() if k not in before and _tensorish(v)]:
                    del store[k]  # registered while tracing: a Proxy, or built from one
                store.update((k, v) for k, v in before.items() if store.get(k) is not v)


def _tensorish(v: Any) -> bool:
    """A tensor or fx Proxy, or a dict/list/tuple holding one (as a key or a value)."""
    if isinstance(v, torch.Tensor | fx.Proxy):
        return True
    if isinstance(v, dict):
        return any(_tensorish(k) or _tensorish(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return any(_tensorish(x) for x in v)
    return False


def _contents(v: Any) -> list[tuple[Any, Any]]:
    """A dict's or list's items (pairs), to compare by identity and put back into the same
    object (`==` on tensors is elementwise)."""
    return list(v.items()) if isinstance(v, dict) else list(enumerate(v))


def _same(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]]) -> bool:
    if len(a) != len(b):
        return False
    for (k1, v1), (k2, v2) in zip(a, b, strict=True):
        if v1 is not v2:
            return False
        if k1 is not k2 and (_tensorish(k1) or _tensorish(k2) or k1 != k2):
            return False
    return True


def _refill(v: Any, items: list[tuple[Any, Any]] | None) -> None:
    """Put a dict's or list's own items (`_contents`) back into it, in place."""
    if items is None or not isinstance(v, dict | list):
        return
    v.clear()
    if isinstance(v, dict):
        v.update(items)
    else:
        v.extend(x for _, x in items)


#: What every nn.Module holds in its __dict__ (its parameters, buffers, hooks, ...): not the
#: user's attributes, and changed legitimately (a buffer registered in forward).
_MODULE_SLOTS = frozenset(vars(nn.Module()))


@contextmanager
def attributes_kept(modules: list[nn.Module]) -> Iterator[None]:
    """Every plain attribute of these modules (not a parameter or buffer) that is or becomes a
    tensor, or a dict/list/tuple holding one, comes back as it was: the same object, `None`
    if it was `None`, gone if it was not there, and a dict or list with its own items again.
    Hooks and forwards set such attributes while variants run (pruning recomputes `weight`
    from the swapped-in `weight_orig`; a cache filled on first use, keyed by shape; a stored
    activation) and a trace sets them to Proxies (which `torch.save` cannot pickle); the
    model must come back holding its own."""
    saved = [(m, dict(vars(m)), {k: _contents(v) for k, v in vars(m).items()
                                 if isinstance(v, dict | list) and k not in _MODULE_SLOTS})
             for m in modules]
    try:
        yield
    finally:
        for m, before, items in saved:
            now = vars(m)
            for k, v in list(now.items()):
                if k not in before:
                    if _tensorish(v):
                        delattr(m, k)
                elif v is not before[k]:
                    if _tensorish(v) or _tensorish(before[k]):
                        object.__setattr__(m, k, before[k])
                elif k in items and not _same(_contents(v), items[k]) and (
                        _tensorish(v) or any(_tensorish(x) for kv in items[k] for x in kv)):
                    _refill(v, items[k])
            for k, v in before.items():
                if k not in now and _tensorish(v):
                    object.__setattr__(m, k, v)


def hooked(m: nn.Module) -> bool:
    """Forward hooks or pre-hooks on `m` itself: code the trace does not see, run at its call."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def global_hooks() -> bool:
    """Forward hooks or pre-hooks registered for every module (`register_module_forward_hook`)."""
    return bool(nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


# Packages whose functions an fx trace records as calls and which are taken as functions of
# their arguments alone. Any other recorded function is one the user wrapped (`torch.fx.wrap`):
# the trace does not see its body, which may read any state or write into its arguments.
_KNOWN_PACKAGES = frozenset({"torch", "torchvision", "_operator", "operator", "builtins", "math"})


def opaque_function(fn: Any) -> bool:
    mod = getattr(fn, "__module__", None)
    return not (isinstance(mod, str) and mod.split(".")[0] in _KNOWN_PACKAGES)
