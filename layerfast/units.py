"""Units: which modules (and which state-dict keys) are reset together (DESIGN.md §3).

A unit is what one variant resets: a layer, a residual block, a stage, or a custom group.

Granularity
- `layer` (default): one unit per module that directly owns parameters and is not a
  normalization layer (Conv*, Linear, Embedding, ...), in `named_modules()` order, named by its
  qualified module name (`features.0`, `layer1.0.conv2`, `fc`). Parameters registered on the
  model itself form the unit `(root)`. A parametrized module (`torch.nn.utils.parametrizations`
  `weight_norm`, `spectral_norm`, ...) owns its `parametrizations` container's state, so its
  unit resets its weight (`conv.parametrizations.weight.original*`).
- `block` / `stage`: the registered architecture's own list (`ArchSpec.blocks/stages`: unit
  name -> module-name prefixes; torchvision ResNets give `stem`, `layer1.0`.., `fc` and `stem`,
  `layer1`.., `fc`). Without one (user models, the FCN), each top-level child that owns
  state is one unit named after it, for both. A module a block holds under any of its names
  is in it (`self.dec = nn.Sequential(self.enc, ...)`: `dec` resets `dec.0`, which is
  `enc`), keyed by the block's own name for it; two blocks holding one module then share
  its tensors under two names and are warned about as tied (`tied_across_units`).
- `patterns` (`--units P,...`): each pattern is a glob (`fnmatch`, case-sensitive) or, prefixed
  `re:`, a regex (`re.search`) over qualified module names. It selects a module when it matches
  the module's name or the name of one of its ancestors, so `layer1.0` selects the whole block
  and `layer1.*` the whole stage. A module registered under two names (`self.b = self.a`) is
  selected by either; the model's own parameters by `(root)`. Everything one pattern selects is
  one unit named by the pattern: this is how joint resets are asked for; patterns may overlap
  (their units then share keys). A pattern selecting nothing is an error.
  Patterns replace the granularity (combining them with block/stage is an error).

BatchNorm policy (`bn`), for normalization layers (BatchNorm*, SyncBatchNorm, InstanceNorm*
with state, GroupNorm, LayerNorm, RMSNorm)
- `with-layer` (default): a normalization layer fed directly by a conv/linear of a unit is
  reset with that unit, parameters AND running statistics. A normalization layer a block,
  stage or pattern selects itself is in the unit too, except (block/stage) one fed directly by
  a conv/linear of another block or stage, which goes with its feeder as at layer granularity
  (a pre-activation ResNet's `layer1.0.bn1`, fed by the stem conv, is reset with the stem;
  top-level children `conv, bn` give one unit, not two). One fed by no conv/linear (after an
  addition, a concatenation, the input: pre-activation nets, transformers) would never be
  reset at layer granularity, so there it becomes a unit of its own rather than being
  silently skipped. A normalization module called on two paths and fed directly by a
  conv/linear on each (`bn(a(x)) + bn(b(x))`) is reset with each of them: its keys are in both
  units, the one case where units of a granularity share keys (tied weights aside, whose
  several names each stay with their own module).
- `keep`: normalization layers are never reset: never in `keys`, and `fullmodel` leaves them
  at the final model too (the policy travels with each `Unit` for that).
- `separate`: every normalization layer that `with-layer` would reset is a unit of its own
  (named by its module), listed right after the unit it was taken from.

"Fed directly by" (`bn_feeders`) is read from the graph: the model is traced with
`torch.fx` (conv, linear and normalization modules kept as leaves, so subclasses of
nn.Conv2d count) and a normalization module is fed by a conv/linear when its input node IS
that module's output node: nothing in between, not even a reshape. If the model cannot be
traced (data-dependent control flow, ...), the documented fallback rule applies: a
normalization module is fed by the conv/linear that immediately precedes it among the children
of the same parent (i.e. the module right before it in `named_modules()` order, within that
parent), provided its feature count equals that conv's out_channels or linear's
out_features.

`keys` are state-dict keys: every parameter of the unit's modules, plus running_mean and
running_var of its normalization layers, plus the parameters and buffers under a parametrized
module's `parametrizations` (spectral_norm's `_u`/`_v` decide the weight in eval too), plus
the floating buffers a forward pre-hook derives a weight from (pruning's `weight_mask`, the
old-style spectral_norm's `weight_u`/`weight_v`: `derived_weights`), never
num_batches_tracked (eval ignores it) nor other buffers.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from layerfast.engine.graph import trace_with
from layerfast.errors import LayerfastError
from layerfast.models import ArchSpec
from layerfast.models.init import NORM_TYPES

GRANULARITIES = ("layer", "block", "stage")
BN_POLICIES = ("with-layer", "keep", "separate")
FEEDER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
ROOT = "(root)"  # unit name for parameters registered directly on the model itself

__all__ = ["BN_POLICIES", "GRANULARITIES", "Unit", "bn_feeders", "make_units", "split_patterns"]


@dataclass(frozen=True)
class Unit:
    """What one variant resets.

    name:    shown in the results (`layer1.0.conv2`, `stem`, `layer1.*`).
    modules: qualified names of the modules reset together, in `named_modules()` order within
             each selection (`""` for the model itself when it owns parameters directly).
    keys:    the state-dict keys those modules contribute (see the module docstring).
    bn:      the BN policy of `make_units` (`with-layer`, `keep`, `separate`).
    """

    name: str
    modules: tuple[str, ...]
    keys: tuple[str, ...]
    #: The BN policy the unit was made under. Carried with the unit because it decides more than
    #: the unit's own keys: under `keep`, `fullmodel` must leave every normalization layer at the
    #: final model too (DESIGN.md §3), and `make_variants` only sees the units.
    bn: str = "with-layer"


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def _has_state(module: nn.Module) -> bool:
    """Owns parameters directly (a parametrized tensor's `original*` included), or is a
    normalization layer with running statistics."""
    if any(p is not None for p in module._parameters.values()):
        return True
    if parametrize.is_parametrized(module):
        return True
    return is_norm(module) and getattr(module, "running_mean", None) is not None


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding state a unit can reset, in `named_modules()` order.

    A parametrized module (`torch.nn.utils.parametrizations.weight_norm`, `spectral_norm`, ...)
    owns what its `parametrizations` container holds: its weight lives there as
    `<name>.parametrizations.weight.original*`, so that container is no owner of its own."""
    owners: dict[str, nn.Module] = {}
    inside: list[str] = []  # "<parametrized>.parametrizations" prefixes
    for name, m in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if parametrize.is_parametrized(m):
            inside.append(f"{name}.parametrizations" if name else "parametrizations")
        if _has_state(m):
            owners[name] = m
    return owners


def _aliases(model: nn.Module, owners: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Owner name -> every name it is reachable by, for pattern matching.

    `named_modules()` lists a module registered twice (`self.b = self.a`) once, under its first
    name; a pattern may use either. The model itself is also called `(root)`, its unit name."""
    canonical = {id(m): name for name, m in owners.items()}
    names: dict[str, list[str]] = {name: [name] for name in owners}
    for name, m in model.named_modules(remove_duplicate=False):
        first = canonical.get(id(m))
        if first is not None and name not in names[first]:
            names[first].append(name)
    if "" in names:
        names[""].append(ROOT)
    return names


# --------------------------------------------------------------------------- BN pairing


class _LeafTracer(torch.fx.Tracer):
    """Keeps conv/linear/norm modules (and their subclasses) as call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FEEDER_TYPES + NORM_TYPES) or super().is_leaf_module(
            m, module_qualified_name
        )


def _traced_feeders(model: nn.Module) -> dict[str, list[str]]:
    """Pairs from the fx graph, every feeder of a norm called more than once, in graph order;
    raises when the model cannot be traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, _ = trace_with(_LeafTracer(), model)  # leaves no fx constant on the model
    modules = dict(model.named_modules())
    feeders: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_norm(modules.get(str(node.target), nn.Identity())):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(str(src.target)), FEEDER_TYPES)
        ):
            fed = feeders.setdefault(str(node.target), [])
            if str(src.target) not in fed:
                fed.append(str(src.target))
    return feeders


def _out_features(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


def _norm_features(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    shape = getattr(m, "normalized_shape", None)  # LayerNorm, RMSNorm: the last dim
    return int(shape[-1]) if shape else None


def _fallback_feeders(model: nn.Module) -> dict[str, list[str]]:
    """The untraceable-model rule: consecutive siblings, matching feature counts."""
    feeders: dict[str, list[str]] = {}
    for parent_name, parent in model.named_modules():
        prev_name, prev = None, None
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (
                is_norm(child)
                and prev is not None
                and _out_features(prev) is not None
                and _out_features(prev) == _norm_features(child)
            ):
                feeders[name] = [str(prev_name)]
            prev_name, prev = name, child
    return feeders


def _all_feeders(model: nn.Module) -> dict[str, list[str]]:
    try:
        return _traced_feeders(model)
    except Exception:  # untraceable: any error fx raises means "use the documented rule"
        return _fallback_feeders(model)


def bn_feeders(model: nn.Module) -> dict[str, str]:
    """Normalization module name -> the conv/linear module that feeds it directly.

    From the torch.fx graph when the model traces, else from the fallback rule (module
    docstring). Normalization layers fed by anything else are absent. A norm fed by several
    (one module called on two paths) maps to the first in the graph; `make_units` resets it
    with each of them.
    """
    return {norm: fed[0] for norm, fed in _all_feeders(model).items()}


# --------------------------------------------------------------------------- selections


def _under(name: str, prefixes: Sequence[str]) -> bool:
    # "" is the model itself: only its own parameters, not everything below it
    return any(name == p or (p != "" and name.startswith(p + ".")) for p in prefixes)


def _prefix_selections(
    owners: dict[str, nn.Module],
    groups: list[tuple[str, list[str]]],
    aliases: dict[str, list[str]],
) -> tuple[list[tuple[str, list[str]]], list[dict[str, str]]]:
    """Each group's owners, and for each group the name it holds each of them by.

    An owner is in a group when any of its names is under the group's prefixes: a module
    registered in two blocks (`self.dec = nn.Sequential(self.enc, ...)`) is part of both, as
    `--units dec` selects it; `named_modules()` lists it once, under its first name, and
    matching only that name silently left `dec.0` out of the block `dec`. Inside a group the
    owner is named as that group holds it (`dec.0`), so its keys are the block's own
    state-dict names and a second block holding the same tensors is warned about as tied
    (`tied_across_units`)."""
    selections: list[tuple[str, list[str]]] = []
    shown: list[dict[str, str]] = []
    for name, prefixes in groups:
        held = {o: next(a for a in aliases[o] if _under(a, prefixes))
                for o in owners if any(_under(a, prefixes) for a in aliases[o])}
        selections.append((name, list(held)))
        shown.append({o: a for o, a in held.items() if a != o})
    return selections, shown


def _children_groups(
    model: nn.Module, owners: dict[str, nn.Module], aliases: dict[str, list[str]]
) -> list[tuple[str, list[str]]]:
    """Block/stage for models without their own: each top-level child that owns state (its
    own, or a module it holds that another child registered first)."""
    groups = [(ROOT, [""])] if "" in owners else []
    for child, _ in model.named_children():
        if any(_under(a, [child]) for o in owners if o for a in aliases[o]):
            groups.append((child, [child]))
    return groups


def _split_points(text: str) -> list[int]:
    """Indices of the commas outside every closed bracket pair of `text`, in one pass.

    `[...]` is a class as globs and regexes read it: a `]` right after `[` (or `[!`, `[^`) is
    in it, and brackets inside are plain characters (`[[]`, `[(]`). `(` and `{` pair with their
    own kind, nesting. A bracket that nothing closes (or that the closing of an outer pair
    cuts off) is a plain character."""
    n = len(text)
    next_close = [-1] * (n + 1)  # the first `]` at or after each index
    for i in range(n - 1, -1, -1):
        next_close[i] = i if text[i] == "]" else next_close[i + 1]
    cover = [0] * (n + 1)  # +1 where a closed pair's inside starts, -1 where it ends
    stack: list[int] = []  # unclosed `(` and `{`
    open_count = {"(": 0, "{": 0}
    i = 0
    while i < n:
        ch = text[i]
        if ch == "[":
            k = i + 1
            k += text[k:k + 1] in ("!", "^")
            k += text[k:k + 1] == "]"
            end = next_close[k]
            if end >= 0:  # a class: skipped whole, brackets and commas in it included
                cover[i + 1] += 1
                cover[end] -= 1
                i = end + 1
                continue
        elif ch in "({":
            stack.append(i)
            open_count[ch] += 1
        elif ch in ")}":
            want = "(" if ch == ")" else "{"
            if open_count[want]:
                while True:
                    j = stack.pop()
                    open_count[text[j]] -= 1
                    if text[j] == want:
                        break
                cover[j + 1] += 1
                cover[i] -= 1
        i += 1
    points, depth = [], 0
    for i, ch in enumerate(text):
        depth += cover[i]
        if ch == "," and depth == 0:
            points.append(i)
    return points


def split_patterns(text: str) -> list[str]:
    """Split `--units`-style text at commas outside brackets, stripped, empties dropped.

    A plain `split(",")` would cut `re:x{1,2}` or the glob class `[a,b]` in two. A bracket
    that nothing closes is a plain character (a module named `a[` or `a(`, which its glob
    matches as written): it used to hold every later comma, so `a[,fc` was one pattern, and
    so did the `[` of `literal_pattern`'s `[[]`."""
    bounds = [-1, *_split_points(text), len(text)]
    parts = (text[a + 1:b] for a, b in zip(bounds, bounds[1:], strict=False))
    return [p.strip() for p in parts if p.strip()]


def literal_pattern(name: str) -> str:
    """A `--units` pattern that selects the module `name` and nothing else by its name: the
    glob characters `*?[` and the comma `--units` splits at each in a class of one (`x[0]` ->
    `x[[]0]`, `a,b` -> `a[,]b`), a leading `re:` (which would make it a regex) as `[r]e:`, and
    whitespace at the ends (which `--units` strips) as `[ ]`."""
    core = name.strip()
    lead = name[: len(name) - len(name.lstrip())]
    trail = name[len(lead) + len(core):]
    out = "".join(f"[{c}]" if c in "*?[," else c for c in core)
    if out.startswith("re:") and not lead:
        out = "[r]" + out[1:]
    return "".join(f"[{c}]" for c in lead) + out + "".join(f"[{c}]" for c in trail)


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except (re.error, OverflowError, RecursionError) as err:  # `a{99999999999}`: Overflow
            raise LayerfastError(f"unit pattern {pattern!r}: bad regex: {err}") from None
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _pattern_selections(
    model: nn.Module, owners: dict[str, nn.Module], patterns: Sequence[str]
) -> list[tuple[str, list[str]]]:
    aliases = _aliases(model, owners)
    selections: list[tuple[str, list[str]]] = []
    for pattern in dict.fromkeys(p.strip() for p in patterns):  # de-duplicated, in order
        if not pattern or pattern == "re:":
            raise LayerfastError("empty unit pattern in --units")
        if pattern == "*":  # the unit's rows would read like the baseline's and fullmodel's
            raise LayerfastError(
                "unit pattern '*' would name a unit '*', which results.csv reserves for the "
                "baseline and fullmodel rows; every unit reset at once is --reset fullmodel "
                "(or write the pattern as 're:.*')"
            )
        match = _matcher(pattern)
        chosen = [o for o in owners if any(_matches_self_or_ancestor(a, match) for a in aliases[o])]
        if not chosen:
            named = [n for n, _ in model.named_modules(remove_duplicate=False) if n and match(n)]
            parts = {_parametrized_owner(n, owners) for n in named} - {None}
            if parts:
                shown = _listed(sorted(p or ROOT for p in parts))
                raise LayerfastError(
                    f"unit pattern {pattern!r} selects only the parametrizations of {shown}, "
                    "which are reset with their layer: select the layer"
                )
            if named:
                shown = _listed(named[:4]) + (", ..." if len(named) > 4 else "")
                raise LayerfastError(
                    f"unit pattern {pattern!r} selects only modules that own no parameters "
                    f"({shown}): nothing to reset"
                )
            # the model's own parameters are the unit `(root)`: its name "" would show as ", ,"
            examples = _listed(o or ROOT for o in list(owners)[:6]) + (
                ", ..." if len(owners) > 6 else "")
            # A regex without `re:` is read as a glob and quietly matches nothing: say so.
            hint = "" if pattern.startswith("re:") else (
                f"; it is read as a glob (*, ?, [...]), for a regex write 're:{pattern}'"
            )
            everything = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
            if pattern in everything:  # a name holding [ ] is no glob for itself
                hint = (f"; it is read as a glob, where [...] is a class: the module named "
                        f"{pattern!r} itself is the pattern {literal_pattern(pattern)!r}")
            commas = [n for n in everything if "," in n and pattern in n.split(",")]
            if commas:  # `--units 'd.a,b'` arrives here as `d.a` and `b`
                hint += (f"; --units splits at commas outside brackets, so a comma in a module "
                         f"name is written [,] ({commas[0]!r} is {literal_pattern(commas[0])!r})")
            raise LayerfastError(
                f"unit pattern {pattern!r} matches no module that owns parameters{hint} "
                f"(module names look like: {examples})"
            )
        selections.append((pattern, chosen))
    return selections


def _listed(names: Iterable[str]) -> str:
    """Module or unit names for an error message, comma-separated, each on one line as
    `--list-units` shows it (`report.tables.printable`): a ModuleDict key such as `"a\\nb"`
    or one holding an ANSI escape was printed raw, breaking the one-line message or recolouring
    the terminal. Patterns are shown by `repr`, which escapes them already."""
    from layerfast.report.tables import printable  # lazy: pandas, for an error path only

    return ", ".join(printable(n) for n in names)


def _parametrized_owner(name: str, owners: dict[str, nn.Module]) -> str | None:
    """`a.parametrizations.weight.0` -> `a` when `a` is a parametrized owner, else None."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "parametrizations":
            owner = ".".join(parts[:i])
            if owner in owners and parametrize.is_parametrized(owners[owner]):
                return owner
    return None


def _matches_self_or_ancestor(name: str, match) -> bool:
    parts = name.split(".")
    return any(match(".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _home_fed_norms(
    selections: list[tuple[str, list[str]]], feeders: dict[str, list[str]]
) -> list[tuple[str, list[str]]]:
    """A fed norm belongs to the block/stage holding its feeder, not to a second one.

    Matters for the top-level-children fallback, where `nn.Sequential(conv, bn, ...)` gives
    the BN a child unit of its own although `with-layer` resets it with the conv.
    """
    home: dict[str, int] = {}
    for i, (_, chosen) in enumerate(selections):
        for o in chosen:
            home.setdefault(o, i)
    return [
        (name, [o for o in chosen if o not in feeders or any(home.get(f, i) == i for f in feeders[o])])
        for i, (name, chosen) in enumerate(selections)
    ]


# --------------------------------------------------------------------------- units


def derived_weights(module: nn.Module) -> dict[str, list[str]]:
    """Tensors a forward pre-hook computes before each call from others named after them,
    kept as plain attributes, not parameters: `weight` from `weight_orig` and the buffer
    `weight_mask` (pruning), from `weight_g`/`weight_v` (the old-style weight_norm), from
    `weight_orig` and the buffers `weight_u`/`weight_v` (the old-style spectral_norm), or a
    user's hook done the same way. Maps each such attribute to the parameter and buffer names
    it is computed from; empty for a module without pre-hooks (a constant attribute and an
    unrelated hook are not a derived weight)."""
    if not module._forward_pre_hooks:
        return {}
    state = [n for n, t in (*module._parameters.items(), *module._buffers.items())
             if t is not None]
    found = {}
    for attr, v in vars(module).items():
        if isinstance(v, torch.Tensor):
            sources = [n for n in state if n.startswith(f"{attr}_")]
            if sources:
                found[attr] = sources
    return found


def _keys(name: str, module: nn.Module, sd_keys: set[str]) -> list[str]:
    local = [n for n, p in module._parameters.items() if p is not None]
    if is_norm(module):
        local += [
            n for n in ("running_mean", "running_var") if getattr(module, n, None) is not None
        ]
    for sources in derived_weights(module).values():  # a mask, u/v: they decide the weight
        local += [n for n in sources if n in module._buffers and n not in local
                  and module._buffers[n].is_floating_point()]
    if parametrize.is_parametrized(module):
        # the parametrized tensors' originals, and the parametrizations' own state (the power
        # iteration vectors of spectral_norm, which decide the weight in eval too)
        held = module.parametrizations
        local += [f"parametrizations.{n}" for n, _ in held.named_parameters()]
        local += [f"parametrizations.{n}" for n, _ in held.named_buffers()]
    full = [f"{name}.{n}" if name else n for n in local]
    return [k for k in full if k in sd_keys]


def make_units(
    model: nn.Module,
    granularity: str = "layer",
    patterns: Sequence[str] | str | None = None,
    bn: str = "with-layer",
    arch: ArchSpec | None = None,
) -> list[Unit]:
    """The units of `model` (see the module docstring for every rule).

    `patterns` may be a list or one comma-separated string. `arch` supplies block/stage
    lists for registered architectures; without it (or when it has none) block and stage fall
    back to top-level children.
    """
    if granularity not in GRANULARITIES:
        raise LayerfastError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    if bn not in BN_POLICIES:
        raise LayerfastError(f"unknown BN policy {bn!r}; choose one of {', '.join(BN_POLICIES)}")
    if isinstance(patterns, str):
        patterns = split_patterns(patterns)
    if patterns is not None and granularity != "layer":
        raise LayerfastError(
            f"custom units (--units) replace the granularity; drop --granularity {granularity}"
        )
    if patterns is not None and not list(patterns):
        raise LayerfastError("--units needs at least one pattern")

    owners = _owners(model)
    if not owners:
        raise LayerfastError("the model has no parameters: nothing to reset")
    feeders = {} if bn == "keep" else _all_feeders(model)
    fed_by: dict[str, list[str]] = {}
    for norm, srcs in feeders.items():
        if norm in owners:
            for src in srcs:
                fed_by.setdefault(src, []).append(norm)

    shown: list[dict[str, str]] = []  # block/stage: the name each selection holds an owner by
    if patterns is not None:
        selections = _pattern_selections(model, owners, list(patterns))
    elif granularity == "layer":
        # Non-norm owners, plus (with-layer/separate) each norm no conv/linear feeds.
        lone = bn != "keep"
        selections = [
            (name or ROOT, [name])
            for name, m in owners.items()
            if not is_norm(m) or (lone and name not in feeders)
        ]
    else:
        fn = None if arch is None else (arch.blocks if granularity == "block" else arch.stages)
        aliases = _aliases(model, owners)
        groups = fn(model) if fn is not None else _children_groups(model, owners, aliases)
        selections, shown = _prefix_selections(owners, groups, aliases)
        if bn != "keep":
            selections = _home_fed_norms(selections, feeders)

    sd_keys = set(model.state_dict().keys())
    order = {name: i for i, name in enumerate(owners)}
    units: list[Unit] = []
    norm_units: set[str] = set()

    def emit(name: str, members: list[str], held: dict[str, str] | None = None) -> None:
        members = sorted(set(members), key=order.__getitem__)
        named = [(held or {}).get(m, m) for m in members]  # as the block holds it (`dec.0`)
        keys = [k for m, n in zip(members, named, strict=True) for k in _keys(n, owners[m], sd_keys)]
        units.append(Unit(name, tuple(named), tuple(keys), bn))

    for i, (name, chosen) in enumerate(selections):
        held = shown[i] if shown else None
        if not chosen:  # an arch's block list naming a module this model lacks
            continue
        members = list(chosen)
        if bn != "keep":
            members += [n for c in chosen for n in fed_by.get(c, [])]
        plain = [m for m in members if not is_norm(owners[m])]
        norms = sorted({m for m in members if is_norm(owners[m])}, key=order.__getitem__)
        if bn == "with-layer":
            emit(name, members, held)
            continue
        if plain:
            emit(name, plain, held)
        elif bn == "keep" and patterns is not None:
            raise LayerfastError(
                f"unit pattern {name!r} selects only normalization layers, which --bn keep "
                "never resets"
            )
        if bn == "separate":
            for n in norms:
                if n not in norm_units:
                    norm_units.add(n)
                    emit(n, [n])

    star = [u for u in units if u.name == "*"]
    if star:  # a top-level module named "*": the mark of the baseline and fullmodel rows
        raise LayerfastError(
            "a module named '*' would make a unit named '*', which results.csv reserves for the "
            "baseline and fullmodel rows; select it with --units '[*]' (a custom unit is named "
            "by its pattern)"
        )
    counts = Counter(u.name for u in units)
    dup = sorted(n for n, c in counts.items() if c > 1)
    if dup:
        raise LayerfastError(f"two units share the name(s) {_listed(dup)}")
    if not units:
        raise LayerfastError(
            "no units: every selected module is a normalization layer kept by --bn keep"
        )
    return units


def tied_across_units(model: nn.Module, units: Sequence[Unit]) -> list[str]:
    """One sentence per pair of units that hold one tensor under two names (tied weights,
    `out.weight = emb.weight`): resetting either unit resets that tensor in both, so neither
    row measures its unit alone. Keys shared under the same name (a normalization layer fed
    by two units, overlapping `--units` patterns) are documented or asked for, and not
    listed here."""
    from layerfast.checkpoints.keymap import canonical_keys

    canon = canonical_keys(model)
    first: dict[str, tuple[str, str]] = {}  # canonical key -> (unit, name) that holds it first
    said: set[tuple[str, str]] = set()
    out = []
    for u in units:
        for k in u.keys:
            c = canon.get(k, k)
            holder = first.setdefault(c, (u.name, k))
            if holder[0] != u.name and holder[1] != k and (holder[0], u.name) not in said:
                said.add((holder[0], u.name))
                out.append(f"units {holder[0]} and {u.name} share one tensor ({holder[1]} is "
                           f"{k}: tied weights): resetting either resets it in both, so neither "
                           "row measures its unit alone")
    return out
