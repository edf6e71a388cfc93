"""The model as a straight list of nodes, and the points where it may be cut.

Prefix sharing (DESIGN.md §7.2) needs places in the forward pass where one tensor carries all
state: run the baseline once, keep that tensor, and start every variant whose first changed
parameter lies after it from there. We get the node list from `torch.fx.symbolic_trace`; a cut
after node i is *proven* safe when exactly one value computed at or before i is used after i
(parameter reads, `get_attr`, are re-read wherever used and never count). Models fx cannot trace
fall back to the children of an `nn.Sequential`, and otherwise to one opaque step: every variant
then runs a full forward, which is slower but still correct.

Execution walks the nodes with a small interpreter (`Program.run`). It calls the very same
modules and functions with the same arguments as the model's own forward, so a suffix started
from a cached activation is bit-identical to the full forward in fp32.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn


@dataclass
class Step:
    """One node of the program: `fn(*args, **kwargs)` where args may name earlier steps."""

    index: int
    op: str  # "input" | "call_module" | "call_function" | "call_method" | "get_attr" | "output"
    target: Any
    args: tuple
    kwargs: dict
    keys: frozenset[str] = frozenset()  # state-dict keys this step reads
    users: list[int] = field(default_factory=list)


class Ref:
    """A reference to the value of an earlier step inside a step's args."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _map_refs(obj: Any, fn: Callable[[Ref], Any]) -> Any:
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_refs(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_refs(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_refs(v, fn) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_map_refs(obj.start, fn), _map_refs(obj.stop, fn), _map_refs(obj.step, fn))
    return obj


def refs_in(obj: Any) -> list[int]:
    found: list[int] = []
    _map_refs(obj, lambda r: found.append(r.index))
    return found


def _state_keys(model: nn.Module) -> dict[str, list[str]]:
    """module name -> state keys owned by it (recursively), for params and buffers."""
    by_module: dict[str, list[str]] = {}
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for mod_name, _ in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        by_module[mod_name] = [n for n in names if n.startswith(prefix)]
    return by_module


_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


class Program:
    """A model flattened into steps, with its provably safe cut points.

    `cuts` holds step indices c such that the value of step `carrier[c]` is the only state
    flowing from steps <= c to steps > c. Index 0 (the input) is always a cut.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.traced = False
        self.steps: list[Step] = []
        self.modules = dict(model.named_modules())
        owned = _state_keys(model)
        try:
            gm = fx.symbolic_trace(model)
            self._from_fx(gm, owned)
            self.traced = True
        except Exception as exc:  # noqa: BLE001 - any trace failure means "no graph"
            self.trace_error = f"{type(exc).__name__}: {exc}"
            self._from_children(model, owned)
        self._link()
        self.cuts, self.carrier = self._find_cuts()
        self.has_inplace = any(self.is_inplace(s) for s in self.steps)

    # ---- construction -----------------------------------------------------------------
    def _from_fx(self, gm: fx.GraphModule, owned: dict[str, list[str]]) -> None:
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("layerfast evaluates models with exactly one input")
        index = {n: i for i, n in enumerate(nodes)}
        param_keys = set(dict(self.model.named_parameters())) | set(dict(self.model.named_buffers()))

        def conv(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: Ref(index[n]))

        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                self.steps.append(Step(i, "input", None, (), {}))
                continue
            keys: frozenset[str] = frozenset()
            if n.op == "call_module":
                keys = frozenset(owned.get(n.target, ()))
            elif n.op == "get_attr" and n.target in param_keys:
                keys = frozenset([n.target])
            args = conv(n.args)
            kwargs = conv(n.kwargs)
            self.steps.append(Step(i, n.op, n.target, tuple(args), dict(kwargs), keys))

    def _from_children(self, model: nn.Module, owned: dict[str, list[str]]) -> None:
        self.steps.append(Step(0, "input", None, (), {}))
        if isinstance(model, nn.Sequential):
            for name, _ in model.named_children():
                i = len(self.steps)
                self.steps.append(Step(i, "call_module", name, (Ref(i - 1),), {},
                                       frozenset(owned.get(name, ()))))
        else:
            self.steps.append(Step(1, "call_module", "", (Ref(0),), {}, frozenset(owned[""])))
        self.steps.append(Step(len(self.steps), "output", "output", (Ref(len(self.steps) - 1),), {}))

    def _link(self) -> None:
        for s in self.steps:
            for r in set(refs_in(s.args) + refs_in(s.kwargs)):
                self.steps[r].users.append(s.index)
        self.first_use: dict[str, int] = {}
        for s in self.steps:
            for k in s.keys:
                self.first_use.setdefault(k, s.index)

    def _find_cuts(self) -> tuple[list[int], dict[int, int]]:
        """Sweep once, tracking values still needed later; a cut is where exactly one is."""
        last_use = {s.index: max(s.users) if s.users else -1 for s in self.steps}
        live: set[int] = set()
        cuts: list[int] = []
        carrier: dict[int, int] = {}
        for s in self.steps[:-1]:
            if s.op != "get_attr" and last_use[s.index] > s.index:
                live.add(s.index)
            live = {j for j in live if last_use[j] > s.index}
            if len(live) == 1:
                (only,) = live
                cuts.append(s.index)
                carrier[s.index] = only
        return cuts, carrier

    def is_inplace(self, s: Step) -> bool:
        if s.op == "call_method":
            return isinstance(s.target, str) and s.target.endswith("_") and not s.target.startswith("_")
        if s.op == "call_function":
            return s.target in _INPLACE_FUNCS or bool(s.kwargs.get("inplace", False))
        return False

    # ---- queries ---------------------------------------------------------------------
    def start_cut(self, keys: set[str] | frozenset[str]) -> int | None:
        """The latest cut before the first step that reads any of `keys`; None if no step
        reads them (the variant's output equals the baseline's)."""
        first = min((self.first_use[k] for k in keys if k in self.first_use), default=None)
        if first is None:
            return None
        best = 0
        for c in self.cuts:
            if c < first:
                best = c
            else:
                break
        return best

    # ---- execution -------------------------------------------------------------------
    def fetch(self, target: str) -> Any:
        obj: Any = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def eval_step(self, s: Step, env: Mapping[int, Any]) -> Any:
        args = _map_refs(s.args, lambda r: env[r.index])
        kwargs = _map_refs(s.kwargs, lambda r: env[r.index])
        if s.op == "call_module":
            return self.modules[s.target](*args, **kwargs)
        if s.op == "call_function":
            return s.target(*args, **kwargs)
        if s.op == "call_method":
            return getattr(args[0], s.target)(*args[1:], **kwargs)
        if s.op == "get_attr":
            return self.fetch(s.target)
        raise RuntimeError(f"unexpected step {s.op}")

    def run(self, x: torch.Tensor, start: int = 0, keep: set[int] | None = None,
            saved: dict[int, torch.Tensor] | None = None,
            after_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run from cut `start` (whose carrier value is `x`) to the output.

        With `keep`, the carrier values at those cuts are stored into `saved` (cloned when the
        graph mutates values in place, so the cache is never corrupted by later steps).
        `after_step(i)` is called once step i has run (the FLOP counter uses it)."""
        env: dict[int, Any] = {self.carrier[start] if start else 0: x}
        for s in self.steps[: start + 1]:
            if s.op == "get_attr":  # parameter reads are not state: re-read them
                env[s.index] = self.fetch(s.target)
        frees = self.frees
        for s in self.steps[start + 1:]:
            if s.op == "output":
                return _map_refs(s.args, lambda r: env[r.index])[0]
            env[s.index] = self.eval_step(s, env)
            if after_step is not None:
                after_step(s.index)
            if keep is not None and s.index in keep and saved is not None:
                v = env[self.carrier[s.index]]
                saved[s.index] = v.clone() if self.has_inplace else v
            for r in frees[s.index]:
                env.pop(r, None)
        raise RuntimeError("program has no output")

    @property
    def frees(self) -> dict[int, list[int]]:
        """step index -> values whose last use is that step (dropped right after it)."""
        if not hasattr(self, "_frees"):
            frees: dict[int, list[int]] = {s.index: [] for s in self.steps}
            for s in self.steps:
                if s.users:
                    frees[max(s.users)].append(s.index)
            self._frees = frees
        return self._frees


@contextmanager
def no_inplace_modules(model: nn.Module) -> Iterator[None]:
    """Turn off `inplace=True` on modules (ReLU and friends) for the duration: an in-place
    activation right after a cut would overwrite the cached activation. Values are identical."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True
