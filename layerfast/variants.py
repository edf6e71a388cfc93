"""Variants: what each evaluated model is, as a set of tensors that replace the final model's.

A `Variant` names what it resets (`unit`, `kind`, `checkpoint`, `seed`, ...) and produces its
replacement tensors only when asked (`overrides()`), so planning hundreds of variants costs no
memory (but for the init check's rerandom draws below, at most one model's state, each kept
until its variant is first asked) and the engine materialises one group at a time. Variants
never modify the model: the final model stays what it is, and every tensor a variant returns
is a fresh CPU tensor with the model's dtype and shape (DESIGN.md §3).

Kinds and their order in `make_variants` (results are reported in this order):

1. `baseline`: the final model, unit `*`, no overrides.
2. per unit, in the order given: `reinit` to each chosen τ (τ = final is legal and equals the
   baseline bit for bit), then `rerandom` for each seed;
3. `fullmodel` per chosen τ: unit `*`, every state-dict key (all parameters and buffers, BN
   statistics included; `num_batches_tracked` excepted) := τ, the paper's reference row —
   except under `--bn keep`, where normalization layers (parameters and running statistics)
   stay at the final model, as they do in every other variant of that policy (DESIGN.md §3);
   so under `keep`, `fullmodel @τ` is not checkpoint τ's own test error;
4. `joint`: several units := τ together; an entry is a list of unit names (one variant per
   chosen τ) or `(names, τ)` (one variant); its unit is the names joined by `+` (a name given
   twice counts once, at its first place);
5. `interp` `(unit, τ, α, σ)`: θ = (1−α)·θ^τ + α·θ^final + σ·N(0, 1) on the unit's keys, with
   θ^final the final checkpoint and the noise on floating *parameters* only (never on BN
   statistics, which noise could make negative); σ > 0 gives one variant per seed, drawn from
   a generator seeded by a hash of (seed, unit, τ): the same standard normal draw, scaled by
   σ, for every α and σ of one seed (common random numbers: a sweep over α or σ varies only
   what it sweeps); computed in float64, then cast. BN statistics are interpolated like
   weights (they are not the interpolated network's own statistics).
   Integer and bool tensors of the unit (`num_batches_tracked`, index buffers) cannot be
   interpolated and stay at the final model; α and σ must be finite, and σ's noise must fit
   the unit's parameter dtype (`interp.sigma_limit`).

Re-randomization (`rerandom_draw`): each module of the unit is deep-copied alone to the CPU and
re-drawn there under `torch.random.fork_rng`, the CPU generator seeded with a 63-bit SHA-256
hash of ("layerfast-rerandom", seed, unit name, module name), Python's `random` and numpy's
global generator seeded with it too (`layerfast.rng`: a `reset_parameters` may draw from
them): reproducible per seed, the same on every device, independent of the order or number of
units, and the caller's RNG states are untouched. The draw is the architecture's init rule
(`arch.init(module)`) when it has one, else the module's `reset_parameters()`; normalization
layers also get `reset_running_stats()`.
Only each module's own parameters and buffers are taken (its children are modules of the unit
in their own right). A draw must never equal θ⁰: when τ = 0 is available and any drawn tensor
with more than one element and a non-constant θ⁰ equals θ⁰ exactly, the module is redrawn with
the next derived seed (seed + 1, + 2, ...). Constant θ⁰ tensors (BN weight 1, bias 0, zero
biases) come from deterministic rules that no seed can change, so they are not compared.

Whether the rule IS the model's initialization cannot be known from the model object (a user
factory may apply any init; a torchvision ResNet built by one is drawn with PyTorch's default
conv init, 2.45x narrower than torchvision's kaiming-normal fan_out). When τ = 0 exists,
`make_variants` draws each unit once (the first seed) and warns where the draw does not look
like θ⁰ (`init_mismatches`); that draw is the one the variant evaluates, handed over on its
first `overrides()`.

Each (unit, seed) draw is made once per run (`_Draws`): the init check's is evaluated, and
when θ⁰ exists every draw is measured as `distances` measures it when it is made
(`Variant.draw_stats`), so distances.csv's rerandom rows do not draw it a third time. Kept
between the three: the check's draws (≤ one model) until evaluated, a few floats per drawn
tensor, and θ⁰ of the unit drawn last.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from layerfast.checkpoints import CheckpointDir
from layerfast.checkpoints.keymap import canonical_keys, is_tolerated_missing
from layerfast.errors import LayerfastError, warn
from layerfast.interp import sigma_limit, sigma_reach_note
from layerfast.models.init import NORM_TYPES
from layerfast.options import MAX_SEEDS, integers, is_int
from layerfast.rng import seeded_host_generators
from layerfast.units import derived_weights

__all__ = ["Variant", "derive_seed", "init_mismatches", "make_variants", "rerandom_draw"]

RESETS = ("reinit", "rerandom", "fullmodel")
_MAX_REDRAWS = 8


class UnitLike(Protocol):
    """`layerfast.units.Unit`: name, module names, state-dict keys (and optionally `bn`, the BN
    policy the units were made under; absent means `with-layer`)."""

    @property
    def name(self) -> str: ...
    @property
    def modules(self) -> tuple[str, ...]: ...
    @property
    def keys(self) -> tuple[str, ...]: ...


@dataclass
class Variant:
    """One evaluated model: the final model with `keys` replaced by `overrides()`."""

    unit: str
    kind: str
    checkpoint: int | None
    seed: int | None
    alpha: float | None = None
    sigma: float | None = None
    keys: tuple[str, ...] = ()
    _load: Callable[[], dict[str, torch.Tensor]] | None = field(
        default=None, repr=False, compare=False
    )
    _stats: Callable[[CheckpointDir], Mapping[str, tuple[float, float]] | None] | None = field(
        default=None, repr=False, compare=False
    )

    def overrides(self) -> dict[str, torch.Tensor]:
        """Key -> fresh CPU tensor (model dtype and shape), read or drawn now, not cached
        (but for a rerandom draw that `make_variants`' init check made: handed over once)."""
        return {} if self._load is None else self._load()

    def draw_stats(self, ckpts: CheckpointDir | None) -> Mapping[str, tuple[float, float]] | None:
        """A rerandom variant's draw as `distances` measures it against θ⁰ of `ckpts`
        (`layerfast.distances.draw_stats`), when it has been drawn already; else None."""
        return None if self._stats is None or ckpts is None else self._stats(ckpts)

    @property
    def label(self) -> str:
        """Short human name: `reinit layer1.0 @3`, `rerandom fc seed 1`, `fullmodel @0`."""
        parts = [self.kind] if self.unit == "*" else [self.kind, self.unit]
        if self.checkpoint is not None:
            parts.append(f"@{self.checkpoint}")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        if self.sigma is not None:
            parts.append(f"sigma={self.sigma:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return " ".join(parts)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a SHA-256 hash of `parts` (JSON-encoded): stable across runs."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------- re-randomization


def _cpu_copy(module: nn.Module) -> nn.Module:
    """Deep copy of `module` whose parameters and buffers are contiguous CPU clones (no GPU
    allocation). Contiguous whatever the live model's layout: init functions fill a tensor in
    memory order, so a channels_last copy (the engine's layout for bf16 on CUDA, or `--layout
    channels_last`) drew other numbers for the same seed, and the rows evaluated other weights
    than distances.csv measured."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(_contiguous_cpu(p.detach()), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = _contiguous_cpu(b.detach())
    return copy.deepcopy(module, memo)


def _contiguous_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU clone of a strided tensor; other layouts (sparse) have no memory format
    to choose and are cloned as they are."""
    if t.layout != torch.strided:
        return t.to("cpu", copy=True)
    return t.to("cpu", copy=True, memory_format=torch.contiguous_format)


def _redraw(module: nn.Module, init: Callable[[nn.Module], None] | None, where: str) -> None:
    if init is not None:
        init(module)
    else:
        resets = (getattr(module, n, None) for n in ("reset_parameters", "_reset_parameters"))
        reset = next((r for r in resets if callable(r)), None)
        if reset is not None:
            reset()
        elif any(p is not None for p in module._parameters.values()):
            raise LayerfastError(
                f"cannot re-randomize {where} ({type(module).__name__}): it has no "
                "reset_parameters() and the architecture has no init rule."
            )
    stats = getattr(module, "reset_running_stats", None)
    if callable(stats):
        stats()


def _equals_theta0(draw: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> bool:
    for k, t in draw.items():
        t0 = theta0.get(k)
        if t0 is None or t.numel() <= 1 or t0.shape != t.shape:
            continue
        flat = t0.reshape(-1)
        if bool((flat == flat[0]).all()):  # constant θ⁰: a deterministic rule, not a draw
            continue
        if torch.equal(t, t0.to(t.dtype)):
            return True
    return False


def _init_rule(arch: Any) -> Callable[[nn.Module], None] | None:
    init = getattr(arch, "init", None) if arch is not None else None
    return init if callable(init) else None


def check_redrawable(
    model: nn.Module, unit: UnitLike, arch: Any = None
) -> list[tuple[str, nn.Module, str, str]]:
    """(module name, module, key prefix, where) of each of `unit`'s modules, after checking
    that a fresh draw of the unit can be made: run by `make_variants` before any evaluation,
    so that a unit that cannot be re-randomized (a parameter owned by the model itself, such
    as a ViT's class token; a parametrized layer) is refused up front, not mid-pass."""
    init = _init_rule(arch)
    found, owned = [], set()
    for mod_name in unit.modules:
        try:
            live = model.get_submodule(mod_name)
        except AttributeError:
            raise LayerfastError(
                f"unit {unit.name!r}: the model has no module {mod_name!r}."
            ) from None
        prefix = f"{mod_name}." if mod_name else ""
        where = f"module {mod_name or '(root)'} of unit {unit.name!r}"
        if getattr(live, "parametrizations", None) is not None:
            # reset_parameters() would write into the computed `weight` (lost), and a fresh
            # draw has to pass through each parametrization's right_inverse (and spectral
            # norm's power iteration): not done, so said up front rather than drawn wrong.
            raise LayerfastError(
                f"cannot re-randomize {where}: its {', '.join(live.parametrizations)} is "
                "parametrized (weight_norm, spectral_norm, ...); reset it with "
                "--reset reinit,fullmodel, or remove the parametrization"
            )
        derived = ", ".join(derived_weights(live))
        if derived:
            # reset_parameters() would write into the attribute the hook recomputes from the
            # tensors it left alone (weight_orig, weight_g/weight_v): the trained weight again
            raise LayerfastError(
                f"cannot re-randomize {where}: a forward pre-hook derives its {derived} from "
                "other tensors (pruning, or the old-style weight_norm / spectral_norm), which a "
                "redraw would not reach; reset it with --reset reinit,fullmodel, or remove the "
                "hook (torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm, ...)"
            )
        resettable = callable(getattr(live, "reset_parameters", None)) or callable(
            getattr(live, "_reset_parameters", None)
        )
        if init is None and not resettable and any(
            p is not None for p in live._parameters.values()
        ):
            raise LayerfastError(
                f"cannot re-randomize {where} ({type(live).__name__}): it has no "
                "reset_parameters() and the architecture has no init rule; reset it with "
                "--reset reinit,fullmodel, or leave it out of --units"
            )
        owned |= {prefix + n for n, t in [*live._parameters.items(), *live._buffers.items()]
                  if t is not None}  # fmt: skip
        found.append((mod_name, live, prefix, where))
    missing = [k for k in unit.keys if k not in owned]
    if missing:
        raise LayerfastError(
            f"unit {unit.name!r}: cannot re-randomize {', '.join(missing[:5])}: not owned "
            "directly by any of the unit's modules."
        )
    return found


@torch.no_grad()
def rerandom_draw(
    model: nn.Module,
    unit: UnitLike,
    seed: int,
    arch: Any = None,
    theta0: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A fresh draw of `unit`'s keys from its init distribution (module docstring), on CPU.

    `theta0`, when given, holds θ⁰ for the unit's keys; the draw is then guaranteed to differ.
    The model is not modified and the global RNG state is unchanged afterwards.
    """
    init = _init_rule(arch)
    wanted = set(unit.keys)
    out: dict[str, torch.Tensor] = {}
    for mod_name, live, prefix, where in check_redrawable(model, unit, arch):
        base = derive_seed("layerfast-rerandom", seed, unit.name, mod_name)
        for attempt in range(_MAX_REDRAWS):
            m = _cpu_copy(live)
            seed_k = (base + attempt) % 2**63
            with torch.random.fork_rng(devices=[]), seeded_host_generators(seed_k):
                torch.random.default_generator.manual_seed(seed_k)
                _redraw(m, init, where)
            own = list(m._parameters.items()) + list(m._buffers.items())
            draw = {
                prefix + n: t.detach() for n, t in own if t is not None and prefix + n in wanted
            }
            if theta0 is None or not _equals_theta0(draw, theta0):
                break
        else:
            raise LayerfastError(
                f"re-randomizing {where} reproduces θ⁰ exactly for {_MAX_REDRAWS} seeds: its "
                "init rule does not depend on the random seed."
            )
        out.update(draw)
    # A tied tensor (`dec.weight = enc.weight`) is one tensor: when the unit holds several of its
    # names, each module drew its own value for it; the draw under the canonical name (the
    # first `named_parameters()` gives) stands for all of them, as the tensor can hold only one.
    canon = canonical_keys(model)
    for k in unit.keys:
        c = canon.get(k, k)
        if c != k and c in out:
            out[k] = out[c]
    return {k: out[k].contiguous() for k in unit.keys}


#: `init_mismatches`: a tensor's spread is compared only from this many elements (the sample
#: standard deviation's relative error is then ~2%, so a correct rule stays well inside the band)
_CHECK_MIN_NUMEL = 1024
#: ... and is a mismatch outside this ratio band (fan_in vs fan_out of a 2x-wide conv is 1.41,
#: PyTorch's default conv init vs torchvision's kaiming-normal fan_out 2.45)
_CHECK_STD_BAND = (0.8, 1.25)
_CHECK_SAMPLE = 65536  # elements of a tensor the spread is estimated from


def init_mismatches(
    draw: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]
) -> list[str]:
    """Where a rerandom draw does not look like θ⁰: one line per tensor, empty when all agree.

    Re-randomization means a fresh draw from the distribution the model was initialized from
    (DESIGN.md §3). layerfast can only draw from a rule (the registered architecture's, else each
    module's `reset_parameters()`); when the checkpoints' θ⁰ came from another one (a user model
    whose constructor applies its own init, a torchvision ResNet built by a user factory, timm's
    zero-init of the last BN of each block), every rerandom row silently measures another
    distribution. θ⁰ is one sample of the true one, so it is checked against the draw:
    a constant tensor must be the same constant (zero-init residual BN, zero biases), a
    non-constant one must stay non-constant, and from `_CHECK_MIN_NUMEL` elements the spread
    must agree within `_CHECK_STD_BAND`. A shift of the mean by more than a quarter of θ⁰'s
    spread counts too."""
    out = []
    for k, d in draw.items():
        t0 = theta0.get(k)
        if t0 is None or t0.shape != d.shape or d.numel() < 2 or not d.is_floating_point():
            continue
        # NumPy, single-threaded: on a loaded CPU torch's threaded reductions were 100x slower
        a = d.detach().reshape(-1).float().numpy()
        b = t0.detach().reshape(-1).to(d.dtype).float().numpy()
        const_a, const_b = bool(a.min() == a.max()), bool(b.min() == b.max())
        if const_a and const_b:
            if a[0] != b[0]:
                out.append(f"{k}: θ⁰ is all {b[0]:g}, the draw all {a[0]:g}")
        elif const_a or const_b:
            what = (f"the draw is all {a[0]:g}, θ⁰ is not (std {b.std(dtype='f8'):.3g})"
                    if const_a else
                    f"θ⁰ is all {b[0]:g}, the draw is not (std {a.std(dtype='f8'):.3g})")
            out.append(f"{k}: {what}")
        elif a.size >= _CHECK_MIN_NUMEL:
            # the elements are i.i.d. under any init rule, so a prefix is a fair sample: the
            # statistics of a 2.4M-element conv cost no more than those of a 64K one
            pa, pb = a[:_CHECK_SAMPLE], b[:_CHECK_SAMPLE]
            if pa.min() == pa.max() or pb.min() == pb.max():
                pa, pb = a, b  # a constant prefix (a zero-initialized first block): no sample
            sa, ma = float(pa.std(dtype="f8", ddof=1)), float(pa.mean(dtype="f8"))
            sb, mb = float(pb.std(dtype="f8", ddof=1)), float(pb.mean(dtype="f8"))
            lo, hi = _CHECK_STD_BAND
            if not lo <= sa / sb <= hi or abs(ma - mb) > 0.25 * sb:
                out.append(f"{k}: draw mean {ma:.3g} std {sa:.3g}, θ⁰ mean {mb:.3g} std {sb:.3g}")
    return out


def _warn_init_mismatch(
    model: nn.Module,
    units: Sequence[UnitLike],
    ckpts: CheckpointDir,
    arch: Any,
    seed: int,
    draws: _Draws,
) -> None:
    """Draw each unit once (`seed`) and say, on stderr, where it does not look like θ⁰.

    The draw is the one the (unit, `seed`) rerandom variant evaluates (`_Draws.check`, never
    equal to θ⁰), kept for it: the check costs no draw of its own."""
    # parameters only: running statistics are reset, not drawn, and a θ⁰ saved after a
    # train-mode forward holds updated ones without saying anything about the init
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    lines: list[str] = []
    for u in units:
        if not any(k in params for k in u.keys):
            continue
        draw = {k: t for k, t in draws.check(u, seed).items() if k in params}
        theta0 = ckpts.tensors(0, tuple(draw))
        lines += [f"{u.name}: {m}" for m in init_mismatches(draw, theta0)]
    if lines:
        rule = "the architecture's init rule" if _init_rule(arch) else (
            "each module's reset_parameters() (PyTorch's default init)"
        )
        shown = "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
        warn(
            f"re-randomization draws from {rule}, but the checkpoints' θ⁰ "
            f"(τ=0) does not look drawn from it: {shown}. The rerandom rows then measure "
            "another distribution than the model's initialization; use a registered --arch "
            "whose init the model was built with (e.g. resnet50 for a torchvision ResNet-50), "
            "or compare reinit@0 instead."
        )


# ----------------------------------------------------------------------------- make_variants


class _Ref:
    """Shapes and dtypes of the model's state dict, and which keys are parameters."""

    def __init__(self, model: nn.Module) -> None:
        sd = model.state_dict()
        self.meta = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        self.params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        #: every name of a tensor -> its canonical name (tied weights have several names)
        self.canon = canonical_keys(model)

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins for `CheckpointDir.validate` (holds no model memory)."""
        # one object per tied tensor, so validation sees the ties (`keymap.tied_keys`)
        by_canon: dict[str, torch.Tensor] = {}
        return {
            k: by_canon.setdefault(self.canon.get(k, k), torch.empty(s, dtype=d, device="meta"))
            for k, (s, d) in self.meta.items()
        }

    def conform(self, tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        out = {}
        for k, t in tensors.items():
            shape, dtype = self.meta[k]
            if tuple(t.shape) != shape:
                raise LayerfastError(f"{what}: {k} has shape {list(t.shape)}, model {list(shape)}.")
            out[k] = t.to(dtype=dtype).contiguous()
        return out


def _chosen(ckpts: CheckpointDir, checkpoints: str | Iterable[int]) -> list[int]:
    if isinstance(checkpoints, str):
        if checkpoints != "all":
            raise LayerfastError(
                f"checkpoints must be 'all' or a list of labels, not {checkpoints!r}."
            )
        return list(ckpts.labels)
    chosen = list(dict.fromkeys(int(c) for c in checkpoints))
    for c in chosen:
        ckpts.check_label(c)
    return chosen


def _bn_policy(units: Sequence[UnitLike]) -> str:
    """The BN policy the units were made under (`Unit.bn`; `with-layer` for unit objects that
    do not say). One analysis has one policy: units made under different ones are refused, since
    `fullmodel` could not honour both."""
    policies = {getattr(u, "bn", "with-layer") for u in units}
    if len(policies) > 1:
        raise LayerfastError(
            f"units made under different BN policies ({', '.join(sorted(policies))}): make them "
            "with one make_units(bn=...) call."
        )
    return policies.pop() if policies else "with-layer"


def _norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys owned by normalization layers (parameters and buffers): what `--bn keep`
    leaves at the final model in `fullmodel`.

    Every name counts: a normalization module registered twice (`self.norm2 = self.bn`) has
    its tensors in the state dict under both names, and a key left out here is loaded from
    checkpoint τ into the one shared module, resetting it after all. The state of a parametrized
    norm's `parametrizations` container counts too (`ln.parametrizations.weight.original0`
    under `weight_norm`): it is that layer's weight, which `units` never resets under keep."""
    out: set[str] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, NORM_TYPES):
            prefix = f"{name}." if name else ""
            own = list(m._parameters.items()) + list(m._buffers.items())
            out |= {prefix + n for n, t in own if t is not None}
            held = m._modules.get("parametrizations")  # not other children: their own units
            if held is not None and parametrize.is_parametrized(m):
                out |= set(held.state_dict(prefix=f"{prefix}parametrizations.", keep_vars=True))
    return out


def _unit_map(units: Sequence[UnitLike]) -> dict[str, UnitLike]:
    out: dict[str, UnitLike] = {}
    for u in units:
        if u.name in out:
            raise LayerfastError(f"two units are named {u.name!r}.")
        out[u.name] = u
    return out


class _Draws:
    """The rerandom draws of one `make_variants` call: each (unit, seed) drawn once per run.

    A draw is made when a variant is first evaluated (`take`), or by the init check
    (`check`), which draws each unit's first seed before any evaluation; the check's draws are
    kept (`_held`) until their variant asks for them, then let go, at most one model's state
    in all (units are disjoint, so one seed of every unit is at most one model). When θ⁰
    exists, every draw is measured as `distances` would measure it (a few floats per tensor,
    kept), so distances.csv's rerandom rows need no draw of their own: before, each draw was
    made three times (init check, evaluation, distances), the same numbers each time.
    """

    def __init__(
        self, model: nn.Module, ref: _Ref, arch: Any, ckpts: CheckpointDir | None
    ) -> None:
        self.model, self.ref, self.arch = model, ref, arch
        self.ckpts = ckpts if ckpts is not None and 0 in ckpts.labels else None
        self._held: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._room = sum(math.prod(shape) * dtype.itemsize for shape, dtype in ref.meta.values())
        self._stats: dict[tuple[str, int], Mapping[str, tuple[float, float]]] = {}
        self._params: dict[str, nn.Parameter] | None = None
        # θ⁰ of the unit drawn last, as read and in float64 (`_theta0`)
        self._unit0: tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def _theta0(self, u: UnitLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ⁰ of `u`'s keys, and of its parameters in float64 (what `distances` measures a
        draw against): read once for a unit's consecutive draws (its seeds), one unit kept."""
        from layerfast.distances import float64_origin, param_keys  # it imports this module

        assert self.ckpts is not None
        if self._unit0 is None or self._unit0[0] != u.name:
            self._unit0 = None  # the last unit's θ⁰ goes before this one's is read
            if self._params is None:
                self._params = dict(self.model.named_parameters(remove_duplicate=False))
            theta0 = self.ckpts.tensors(0, u.keys)
            self._unit0 = (u.name, theta0, float64_origin(theta0, param_keys(self._params, u)))
        return self._unit0[1], self._unit0[2]

    def _draw(self, u: UnitLike, seed: int) -> dict[str, torch.Tensor]:
        if self.ckpts is None:
            return self.ref.conform(
                rerandom_draw(self.model, u, seed, self.arch), f"rerandom {u.name}"
            )
        from layerfast.distances import draw_stats  # it imports this module

        theta0, theta0_64 = self._theta0(u)
        out = self.ref.conform(
            rerandom_draw(self.model, u, seed, self.arch, theta0), f"rerandom {u.name}"
        )
        if (u.name, seed) not in self._stats:
            self._stats[(u.name, seed)] = draw_stats(out, theta0_64)
        return out

    def check(self, u: UnitLike, seed: int) -> dict[str, torch.Tensor]:
        """The draw the variant (u, seed) will evaluate, for the init check; kept for it."""
        out = self._held.get((u.name, seed))
        if out is None:
            out = self._draw(u, seed)
            size = sum(t.numel() * t.element_size() for t in out.values())
            if size <= self._room:
                self._room -= size
                self._held[(u.name, seed)] = out
        return out

    def take(self, u: UnitLike, seed: int) -> dict[str, torch.Tensor]:
        """The draw of (u, seed) for evaluation: the check's, handed over once, else a new one."""
        out = self._held.pop((u.name, seed), None)
        if out is None:
            return self._draw(u, seed)
        self._room += sum(t.numel() * t.element_size() for t in out.values())
        return out

    def stats(
        self, u: UnitLike, seed: int, ckpts: CheckpointDir
    ) -> Mapping[str, tuple[float, float]] | None:
        """`distances.draw_stats` of (u, seed)'s draw against θ⁰ of `ckpts`, if made already."""
        return self._stats.get((u.name, seed)) if ckpts is self.ckpts else None


def make_variants(
    model: nn.Module,
    units: Sequence[UnitLike],
    ckpts: CheckpointDir | None,
    arch: Any = None,
    reset: str | Iterable[str] = RESETS,
    checkpoints: str | Iterable[int] = "all",
    seeds: int | Iterable[int] = (1,),
    joint: Sequence[Sequence[str] | tuple[Sequence[str], int]] | None = None,
    interp: Sequence[tuple[str, int, float, float]] | None = None,
) -> list[Variant]:
    """Every variant of one analysis, baseline first (order: module docstring). `seeds`: the
    rerandom seeds, or a count n for seeds 1..n (as `analyze`'s).

    Checks everything checkable up front (labels exist, τ = 0 present for re-initialization to
    init, keys and shapes of the checkpoints used match the model) so a bad request fails
    before any evaluation. Reads no tensor data, except with rerandom and a τ = 0 checkpoint:
    each unit is then drawn once (the first seed) and compared with θ⁰ (`init_mismatches`), and
    a draw that does not look like the model's initialization is a warning on stderr.
    """
    reset = tuple(r.strip() for r in reset.split(",")) if isinstance(reset, str) else tuple(reset)
    bad = [r for r in reset if r not in RESETS]
    if bad:
        raise LayerfastError(f"unknown reset kind {bad[0]!r}: choose from {', '.join(RESETS)}.")
    if is_int(seeds) and not 1 <= seeds <= MAX_SEEDS:  # a count, as analyze's
        raise LayerfastError(f"seeds as a count must lie in 1..{MAX_SEEDS}; got {seeds}")
    seeds = integers(range(1, int(seeds) + 1) if is_int(seeds) else seeds, "seeds")
    if ckpts is not None and not isinstance(ckpts, CheckpointDir):
        raise LayerfastError(
            f"ckpts must be a CheckpointDir (layerfast.checkpoints.CheckpointDir(path) over a "
            f"directory of checkpoint files) or None; got a {type(ckpts).__name__}")
    if "rerandom" in reset and not seeds:  # else no rerandom variant, without a word
        raise LayerfastError("rerandom needs at least one seed; seeds is empty.")
    ref = _Ref(model)
    by_name = _unit_map(units)
    needs_ckpts = [r for r in reset if r != "rerandom"] + (["joint"] if joint else [])
    needs_ckpts += ["interp"] if interp else []
    if ckpts is None:
        if needs_ckpts:
            raise LayerfastError(
                f"{needs_ckpts[0]} needs a checkpoint directory (--ckpts); with only the final "
                "model use --reset rerandom."
            )
        chosen: list[int] = []
    else:
        if is_int(checkpoints):  # one label
            checkpoints = [int(checkpoints)]
        elif not isinstance(checkpoints, str):  # may be a generator: read it once
            checkpoints = integers(checkpoints, "checkpoints")
        asks_init = checkpoints == "all" or (isinstance(checkpoints, list) and 0 in checkpoints)
        if "reinit" in reset and asks_init and 0 not in ckpts.labels:
            raise LayerfastError(
                f"re-initialization to init needs τ=0; found labels "
                f"{', '.join(map(str, ckpts.labels))} in {ckpts.path}. Pass --checkpoints with "
                "the labels you want, or --reset rerandom."
            )
        chosen = _chosen(ckpts, checkpoints)
        empty = [r for r in reset if r in ("reinit", "fullmodel")]
        if not chosen and empty:  # else a results table of the baseline alone, as if done
            raise LayerfastError(
                f"{empty[0]}: no checkpoints to reset to (the list of checkpoints is empty); "
                "name labels such as 0,1,10, or 'all'."
            )
    has_tau0 = ckpts is not None and 0 in ckpts.labels

    def from_ckpt(label: int, keys: tuple[str, ...]) -> Callable[[], dict[str, torch.Tensor]]:
        assert ckpts is not None
        return lambda: ref.conform(ckpts.tensors(label, keys), f"{ckpts.files[label]}")

    draws = _Draws(model, ref, arch, ckpts)

    def rerandom(u: UnitLike, k: tuple[str, ...], seed: int) -> Variant:
        return Variant(u.name, "rerandom", None, seed, keys=k,
                       _load=lambda: draws.take(u, seed),
                       _stats=lambda c: draws.stats(u, seed, c))

    out = [Variant("*", "baseline", None, None)]
    for u in units:
        k = tuple(u.keys)
        if "reinit" in reset:
            out += [
                Variant(u.name, "reinit", t, None, keys=k, _load=from_ckpt(t, k)) for t in chosen
            ]
        if "rerandom" in reset:
            check_redrawable(model, u, arch)
            out += [rerandom(u, k, s) for s in seeds]
    if "fullmodel" in reset:
        kept = _norm_keys(model) if _bn_policy(units) == "keep" else set()
        every = tuple(k for k in ref.meta if not is_tolerated_missing(k) and k not in kept)
        for tau in chosen:
            out.append(
                Variant("*", "fullmodel", tau, None, keys=every, _load=from_ckpt(tau, every))
            )
    for entry in joint or ():
        names, taus = _joint_entry(entry, chosen, ckpts)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LayerfastError(f"joint reset: no unit named {missing[0]!r}.")
        if not taus:
            raise LayerfastError(
                f"joint reset {'+'.join(names)}: no checkpoints to reset to (the list of "
                "checkpoints is empty); name labels such as 0,1,10, or 'all'."
            )
        keys = tuple(dict.fromkeys(k for n in names for k in by_name[n].keys))
        for tau in taus:
            out.append(
                Variant("+".join(names), "joint", tau, None, keys=keys, _load=from_ckpt(tau, keys))
            )
    for entry in interp or ():
        assert ckpts is not None
        unit_name, tau, alpha, sigma = _interp_entry(entry)
        if unit_name not in by_name:
            raise LayerfastError(f"interp: no unit named {unit_name!r}.")
        ckpts.check_label(tau)
        if not math.isfinite(alpha):
            raise LayerfastError(f"interp: alpha must be a finite number, got {alpha}.")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise LayerfastError(f"interp: sigma must be a finite number >= 0, got {sigma}.")
        if sigma > 0 and not seeds:
            raise LayerfastError(
                f"interp {unit_name} with sigma > 0 needs at least one seed; seeds is empty."
            )
        u = by_name[unit_name]
        _check_sigma_fits(ref, u, sigma)
        for s in seeds if sigma > 0 else [None]:
            out.append(
                Variant(
                    u.name, "interp", tau, s, alpha, sigma, tuple(u.keys),
                    _interp(ckpts, ref, u, tau, alpha, sigma, s),
                )
            )
    if ckpts is not None:  # keys/shapes of every file a variant reads, before any evaluation
        used = {v.checkpoint for v in out if v.checkpoint is not None} | {ckpts.final}
        used |= {0} & set(ckpts.labels)  # θ⁰ for the rerandom "never equal" check
        ckpts.validate(ref.meta_state(), labels=sorted(used), check_finite=False)
        if "rerandom" in reset and has_tau0:  # the draws' distribution against θ⁰'s
            _warn_init_mismatch(model, units, ckpts, arch, seeds[0], draws)
    return out


def _joint_entry(
    entry: Sequence[str] | tuple[Sequence[str], int], chosen: list[int], ckpts: CheckpointDir | None
) -> tuple[list[str], list[int]]:
    assert ckpts is not None
    if isinstance(entry, str):  # iterating it would read unit names character by character
        raise LayerfastError(
            "joint reset: an entry is a list of unit names, or (names, τ), not the string "
            f"{entry!r}; write {entry.split('+')!r}."
        )
    if not isinstance(entry, Sequence | AbstractSet | Mapping) and isinstance(
            entry, Iterable) and getattr(entry, "ndim", 1) == 1:
        entry = list(entry)  # ordered all the same: a numpy array of names, a generator
    if not isinstance(entry, Sequence):  # a set has no order (the unit's name) nor indexing
        raise LayerfastError(
            "joint reset: an entry is a list of unit names, or (names, τ), not a "
            f"{type(entry).__name__} ({entry!r})."
        )
    if len(entry) == 2 and not isinstance(entry[0], str) and isinstance(entry[0], Iterable) \
            and not is_int(entry[1]):  # (names, 1.0) read as two unit names hid the bad τ
        raise LayerfastError(
            f"joint reset {'+'.join(map(str, entry[0]))}: τ must be a checkpoint label (a whole "
            f"number); got {entry[1]!r}."
        )
    tau_given = len(entry) == 2 and is_int(entry[1])  # a 0-d tensor too, never a bool
    if tau_given and not isinstance(entry[0], str):
        names, tau = _once(entry[0]), int(entry[1])  # type: ignore[arg-type]
        ckpts.check_label(tau)
        return names, [tau]
    names = _once(str(n) for n in entry)
    if not names:
        raise LayerfastError("joint reset: an empty list of units.")
    return names, chosen


def _once(names: Iterable[Any]) -> list[Any]:
    """Unit names without repeats, first-seen order: a joint reset resets a set of units, so
    `["fc1", "fc2", "fc1"]` is the variant `fc1+fc2` (it was named `fc1+fc2+fc1`, a unit no
    other request spells, over the same keys), as `--units` and `--reset` drop repeats."""
    return list(dict.fromkeys(names))


def _interp_entry(entry: Any) -> tuple[Any, int, float, float]:
    """One `interp` request `(unit, τ, α, σ)` with τ a plain int and α, σ plain floats.

    Checked, not converted blindly: `int(τ)` read τ = 1.7 (or True) as the label 1, so the
    rows of checkpoint 1 came back for a label that does not exist (`joint`'s `(names, τ)` and
    `checkpoints` refuse such values), and a σ given as a string was a bare TypeError from
    `sigma >= 0`, a short tuple a ValueError from unpacking. Numbers as a notebook holds them
    (numpy scalars, 0-d tensors) are taken; strings and bools are not numbers here."""
    if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 4:
        raise LayerfastError(f"interp: an entry is (unit, τ, alpha, sigma); got {entry!r}.")
    unit_name, tau, alpha, sigma = entry
    if not is_int(tau):
        raise LayerfastError(
            f"interp {unit_name}: τ must be a checkpoint label (a whole number); got {tau!r}."
        )
    return unit_name, int(tau), _number(alpha, f"interp {unit_name}: alpha"), _number(
        sigma, f"interp {unit_name}: sigma")


def _check_sigma_fits(ref: _Ref, u: UnitLike, sigma: float) -> None:
    """Refuse a σ whose noise can overflow the dtype of a parameter it lands on: the noise is
    drawn in float64 and cast, so there it became Inf, and the variant ran on Inf weights."""
    noisy = {ref.meta[k][1] for k in u.keys if k in ref.params and k in ref.meta}
    noisy = {d for d in noisy if d.is_floating_point}
    for dtype in sorted(noisy, key=lambda d: sigma_limit(d)):
        if sigma > sigma_limit(dtype):
            raise LayerfastError(f"interp {u.name}: sigma {sigma:g} is too large for its "
                                 f"weights: {sigma_reach_note(dtype)}.")


def _number(v: Any, what: str) -> float:
    """`v` as a float: an int or float, a numpy scalar or a 0-d tensor; never a bool or str."""
    if not isinstance(v, bool | str | bytes) and getattr(v, "ndim", 0) == 0 and str(
            getattr(v, "dtype", "")) not in ("bool", "torch.bool"):
        try:
            return float(v)
        except (TypeError, ValueError):
            pass
    raise LayerfastError(f"{what} must be a number; got {v!r}.")


def _interp(
    ckpts: CheckpointDir,
    ref: _Ref,
    u: UnitLike,
    tau: int,
    alpha: float,
    sigma: float,
    seed: int | None,
) -> Callable[[], dict[str, torch.Tensor]]:
    keys = tuple(u.keys)

    def load() -> dict[str, torch.Tensor]:
        a, f = ckpts.tensors(tau, keys), ckpts.tensors(ckpts.final, keys)
        gen = None
        if sigma > 0:
            gen = torch.Generator().manual_seed(
                derive_seed("layerfast-interp", seed, u.name, tau)  # not α, σ: module docstring
            )
        out: dict[str, torch.Tensor] = {}
        noise: dict[str, torch.Tensor] = {}
        for k in keys:
            if not a[k].is_floating_point():  # an integer/bool buffer has no line between two
                out[k] = f[k]  # values: it stays at the final model (α = 1 is the final model)
                continue
            t = (1.0 - alpha) * a[k].double() + alpha * f[k].double()
            if gen is not None and k in ref.params:
                # a tied tensor is one tensor: one draw of noise for all its names in the unit
                c = ref.canon.get(k, k)
                if c not in noise:
                    noise[c] = torch.randn(t.shape, generator=gen, dtype=torch.float64)
                t = t + sigma * noise[c]
            out[k] = t
        return ref.conform(out, f"interp {u.name}")

    return load
