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
from a cached activation is bit-identical to the full forward in fp32. Two things plain fx
tracing or evaluation would lose are kept, so that this holds with aliases too:
- `x += y` is recorded as the in-place `operator.iadd` (fx's Proxy has no `__iadd__`, so plain
  fx records an out-of-place add, and a name aliasing x — `z = x` — would miss the update);
- an `inplace=True` module whose input is read again afterwards (or may alias a value that is)
  runs in place even while `no_inplace_modules` has switched its flag off.

Tied state (one Parameter or buffer held by two modules, `b.weight = a.weight`) is known by its
canonical key, the name `named_parameters()` / `named_buffers()` give it (their de-duplication
keeps the first); every module holding it reads that key, and `Program.canonical_key` maps the
state dict's other names for it (`b.weight`) to that key.

A forward's own `with torch.autocast(...)` regions are kept on their steps (`Step.autocast`) and
replayed where their state differs from the one in force (`Program.regions_here`; the rule is in
`engine/tracing.py`'s docstring).

The tracer is in `engine/tracing.py`; what each recorded call does (writes in place, returns a
new tensor, returns several) is tabled in `engine/optables.py`.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from layerfast.checkpoints.keymap import canonical_keys
from layerfast.engine.optables import (
    _FRESH_FUNCS,
    _FRESH_METHODS,
    _FRESH_MODULES,
    _INPLACE_FUNCS,
    _TUPLE_FUNCS,
    _TUPLE_METHODS,
    inplace_arg,
    inplace_name,
    writes_by_schema,
)
from layerfast.engine.tracing import (
    AutocastState,
    NotTraced,
    PassConstants,
    attributes_kept,
    autocast_as,
    autocast_state,
    global_hooks,
    hooked,
    opaque_function,
    trace,
    trace_for_pass,
    trace_with,
)

__all__ = ["Program", "Ref", "Step", "attributes_kept", "canonical_keys", "eager_inplace",
           "no_inplace_modules", "refs_in", "trace", "trace_with"]


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
    #: the autocast state of the forward's own region around this step (None: outside every
    #: region, it inherits the state in force); `Program.regions_here` replays it
    autocast: AutocastState | None = None


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


def _state_keys(model: nn.Module, canon: dict[str, str]) -> dict[str, list[str]]:
    """module name -> canonical state keys held by it (recursively), params and buffers. A tied
    tensor counts for EVERY module holding it (de-duplicated names would credit only the first,
    and a variant could then start after a module that already read the shared weight)."""
    by_module: dict[str, set[str]] = {
        n: set() for n, _ in model.named_modules(remove_duplicate=False)
    }
    for name, key in canon.items():
        parts = name.split(".")
        for depth in range(len(parts)):
            mod = ".".join(parts[:depth])
            if mod in by_module:
                by_module[mod].add(key)
    return {m: sorted(ks) for m, ks in by_module.items()}


_trace = trace  # `Program.__init__` has an argument of that name

#: `Program.regions_here` of a program without autocast regions (never written to).
_NO_REGIONS: Mapping[int, AutocastState] = {}


# Modules `no_inplace_modules` has switched to out-of-place right now: Program must know that
# their `inplace` flag is False only for the duration.
_FLIPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Program:
    """A model flattened into steps, with its provably safe cut points.

    `cuts` holds step indices c such that the value of step `carrier[c]` is the only state
    flowing from steps <= c to steps > c, and is one tensor. Index 0 (the input) is always a cut.
    """

    #: Steps made opaque after the trace (`make_opaque`: the first-batch effects check found
    #: them reading or writing tensors past the program's bookkeeping), for messages.
    found_opaque: frozenset[int] = frozenset()

    def __init__(self, model: nn.Module, trace: bool = True,
                 precision: tuple[str, torch.device] | None = None) -> None:
        """`trace=False`: do not trace (the children of a plain nn.Sequential, else one
        opaque step), for a model whose traced program is not its forward (`Evaluator` checks).
        `precision`: the pass's (precision, device): the autocast regions of the forward
        (`with torch.autocast(...)` around some of its ops) are recorded on their steps and
        replayed (`regions_here`; `trace_for_pass` says which it refuses). Without it they
        are not followed: every step runs in the state in force."""
        self.model = model
        self.traced = False
        self.trace_error: str | None = None
        self.steps: list[Step] = []
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.canonical = canonical_keys(model)
        self.aliases: dict[str, list[str]] = {}  # canonical key -> all its state-dict names
        for name, key in self.canonical.items():
            self.aliases.setdefault(key, []).append(name)
        self.constants: dict[str, Any] = {}  # what the trace reads that the model does not hold
        #: the device type whose autocast regions the steps carry (None: not followed), and
        #: per state in force, the steps to run under their own (`regions_here`)
        self.autocast_kind: str | None = None if precision is None else precision[1].type
        self._regions: dict[AutocastState, dict[int, AutocastState]] = {}
        #: the constants computed otherwise under the pass's autocast, and that state (`fetch`)
        self._pass_constants: PassConstants = ((False, None), {})
        owned = _state_keys(model, self.canonical)
        # Hooks on the model itself, or on every module, run only when the model is called:
        # a program of its parts would skip them, so it is one opaque step.
        whole = hooked(model) or global_hooks()
        try:
            if not trace or whole:
                raise NotTraced("not traced" if not whole else
                                 "the model has forward hooks of its own, or global ones")
            if precision is None:
                graph, self.constants = _trace(model)
            else:
                graph, self.constants, self._pass_constants = trace_for_pass(model,
                                                                             *precision)
            self._from_fx(graph, owned)
            self._check_hooks_run()
            self._mark_opaque()
            self._check_constant_writes()
            self.traced = True
        except Exception as exc:  # noqa: BLE001 - any trace failure means "no graph"
            self.trace_error = (
                str(exc) if isinstance(exc, NotTraced) else f"{type(exc).__name__}: {exc}"
            )
            self.steps = []
            self.constants = {}
            self._pass_constants = ((False, None), {})
            self._from_children(model, owned, whole)
        self._mark_opaque()
        self._link()
        self._any_region = self.autocast_kind is not None and any(
            s.autocast is not None for s in self.steps)
        self.cuts, self.carrier = self._find_cuts()
        self._settle_writes()
        # Untraced, a step's module runs its own forward: the in-place modules inside it run in
        # place as in eager mode (`x = act(h); h + x` reads the write), `no_inplace_modules`
        # notwithstanding; they cannot overwrite a cached cut, which only steps see.
        self._inner_flipped: dict[int, list[nn.Module]] = {}
        if not self.traced:
            for s in self.steps:
                if s.op == "call_module":
                    m = self.modules[s.target]
                    inner = [c for c in m.modules() if c is not m and c in _FLIPPED]
                    if inner:
                        self._inner_flipped[s.index] = inner

    def _settle_writes(self) -> None:
        """Which steps write in place, and whether cached carriers need a private copy."""
        self._inplace = None
        self._settle_inplace(set(self.carrier.values()) | {0})
        self._inplace = frozenset(s.index for s in self.steps if self._writes_in_place(s))
        # Cached carriers need a private copy when some step may write into one (or into a
        # value that may alias one): a write into a fresh value only its writer reads is unseen.
        # Untraced, a step is a whole forward whose writes nobody can see from here.
        self.has_inplace = not self.traced or any(
            self.is_inplace(s) and not self._harmless(s) for s in self.steps
        )

    def unseen_reads(self, x: torch.Tensor) -> set[int] | None:
        """The steps found, run on `x`, to read a parameter or buffer the program does not
        credit them with (`unseen_effects`' first set); None when the run fails."""
        found = self.unseen_effects(x)
        return None if found is None else found[0]

    def unseen_effects(self, x: torch.Tensor) -> tuple[set[int], set[int]] | None:
        """(reads, writes): the steps found, run on `x`, to read or write tensors past the
        program's bookkeeping (`engine.effects.unseen_effects`, where the why is)."""
        from layerfast.engine.effects import unseen_effects

        return unseen_effects(self, x)

    def make_opaque(self, steps: set[int]) -> None:
        """Treat these steps as code the program cannot see (`_mark_opaque`): each reads every
        key, so a variant starts before it, and may write into its arguments."""
        steps = set(steps) - self._opaque
        if not steps:
            return
        self._opaque = self._opaque | frozenset(steps)
        self.found_opaque = self.found_opaque | frozenset(steps)
        every = frozenset(self.canonical.values())
        for i in steps:
            self.steps[i].keys = every
        self._first_uses()
        self._settle_writes()

    def canonical_key(self, key: str) -> str:
        """The canonical key for any state-dict name (`b.weight` of a weight tied to
        `a.weight` -> `a.weight`); an unknown name comes back unchanged."""
        return self.canonical.get(key, key)

    def tied(self, key: str) -> bool:
        """Whether the tensor behind `key` is held under more than one name."""
        return len(self.aliases.get(self.canonical_key(key), ())) > 1

    # ---- construction -----------------------------------------------------------------
    def _from_fx(self, graph: fx.Graph, owned: dict[str, list[str]]) -> None:
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("layerfast evaluates models with exactly one input")
        index = {n: i for i, n in enumerate(nodes)}

        def conv(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: Ref(index[n]))

        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                self.steps.append(Step(i, "input", None, (), {}))
                continue
            keys: frozenset[str] = frozenset()
            if n.op == "call_module":
                keys = frozenset(owned.get(n.target, ()))
            elif n.op == "get_attr" and n.target in self.canonical:
                keys = frozenset([self.canonical[n.target]])
            elif n.op == "get_attr" and n.target in self.modules:  # a module passed to a function
                keys = frozenset(owned.get(n.target, ()))
            args = conv(n.args)
            kwargs = conv(n.kwargs)
            self.steps.append(Step(i, n.op, n.target, tuple(args), dict(kwargs), keys,
                                   autocast=n.meta.get("autocast_region")))

    def _check_hooks_run(self) -> None:
        """fx traces through every module it does not keep as a call (`nn.Sequential`, user
        modules): hooks on one of those would never run in the program, which then is not
        the forward (a hook that changes nothing on the first batch would pass the check)."""
        called = {id(m) for s in self.steps if s.op == "call_module"
                  for m in self.modules[s.target].modules()}
        for name, m in self.modules.items():
            if hooked(m) and id(m) not in called:
                raise NotTraced(f"module {name!r} has forward hooks, which a traced program "
                                 "would not run")

    def _check_constant_writes(self) -> None:
        """NotTraced where a step may write into a tensor the trace computed for real (one of
        `constants`) or into a view of one (`m = q @ q.T; m += h.mean()`): the forward builds
        it afresh on every call, the program holds one tensor, and each run started from the
        writes of the runs before it (logits off by all they added, which the first-batch
        check, on the first run, could not see)."""
        near = {s.index for s in self.steps if s.op == "get_attr" and s.target in self.constants}
        if not near:
            return
        # fx reads a constant through a get_attr of its own at each use: one write-only use
        uses = [self.steps[i].target for i in near]
        for s in self.steps:
            if not any(r in near for r in refs_in(s.args) + refs_in(s.kwargs)):
                continue
            if self._writes_in_place(s) or (
                    s.op == "call_module" and _has_inplace_flag(self.modules[s.target])):
                v = self.mutated(s)
                # `out=` into a constant nothing else reads (`torch.mul(x, 2, out=torch.empty(0))`)
                # is overwritten whole before anything reads it, in every run: no history
                if (isinstance(v, Ref) and v is s.kwargs.get("out")
                        and uses.count(self.steps[v.index].target) == 1):
                    continue
                if v is None or (isinstance(v, Ref) and v.index in near):
                    op = getattr(s.target, "__name__", s.target)
                    raise NotTraced(
                        f"its op {op!r} may write into a tensor the forward builds "
                        "afresh on each call (a constant of the trace), which a traced program "
                        "holds once: each run would start from the last one's writes")
            if not self._new_value(s):
                near.add(s.index)  # it may be (a view of) the constant

    def _new_value(self, s: Step) -> bool:
        """Step s returns a new tensor, never one of its arguments or a view of one."""
        if s.op == "call_module":
            m = self.modules[s.target]
            return isinstance(m, _FRESH_MODULES) and not getattr(m, "return_indices", False)
        return (s.op == "call_function" and s.target in _FRESH_FUNCS) or (
            s.op == "call_method" and s.target in _FRESH_METHODS)

    def _mark_opaque(self) -> None:
        """Steps whose code the program cannot see: a call of a module with hooks on it or
        inside it, or of a function the user wrapped. Such a step may read any parameter (a hook
        that gates its output by another module's weight) and write into its arguments (a
        pre-hook that scales its input in place), so it reads every key and is in place."""
        every = frozenset(self.canonical.values())
        self._opaque: frozenset[int] = frozenset(
            s.index for s in self.steps
            if (s.op == "call_module" and any(hooked(m) for m in self.modules[s.target].modules()))
            or (s.op == "call_function" and opaque_function(s.target))
        )
        for i in self._opaque:
            self.steps[i].keys = every

    def is_opaque(self, s: Step) -> bool:
        """Whether step s runs code the program cannot see (`_mark_opaque`)."""
        return s.index in getattr(self, "_opaque", ())

    def _from_children(self, model: nn.Module, owned: dict[str, list[str]],
                       whole: bool = False) -> None:
        self.steps.append(Step(0, "input", None, (), {}))
        # A subclass with a forward of its own is not its children in order.
        if (not whole and isinstance(model, nn.Sequential)
                and type(model).forward is nn.Sequential.forward):
            # `_modules`, not `named_children()`: that one skips a module registered twice
            # (Sequential(a, relu, a)), and the program would call it once.
            for name, child in model._modules.items():
                if child is None:
                    continue
                i = len(self.steps)
                self.steps.append(
                    Step(i, "call_module", name, (Ref(i - 1),), {}, frozenset(owned.get(name, ())))
                )
        else:
            self.steps.append(Step(1, "call_module", "", (Ref(0),), {}, frozenset(owned[""])))
        self.steps.append(
            Step(len(self.steps), "output", "output", (Ref(len(self.steps) - 1),), {})
        )

    def _link(self) -> None:
        for s in self.steps:
            for r in set(refs_in(s.args) + refs_in(s.kwargs)):
                self.steps[r].users.append(s.index)
        for s in self.steps:
            s.users.sort()
        self._first_uses()

    def _first_uses(self) -> None:
        self.first_use: dict[str, int] = {}
        for s in self.steps:
            for k in s.keys:
                self.first_use.setdefault(k, s.index)

    def _find_cuts(self) -> tuple[list[int], dict[int, int]]:
        """Sweep once, tracking values still needed later; a cut is where exactly one is, and
        it is a tensor (a tuple from `chunk`/`split` cannot be cached and sized like one)."""
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
                if self._tensor_valued(only):
                    cuts.append(s.index)
                    carrier[s.index] = only
        return cuts, carrier

    def _tensor_valued(self, i: int) -> bool:
        """False where step i's value may be a tuple or another non-tensor: a producer known to
        return several values, or a user that indexes it like a sequence (fx unpacks a tuple
        with `getitem(v, 0)`, `getitem(v, 1)`, ...) or passes it whole as cat/stack's list."""
        s = self.steps[i]
        if s.op == "input":
            return True
        if s.op == "call_function" and s.target in _TUPLE_FUNCS:
            return False
        if s.op == "call_method" and s.target in _TUPLE_METHODS:
            return False
        if s.op == "call_module":
            m = self.modules[s.target]
            if isinstance(m, nn.RNNBase | nn.MultiheadAttention) or getattr(
                m, "return_indices", False
            ):
                return False
        for u in self.steps[i].users:
            us = self.steps[u]
            first = us.args[0] if us.args else None
            if not (isinstance(first, Ref) and first.index == i):
                continue
            if (
                us.op == "call_function"
                and us.target is operator.getitem
                and not isinstance(us.args[1], tuple)
            ):
                return False  # v[0], v[1:]: a tuple's items (a tensor's would mix the batch)
            if us.op == "call_function" and us.target in (torch.cat, torch.concat, torch.stack):
                return False
        return True

    # ---- in-place analysis --------------------------------------------------------------
    def _settle_inplace(self, carriers: set[int]) -> None:
        """Decide, step by step, which values are fresh (a new tensor, or an alias only of
        values no other step reads) and which may alias a cut's carrier (the cached tensor).
        `keep_inplace`: steps of `inplace=True` modules that must run in place even while
        `no_inplace_modules` has their flag off, because their input is read again afterwards
        (or may alias a value that is): eager mode writes into it, and later readers see that."""
        self.keep_inplace: set[int] = set()
        self._fresh: set[int] = set()
        self._near_cache: set[int] = set(carriers)  # values that may alias a cached carrier
        for s in self.steps:
            if s.op == "call_module" and _has_inplace_flag(self.modules[s.target]):
                first = s.args[0] if s.args else None
                if not (isinstance(first, Ref) and self.private(first.index, s.index)):
                    self.keep_inplace.add(s.index)
            kind = self._freshness(s)
            if kind is not None:
                self._fresh.add(s.index)
            if kind == "alias" and any(
                r in self._near_cache for r in refs_in(s.args) + refs_in(s.kwargs)
            ):
                self._near_cache.add(s.index)

    def _freshness(self, s: Step) -> str | None:
        """ "new" (a new tensor), "alias" (may alias only values that step s alone reads), or
        None (may alias a value another step reads: the input, a parameter, a shared value)."""
        if self.is_inplace(s):
            # writing into a private value returns that value (`out += identity`)
            v = self.mutated(s)
            ok = (
                (s.op != "call_function" or s.target is not operator.setitem)
                and isinstance(v, Ref)
                and self.private(v.index, s.index)
            )
            return "alias" if ok else None
        if s.op == "call_module":
            m = self.modules[s.target]
            ok = isinstance(m, _FRESH_MODULES) and not getattr(m, "return_indices", False)
            return "new" if ok else None
        if (s.op == "call_function" and s.target in _FRESH_FUNCS) or (
            s.op == "call_method" and s.target in _FRESH_METHODS
        ):
            return "new"
        # Any other function of private values only (a view; `stochastic_depth` in eval,
        # which returns its input): whatever it returns aliases nothing another step reads.
        refs = refs_in(s.args) + refs_in(s.kwargs)
        if (
            s.op in ("call_function", "call_method")
            and refs
            and all(self.private(r, s.index) for r in refs)
        ):
            return "alias"
        return None

    def private(self, v: int, s: int) -> bool:
        """Value v is read by step s alone and aliases no value another step reads (it is not
        the input, a parameter, or a view of a shared value): a write into it at s changes
        nothing any other step sees."""
        return v in self._fresh and self.steps[v].users == [s]

    def mutated(self, s: Step) -> Any:
        """The argument an in-place step writes into (a Ref, or None when unknown: an opaque
        step may write into any of its arguments)."""
        if self.is_opaque(s):
            return None
        if s.kwargs.get("out") is not None:
            return s.kwargs["out"]
        if s.op == "call_function":
            written = writes_by_schema(s.target)
            if written is not None:  # a torch.ops operator: its schema says which one
                only = written[0] if len(written) == 1 else None
                return s.args[only] if only is not None and only < len(s.args) else None
        return s.args[0] if s.args else None

    def _harmless(self, s: Step) -> bool:
        """An in-place step that writes into a private value that cannot alias a cut's
        carrier: no cached activation can be changed by it."""
        v = self.mutated(s)
        return (
            isinstance(v, Ref)
            and v.index not in self._near_cache
            and self.private(v.index, s.index)
        )

    def is_inplace(self, s: Step) -> bool:
        """Whether step `s` may write into an existing tensor (one of its arguments). Settled
        once the program is built (the fused glue asks per batch)."""
        memo = getattr(self, "_inplace", None)
        if memo is not None:
            return s.index in memo
        return self._writes_in_place(s)

    def _writes_in_place(self, s: Step) -> bool:
        if self.is_opaque(s):
            return True
        # `out=None` is no output tensor: fx records it where a function's signature has it
        # (`F.normalize(h, dim=1)` traces with out=None), and it writes nothing
        out = s.kwargs.get("out") is not None
        if s.op == "call_method":
            return inplace_name(s.target) or out
        if s.op == "call_function":
            if s.target in _INPLACE_FUNCS or out:
                return True
            if writes_by_schema(s.target) is not None:  # torch.ops.aten.add_.Tensor
                return True
            # torch.sigmoid_, torch.exp_, F.relu_, torch.Tensor.add_, torch._foreach_mul_, ...
            if inplace_name(getattr(s.target, "__name__", "")):
                return True
            return inplace_arg(s.target, s.args, s.kwargs)
        if s.op == "call_module":
            m = self.modules[s.target]
            return (
                s.index in getattr(self, "keep_inplace", ()) or getattr(m, "inplace", False) is True
            )
        return False

    # ---- queries ---------------------------------------------------------------------
    def drop_cuts(self, bad: set[int]) -> None:
        """Stop using the cuts `bad` (their value does not hold the batch in dim 0:
        `verify.unbatched_cuts`); a variant that would start at one starts at the cut before."""
        self.cuts = [c for c in self.cuts if c not in bad]

    def start_cut(self, keys: set[str] | frozenset[str]) -> int | None:
        """The latest cut before the first step that reads any of `keys`; None if no step
        reads them (the variant's output equals the baseline's). Keys may be any state-dict
        name of a tied tensor."""
        keys = {self.canonical_key(k) for k in keys}
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
        """A parameter, buffer or attribute by its dotted name (or a constant of the trace: the
        pass's own where it computed otherwise under the pass's autocast and that is in force,
        `trace_for_pass`)."""
        if target in self.constants:
            state, differ = self._pass_constants
            if target in differ and autocast_state(self.autocast_kind) == state:  # type: ignore[arg-type]
                return differ[target]
            return self.constants[target]
        obj: Any = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def call_module(self, s: Step, *args: Any, **kwargs: Any) -> Any:
        """Call step s's module; one in `keep_inplace` with its `inplace` flag on for the call,
        as in eager mode (its input is read again later and must see the write); untraced, the
        in-place modules inside it too (`_inner_flipped`)."""
        m = self.modules[s.target]
        inner = self._inner_flipped.get(s.index)
        if inner:
            with _inplace_on(inner):
                return m(*args, **kwargs)
        if s.index not in self.keep_inplace or m.inplace is True:
            return m(*args, **kwargs)
        with _inplace_on([m]):
            return m(*args, **kwargs)

    def regions_here(self) -> Mapping[int, AutocastState]:
        """step index -> the autocast state it must run under, for the steps in a region of
        the forward's own whose state is not the one in force now (`enabled=False` around a
        head under a bf16 pass; a bf16 region in the fp32 check). Empty, at no cost, for a
        program without regions: the callers enter no context per step then."""
        if not self._any_region:
            return _NO_REGIONS
        now = autocast_state(self.autocast_kind)
        got = self._regions.get(now)
        if got is None:
            got = self._regions[now] = {s.index: s.autocast for s in self.steps
                                        if s.autocast is not None and s.autocast != now}
        return got

    def eval_step(self, s: Step, env: Mapping[int, Any]) -> Any:
        """Step s on the values in `env`, in the autocast state in force: a caller running a
        region's step enters its state first (`regions_here`, as `run` and `run_fanned` do)."""
        args = _map_refs(s.args, lambda r: env[r.index])
        kwargs = _map_refs(s.kwargs, lambda r: env[r.index])
        if s.op == "call_module":
            return self.call_module(s, *args, **kwargs)
        if s.op == "call_function":
            return s.target(*args, **kwargs)
        if s.op == "call_method":
            return getattr(args[0], s.target)(*args[1:], **kwargs)
        if s.op == "get_attr":
            return self.fetch(s.target)
        raise RuntimeError(f"unexpected step {s.op}")

    def run(
        self,
        x: torch.Tensor,
        start: int = 0,
        keep: set[int] | None = None,
        saved: dict[int, torch.Tensor] | None = None,
        after_step: Callable[[int], None] | None = None,
        on_value: Callable[[int, Any], None] | None = None,
    ) -> torch.Tensor:
        """Run from cut `start` (whose carrier value is `x`) to the output.

        With `keep`, the carrier values at those cuts are stored into `saved` (cloned when the
        graph mutates values in place, so the cache is never corrupted by later steps).
        `after_step(i)` is called once step i has run (the FLOP counter uses it), and
        `on_value(i, value)` with its value, before the run drops the values it last used
        (`unseen_effects`)."""
        env: dict[int, Any] = {self.carrier[start] if start else 0: x}
        for s in self.steps[: start + 1]:
            if s.op == "get_attr":  # parameter reads are not state: re-read them
                env[s.index] = self.fetch(s.target)
        frees = self.frees
        regions = self.regions_here()
        for s in self.steps[start + 1 :]:
            if s.op == "output":
                return _map_refs(s.args, lambda r: env[r.index])[0]
            if regions and s.index in regions:
                with autocast_as(self.autocast_kind, regions[s.index]):  # type: ignore[arg-type]
                    env[s.index] = self.eval_step(s, env)
            else:
                env[s.index] = self.eval_step(s, env)
            if after_step is not None:
                after_step(s.index)
            if on_value is not None:
                on_value(s.index, env[s.index])
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


def _has_inplace_flag(m: nn.Module) -> bool:
    return getattr(m, "inplace", False) is True or m in _FLIPPED


@contextmanager
def _inplace_on(modules: list[nn.Module]) -> Iterator[None]:
    """`inplace=True` on these modules (switched off by `no_inplace_modules`) for a call."""
    for m in modules:
        m.inplace = True
    try:
        yield
    finally:
        for m in modules:
            m.inplace = False


@contextmanager
def eager_inplace(model: nn.Module) -> Iterator[None]:
    """The model's in-place modules as they came (on) for the duration, inside
    `no_inplace_modules`: to run its own forward exactly as eager mode does."""
    with _inplace_on([m for m in model.modules() if m in _FLIPPED]):
        yield


@contextmanager
def no_inplace_modules(model: nn.Module) -> Iterator[None]:
    """Turn off `inplace=True` on modules (ReLU and friends) for the duration: an in-place
    activation right after a cut would overwrite the cached activation. Values are identical
    where nobody reads the input again; a `Program` built meanwhile knows which modules these
    are (`_FLIPPED`) and runs the others in place (`Program.keep_inplace`), as eager mode does.

    A `torch.jit.script`ed module's flag is a compiled constant (setting it raises): it stays
    on, and the program knows it is on (a scripted `ReLU(inplace=True)` step is in place; one
    inside a scripted step writing into that step's input is found by
    `Program.unseen_effects`)."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", False) is True
               and not isinstance(m, torch.jit.ScriptModule)]
    for m in flipped:
        m.inplace = False
        _FLIPPED.add(m)
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True
            _FLIPPED.discard(m)
