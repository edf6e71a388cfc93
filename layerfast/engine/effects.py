"""The first-batch check of what a program's steps read and write past its bookkeeping.

`Program` knows which parameters a step reads (module ownership, `get_attr`) and which values
it writes (names, schemas, `inplace` flags). Code behind a call can go past both; a variant
then started from a cached value that was wrong for it. `unseen_effects` runs the program once
under a dispatch mode, finds such steps, and `Evaluator._settle_unseen` makes them opaque.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch._ops import HigherOrderOperator
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from layerfast.engine.graph import Program, Ref, Step, refs_in


def unseen_effects(prog: Program, x: torch.Tensor) -> tuple[set[int], set[int]] | None:
    """What the steps do, run on `x`, that the program does not know of: (reads, writes).

    reads: the steps that read a parameter or buffer the program does not credit them
    with: neither their own keys nor those of a step their value comes from. The keys come
    from module ownership and `get_attr`, and code can reach a tensor past both: a leaf
    module whose `forward` was replaced on the instance, or whose parametrization holds
    another module; a plain attribute sharing a parameter's storage
    (`self.w = self.b.weight.detach()`); a child of an untraced `nn.Sequential` holding
    another child in a list. A variant of that tensor started from a cut after such a
    step, and the prefix it reused had read the final model's tensor.

    writes: the steps that write into the storage of a value another step computed (or
    of the input) that the program does not take them to write into, or whose value the
    program takes for a new tensor (or a view of values only it reads) while it shares the
    storage of another step's value. The in-place analysis knows steps by their names and
    schemas; code behind a call can write past it: a leaf module's replaced `forward`
    (`x.mul_(2)`, `x[:, 0] = 0`, `torch.ops.aten.relu_(x)`), a scripted submodule, a
    `torch.nn` subclass defined elsewhere, or one returning its input. The next variant
    then started from a cached cut (or the cached input) the previous one had written into.
    With them, where a step wrote into a value it reached past its arguments (Python state,
    a hook), the step that made that value (`_stale_starts`; for the input, the steps
    taking it): the state still holds it, and a variant must make it again.

    Both are found in one run, by the storages each step's ops read and write (a
    dispatch mode: writes are the arguments the op's schema marks `Tensor(a!)`; `.numpy()`,
    `np.asarray(t)`, `np.from_dlpack(t)` and `t.apply_(f)` / `map_` / `map2_`, past the
    dispatcher, are taken to write into `t`, by a function mode). A step that hands a
    tensor's values to Python (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.numpy()`,
    `np.from_dlpack(t)`, `apply_`'s callable, the bool of `torch.equal` / `torch.allclose`)
    is in reads: Python state may keep what it made, past any storage, for a later step
    (`box["s"] = float(h.max())`, `g * box["s"]`), so a variant must run it again. Only the
    path `x` takes is seen: code that reads or writes only on other inputs (a branch on the
    values inside a replaced `forward`), or writes through a raw pointer (`data_ptr()` and
    ctypes, an extension past the dispatcher), is not found.

    A step the mode cannot see into is in both sets, as unknown (so opaque): one that runs a
    higher-order operator (`torch.cond`: its body runs past the mode), and, where the run
    under the mode raises while a plain run does not, every step it had not finished. An
    answer of nothing found would have let a variant start after a step that read its
    tensor. None when the model fails on its own (the pass reports that failure)."""
    run = _Run(prog)
    mode = _Effects(run)
    run.mode = mode
    x0, x = x, x.clone()
    run.own[0] = _ptrs(x)
    for p in run.own[0]:
        run.holders[p] = {0}
    try:
        with _Escapes(mode), mode, torch.no_grad():
            prog.run(x, 0, on_value=run.record)
    except Exception:  # noqa: BLE001 - the model's, or the mode's: told apart below
        if not _runs_plain(prog, x0):
            return None  # the model's own failure: the pass says so
        # Only the mode failed: what it had not recorded is unknown, and so opaque (a
        # variant starts at or before the first such step; cached values are copies).
        run.blind |= {s.index for s in prog.steps if s.index not in run.reads
                      and s.op not in ("input", "output", "get_attr")}
    if run.blind and "torch._dynamo" in sys.modules:
        # torch >= 2.11 compiles an eager `torch.cond` with dynamo; compiled under the mode
        # it stays broken for the process (every later call raises `Unsupported`, and the
        # pass blamed the model): forget what dynamo compiled meanwhile
        torch._dynamo.reset()
    unseen = _uncredited(prog, run.reads)
    return unseen | run.stale_reads | run.blind, run.writes | run.blind


def _uncredited(prog: Program, reads: dict[int, set[str]]) -> set[int]:
    """The steps whose ops read a parameter or buffer (`reads`: step -> keys) that neither
    their own keys nor those of a step their value comes from credit them with."""
    credited: dict[int, frozenset[str]] = {}
    unseen: set[int] = set()
    for s in prog.steps:
        mine = s.keys.union(*(credited.get(r, frozenset())
                              for r in refs_in(s.args) + refs_in(s.kwargs)))
        credited[s.index] = mine
        if reads.get(s.index, set()) - mine:
            unseen.add(s.index)
    return unseen


class _Run:
    """What `unseen_effects`' run knows of the storages it meets, and what it has found;
    `record` takes each step's value (`Program.run`'s `on_value`) with what its ops did (the
    dispatch mode's per-step sets, reset here)."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog
        self.mode: _Effects  # set before the run
        # storage -> the bytes [lo, hi) of each parameter or buffer in it, and its key: a
        # read is one of the tensors whose bytes it overlaps, not of all that share its
        # storage (parameters made from chunks of one tensor, or a flat-parameter wrapper's
        # views).
        self.by_storage: dict[int, list[tuple[int, int, str]]] = {}
        named = [*prog.model.named_parameters(remove_duplicate=False),
                 *prog.model.named_buffers(remove_duplicate=False)]
        for name, t in named:
            ptr = _storage_ptr(t)
            span = _byte_span(t) if ptr else None
            if span:
                self.by_storage.setdefault(ptr, []).append(  # type: ignore[arg-type]
                    (*span, prog.canonical.get(name, name)))
        # storage -> the steps (0: the input) whose live value holds it; a value leaves
        # once the run has dropped it and its storages are freed, so a later allocation at
        # the same address is not taken for it. One whose storage outlives the run's
        # reference (kept in Python state: `self.t = t` in a replaced forward) stays while
        # it lives: a later step writing into it reaches a value a variant started after
        # its producer does not remake. The input and the cuts' carriers stay, alive: the
        # pass keeps them for the variants.
        self.holders: dict[int, set[int]] = {}
        self.kept = {0, *prog.carrier.values()}
        self.alive: list[Any] = []
        self.own: dict[int, set[int]] = {}  # step -> its live value's storages (params too)
        self.values: dict[int, Any] = {}  # step -> its value, not kept, until the run drops it
        self.dropped: set[int] = set()  # steps whose values the run has dropped
        self.weak: dict[int, list[StorageWeakRef]] = {}  # storage -> dropped holders' refs
        # storage -> the step that made it and a ref to it: a tensor a step's ops made that
        # outlives the step without being (in) its value (`self.h = h.clone()` in a
        # replaced forward, kept in Python state); a later step reading it reaches that
        # step's tensor
        self.made: dict[int, tuple[int, StorageWeakRef]] = {}
        # what was found
        self.reads: dict[int, set[str]] = {}
        self.stale_reads: set[int] = set()  # producers of values read past the arguments
        self.writes: set[int] = set()
        self.blind: set[int] = set()  # steps whose effects the run could not see

    def kept_by(self, p: int) -> int | None:
        """The step whose own tensor, kept past it in Python state, lives at storage p (a
        freed one's entry goes: its address is now another tensor's)."""
        e = self.made.get(p)
        if e is None:
            return None
        if e[1].expired():
            del self.made[p]
            return None
        return e[0]

    def holds(self, p: int) -> bool:
        """Whether storage address p is a value's the run made: one it holds, or one it
        dropped whose storage lives on. Asked when p is met (lazily: a dropped value's
        storage is checked only then); a freed one's entry goes, as its address is now
        another tensor's."""
        held = self.holders.get(p)
        if not held:
            return False
        if not held <= self.dropped or any(not r.expired() for r in self.weak.get(p, ())):
            return True
        del self.holders[p]
        self.weak.pop(p, None)
        return False

    def reached(self, p: int) -> bool:
        """Whether storage p is a step's: a value the run holds (`holds`), or a tensor a
        step made and keeps in Python state (`kept_by`). The one test of what a read past
        the arguments, or a write, reaches (the dispatch and the function mode both ask)."""
        return (p in self.holders and self.holds(p)
                or p in self.made and self.kept_by(p) is not None)

    def record(self, i: int, value: Any) -> None:
        """Step i has run, to `value`: what its ops did (the mode's sets) and its value."""
        prog, mode, holders, made, own = self.prog, self.mode, self.holders, self.made, self.own
        self.reads[i] = mode.seen
        out = _ptrs(value)
        for p in out:  # a freed dropped value's address, reused by this one: forget it
            if p in holders:
                self.holds(p)
        # a value that is a step's tensor (not a parameter's) with no op of this step's on
        # it (`return self.memo`): a read past the arguments, which only the storages tell
        # (`_stale_starts` leaves out the arguments' own)
        mode.looked |= {p for p in out if p not in self.by_storage and self.reached(p)}
        if mode.blind:
            self.blind.add(i)
            mode.blind = False
        s = prog.steps[i]
        if s.op != "get_attr" and not prog.is_opaque(s):
            if _writes_past(prog, s, mode.wrote, own) or _aliases_past(
                    prog, s, out, holders):
                self.writes.add(i)
        if (mode.wrote or mode.looked) and s.op != "get_attr":
            makers = {p: holders[p] if p in holders else {made[p][0]}
                      for p in mode.wrote | mode.looked if p in holders or p in made}
            self.writes.update(_stale_starts(prog, s, mode.wrote, own, makers))
            self.stale_reads.update(_stale_starts(prog, s, mode.looked, own, makers))
        for p, r in mode.new.items():  # what the step made and still lives, not its value
            if p not in out and not r.expired():
                made[p] = (i, r)
        if mode.stated and s.op != "get_attr":
            # a write into a parameter or buffer (`self.keep.copy_(h)` in a replaced forward):
            # a variant started after this step reads what the previous run left there
            self.stale_reads.add(i)
        if mode.escaped and s.op != "get_attr":
            # a Python value made of a tensor (a float, a list, a numpy array) may be kept
            # in Python state and read by a later step, past any storage: a variant must
            # run this step again, so each starts at or before it
            self.stale_reads.add(i)
        # every flag is this step's alone, whatever the step (one left set would be charged
        # to the next)
        mode.seen, mode.wrote, mode.looked, mode.new = set(), set(), set(), {}
        mode.stated = mode.escaped = False
        own[i] = out
        if s.op != "get_attr":
            for p in own[i]:
                holders.setdefault(p, set()).add(i)
            if i in self.kept:
                self.alive.append(value)
            else:
                self.values[i] = value
        for j in prog.frees[i]:
            if j not in self.kept:
                self.dropped.add(j)
                for t in tree_leaves(self.values.pop(j, None)):
                    p = _storage_ptr(t) if isinstance(t, torch.Tensor) else None
                    if p:
                        self.weak.setdefault(p, []).append(StorageWeakRef(t.untyped_storage()))


class _Effects(TorchDispatchMode):
    """What the current step's ops read and write (`_Run.record` takes and resets it)."""

    # A higher-order operator (`torch.cond`, `flex_attention`, ...) comes here whole, its
    # body run past this mode, instead of raising for want of a rule for the mode: the step
    # it runs in is then one whose effects are unknown (`blind`).
    supports_higher_order_operators = True

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run
        self.seen: set[str] = set()
        self.wrote: set[int] = set()
        self.looked: set[int] = set()  # held storages (not parameters') the step's ops took
        self.new: dict[int, StorageWeakRef] = {}  # storages the step's ops made (no one's before)
        self.stated = False  # whether the step's ops wrote into a parameter's or buffer's storage
        self.escaped = False  # the step's ops made a Python value of a tensor's (`_Escapes`)
        self.blind = False

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in `_disable_dynamo`, whose first call
        # imports torch._dynamo: ~0.9 s once per process, 60x a ResNet-20 forward on 8
        # samples. Nothing here compiles, so the wrapper is not needed.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if isinstance(func, HigherOrderOperator):
            self.blind = True
            return func(*args, **kwargs)
        run, by_storage = self.run, self.run.by_storage
        took: set[int] = set()
        if func in _SCALARS or _hands_out_values(func, args):
            self.escaped = True  # `.item()`, `float(t)`, `torch.equal`, `len(h[m])`
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                ptr = _storage_ptr(t) or -1
                took.add(ptr)
                if ptr not in by_storage and run.reached(ptr):
                    self.looked.add(ptr)
                held = by_storage.get(ptr)
                span = _byte_span(t) if held else None
                if span:
                    self.seen |= {k for lo, hi, k in held  # type: ignore[union-attr]
                                  if lo < span[1] and span[0] < hi}
        schema = getattr(func, "_schema", None)
        for i, a in enumerate(schema.arguments if schema is not None else ()):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
                for t in tree_leaves(v):
                    p = _storage_ptr(t) if isinstance(t, torch.Tensor) else None
                    if not p:
                        continue
                    if run.reached(p):
                        self.wrote.add(p)
                    elif p in by_storage:  # a parameter or buffer: state later runs read
                        self.stated = True
                    elif p not in self.new:  # a tensor of Python state no step made:
                        # its writer makes it (read later past the arguments, it is stale)
                        self.new[p] = StorageWeakRef(t.untyped_storage())
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            p = _storage_ptr(t) if isinstance(t, torch.Tensor) else None
            if p and p not in took and p not in by_storage and not run.reached(p):
                self.new[p] = StorageWeakRef(t.untyped_storage())
        return out


class _Escapes(TorchFunctionMode):
    """Sees what leaves torch without an op the dispatch mode would see: `.tolist()`;
    `.numpy()` / `np.asarray(t)` / `np.from_dlpack(t)`, a view a step may also write
    through; `t.apply_(f)` / `map_` / `map2_`, which write into `t`."""

    def __init__(self, mode: _Effects) -> None:
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in _ESCAPES:
            mode, run = self.mode, self.mode.run
            mode.escaped = True
            if func is not torch.Tensor.tolist:  # numpy's view, or apply_'s: a write
                mode.wrote |= {p for p in _ptrs(args[:1]) if run.reached(p)}
            # map_'s / map2_'s other tensors are read past the dispatcher: a value reached
            # there through Python state is a read past the arguments, as the mode's are
            mode.looked |= {p for p in _ptrs(args[1:]) - _ptrs(args[:1])
                            if p not in run.by_storage and run.reached(p)}
        return func(*args, **(kwargs or {}))


def _ptrs(v: Any) -> set[int]:
    """The storages of the tensors in `v` (a value, possibly nested)."""
    return {p for t in tree_leaves(v) if isinstance(t, torch.Tensor)
            for p in (_storage_ptr(t),) if p}


#: Tensor methods that hand a tensor's values to Python past the dispatcher (`.item()` and
#: the scalar conversions dispatch an op, `_SCALARS`, which the dispatch mode sees).
#: `__dlpack__` is how `np.from_dlpack(t)` gets a writable view, as `.numpy()` does (and
#: `torch.from_dlpack(t)`: a step doing that is found too, though the mode sees its writes).
#: `apply_` / `map_` / `map2_` (CPU) write into their tensor in place, element by element,
#: by a Python callable that sees the values: no op reaches the dispatch mode.
_ESCAPES = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__,
                      torch.Tensor.__dlpack__, torch.Tensor.apply_, torch.Tensor.map_,
                      torch.Tensor.map2_})
#: The ops that return a tensor's values as a Python number or bool: a scalar conversion's
#: (`aten.item` whole under `inference_mode`, and there `bool(t)` as `aten.is_nonzero`), and
#: `torch.equal` / `torch.allclose`, whose bool a step may keep as `.item()`'s number.
_SCALARS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                      torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
                      torch.ops.aten.allclose.default})


def _hands_out_values(func: Any, args: tuple) -> bool:
    """Whether op `func` gives Python something its tensor arguments' values decide beyond
    `_SCALARS`: an output whose size they set (`h.nonzero()`, `h[h > 0]`, `torch.unique(h)`:
    torch tags such ops `dynamic_output_shape`; other `data_dependent_output` ops), which
    `.shape` / `len()` / `.numel()` read as a Python int that Python state may keep for a
    later step, as a float from `.item()`. `aten.index.Tensor` has the tag for any indices:
    only a boolean mask's count sets its size (an integer gather's is the index's), so only
    that one counts."""
    tags = getattr(func, "tags", ())
    if torch.Tag.data_dependent_output in tags:
        return True
    if torch.Tag.dynamic_output_shape not in tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                   for t in (args[1] if len(args) > 1 else ()) if t is not None)
    return True


def _runs_plain(prog: Program, x: torch.Tensor) -> bool:
    """Whether the program runs on `x` without a dispatch mode (`unseen_effects` tells the
    model's own failure from its mode's by it)."""
    try:
        with torch.no_grad():
            prog.run(x.clone(), 0)
    except Exception:  # noqa: BLE001 - the model's own failure
        return False
    return True


def _writes_past(prog: Program, s: Step, wrote: set[int], own: dict[int, set[int]]) -> bool:
    """Whether step s wrote into another step's value (storages `wrote`) where the program
    does not take it to: anywhere, for a step it takes to write nowhere; outside the
    storage of the argument it writes into (`mutated`; `own`: each live value's
    storages), for an in-place one."""
    if not wrote:
        return False
    if prog.is_inplace(s):
        target = prog.mutated(s)
        if not isinstance(target, Ref):  # unknown: taken to write anywhere already
            return False
        return not wrote <= own.get(target.index, set())
    return True


def _stale_starts(prog: Program, s: Step, wrote: set[int], own: dict[int, set[int]],
                  holders: dict[int, set[int]]) -> set[int]:
    """The steps to make opaque so that no variant starts between the producer of a value
    step s wrote into (or read: storages `wrote`) without taking it as an argument, and s
    (opaque steps included: they are taken to write into their arguments only).

    Such a value is reached through Python state (`self.inp = x` in one step, `self.inp
    .mul_(2)` or `g + self.inp` in a later one, in a replaced `forward` or a hook): a variant
    started from a cut between the two does not run the step that set that state, so s
    reads (and writes again into) the value a previous run left there: the baseline's,
    written into once already, or the previous variant's, made with other weights. Copying
    cached values does not help: the state holds the old tensor. A variant must run the
    producer again: its step is made opaque (variants start before it), or, for the input,
    the steps taking it. Empty when every storage is one of s's arguments'."""
    mine = set().union(*(own.get(r, set()) for r in refs_in(s.args) + refs_in(s.kwargs)))
    out: set[int] = set()
    for p in wrote - mine:
        first = min(holders.get(p, {s.index}))
        if first < s.index:
            out |= set(prog.steps[0].users) if first == 0 else {first}
    return out


def _aliases_past(prog: Program, s: Step, out: set[int], holders: dict[int, set[int]]) -> bool:
    """Whether step s's value shares storage with another step's value where the program
    takes it for a new tensor, or for a view of values only it reads (`_fresh`): a write
    into it that the program takes as harmless would change that value."""
    if s.index not in prog._fresh or not out:
        return False
    mine = set(refs_in(s.args) + refs_in(s.kwargs)) if prog._freshness(s) == "alias" else set()
    return any(p in holders and not holders[p] & mine for p in out)


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The address of `t`'s storage (shared by every view of it); None where it has none
    (sparse, meta, a tensor subclass without one) or an empty one."""
    try:
        return t.untyped_storage().data_ptr() or None
    except Exception:  # noqa: BLE001 - no storage to tell by
        return None


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """The addresses [lo, hi) of the bytes `t` covers in its storage (its view's extent);
    None where it covers none or has no address to tell by."""
    try:
        if t.numel() == 0:
            return None
        lo = t.data_ptr()
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) + 1
        return lo, lo + extent * t.element_size()
    except Exception:  # noqa: BLE001 - no address (a tensor subclass without storage)
        return None
