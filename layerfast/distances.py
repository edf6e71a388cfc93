"""How far each unit moved from its initialization: the paper's Fig. 1b/c (DESIGN.md §5).

For every unit and every chosen τ, over the unit's *parameters* (weights and biases, not BN
running statistics: buffers are not trained by gradient descent and their scale is unrelated
to the weights', so they would swamp the distances of a conv+BN unit):

    l2     = ‖θ^τ − θ^0‖₂
    l2_rel = ‖θ^τ − θ^0‖₂ / ‖θ^0‖₂   (NaN when ‖θ^0‖₂ = 0, e.g. a zero-initialized unit)
    linf   = ‖θ^τ − θ^0‖∞

all accumulated in float64 whatever the checkpoint dtype; a non-finite difference shows as
NaN/inf in every column (never as linf = 0). A parameter shared by several modules of one unit
(tied weights) counts once. Rows with checkpoint
`rerandom:<seed>` compare a fresh draw (exactly the one the rerandom variant uses) with θ^0:
a rerandom `Variant` of `make_variants` is measured when it is drawn (`draw_stats`, the same
operations as a row's), so its row here costs no second draw; a seed is drawn here.

Without τ = 0 nothing here is defined: asking for τ rows is then a LayerfastError, asking for
rerandom rows only returns an empty frame with the columns (so a rerandom-only analysis of a
directory holding just the final model still writes a well-formed distances.csv).
Memory: the tensors of one unit at two checkpoints at a time, plus θ^0 in float64 and one
float64 difference tensor.

Speed (docs/decisions.md, results/report): θ^0's float64 copy and norm are computed once per
unit, not once per row, and the float64 arithmetic runs on ONE intra-op thread. The tensors are
small (a layer, a block), so a second thread gains nothing, and on a busy machine OpenMP's
barriers made each row ~30x slower (52 ms against 1.8 ms per row, measured). One thread also
makes the sums independent of the machine's thread count: torch splits a reduction of more than
32,768 elements across threads, which changed l2/l2_rel in the last bit between 1 and 2 threads.
The rerandom draws themselves run on the caller's threads, as the engine's do, so a row
measures exactly the draw that was evaluated; the sums of a draw measured when it was made
(`draw_stats`) run on one thread too, so they are the numbers a row computed here would hold.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.variants import UnitLike, Variant, rerandom_draw

__all__ = ["COLUMNS", "distances", "draw_stats", "float64_origin", "param_keys"]

COLUMNS: list[str] = ["unit", "checkpoint", "l2", "l2_rel", "linf"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside the block (module docstring), restored after."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _float64(theta0: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ^0's non-empty tensors in float64: what a row is measured against."""
    return {k: t.detach().double() for k, t in theta0.items() if t.numel()}


class _Origin:
    """θ^0 of one unit's parameters in float64, and its squared norm: computed once per unit."""

    def __init__(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0 = _float64(theta0)
        self.sq0 = 0.0
        for b in self.theta0.values():
            self.sq0 += float((b * b).sum())


KeyStats = dict[str, tuple[float, float]]


def _key_stats(
    theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]
) -> KeyStats:
    """(max |θ − θ^0|, Σ (θ − θ^0)²) of each tensor of `theta0` (float64, `_float64`), in
    float64 (call it inside `_one_thread`). Same operations, in the same order, as the
    straightforward (a - b)² sum and |a - b| max, so the values are bit for bit those of that
    computation on one thread; the one float64 buffer per tensor is reused in place (|d|·|d| is
    exactly d·d)."""
    out: KeyStats = {}
    for k, b in theta0.items():
        d = theta[k].detach().to(torch.float64, copy=True)
        d.sub_(b)
        m = float(d.abs_().max())
        out[k] = (m, float(d.mul_(d).sum()))
    return out


def _row_of(unit: str, checkpoint: Any, stats: KeyStats, origin: _Origin) -> dict[str, Any]:
    """A distances row from `_key_stats`, summed over the tensors in `origin`'s order."""
    sq, linf = 0.0, 0.0
    for k in origin.theta0:
        m, s = stats[k]
        # NaN must win (a diverged checkpoint did not "stay put"): max(0.0, nan) is 0.0
        linf = m if math.isnan(m) or m > linf else linf
        sq += s
    l2, n0 = math.sqrt(sq), math.sqrt(origin.sq0)
    return {
        "unit": unit,
        "checkpoint": checkpoint,
        "l2": l2,
        "l2_rel": l2 / n0 if n0 > 0 else float("nan"),
        "linf": linf,
    }


def _row(
    unit: str, checkpoint: Any, theta: Mapping[str, torch.Tensor], origin: _Origin
) -> dict[str, Any]:
    return _row_of(unit, checkpoint, _key_stats(theta, origin.theta0), origin)


def param_keys(params: Mapping[str, nn.Parameter], unit: UnitLike) -> list[str]:
    """The unit's parameter names, each tensor once (its first name in `unit.keys`): a unit
    holding two names of one tied tensor (a joint unit of tied layers) counts it once.
    `params`: `dict(model.named_parameters(remove_duplicate=False))`."""
    first: dict[int, str] = {}  # id(parameter) -> its first name in the unit
    for k in unit.keys:
        if k in params:
            first.setdefault(id(params[k]), k)
    return list(first.values())


def draw_stats(
    theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]
) -> KeyStats:
    """What a rerandom row of distances.csv needs of a draw `theta`: `_key_stats` against
    `theta0`, the unit's θ^0 parameters (`param_keys`) in float64 (`float64_origin`). Taken
    when the draw is made, so that `distances` need not draw it again: the stats of one draw
    are a few floats, where keeping the draw itself until distances are measured (after the
    pass) would hold every seed's draw of every unit at once."""
    with _one_thread():
        return _key_stats(theta, theta0)


def float64_origin(
    theta0: Mapping[str, torch.Tensor], pkeys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """θ^0 of `pkeys` in float64, as `draw_stats` takes it."""
    return _float64({k: theta0[k] for k in pkeys})


def _integer(v: Any, what: str) -> int:
    """`v` as an int, refusing what int() would silently truncate (1.7 -> τ=1) or crash on."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise LayerfastError(f"distances: a {what} must be an integer, got {v!r}.")
    return int(v)


def distances(
    model: nn.Module,
    units: Sequence[UnitLike],
    ckpts: CheckpointDir | None,
    rerandom: Iterable[Variant | int] = (),
    arch: Any = None,
    checkpoints: str | Iterable[int] = "all",
) -> pd.DataFrame:
    """The distances table: columns `unit, checkpoint, l2, l2_rel, linf` (module docstring).

    `checkpoints`: "all" (every label) or labels; `()` for rerandom rows only.
    `rerandom`: rerandom Variants from `make_variants` (their own draws are measured; variants
    of other kinds are skipped) or seeds (drawn here exactly as a rerandom variant with that
    seed would be, with `arch`'s init rule). Rows: per unit, τ ascending as given, then one
    row per rerandom draw. The model is not modified.
    """
    wanted = list(rerandom)
    has_tau0 = ckpts is not None and 0 in ckpts.labels
    if isinstance(checkpoints, str):
        if checkpoints != "all":
            raise LayerfastError(f"checkpoints must be 'all' or labels, not {checkpoints!r}.")
        taus = list(ckpts.labels) if ckpts is not None else None
    else:
        taus = list(dict.fromkeys(_integer(t, "checkpoint label") for t in checkpoints))
    if not has_tau0:
        if taus:  # None ("all" without a directory) or a non-empty list
            found = ", ".join(map(str, ckpts.labels)) if ckpts is not None else "no directory"
            raise LayerfastError(
                f"distances from init need τ=0; found labels {found}. Ask only for rerandom "
                "rows (checkpoints=()) or add the initialization checkpoint."
            )
        return pd.DataFrame(columns=COLUMNS)
    assert ckpts is not None and taus is not None
    for t in taus:
        ckpts.check_label(t)
    sd = model.state_dict()
    ckpts.validate(
        sd,  # views of the model's tensors (no copy): shapes, dtypes, and which names are tied
        labels=sorted({0, *taus}),
        check_finite=False,
    )
    # name -> parameter, every name of a tied (shared) parameter included: a unit holding two
    # names of one tensor (a joint unit of tied layers) must count that tensor once.
    params = dict(model.named_parameters(remove_duplicate=False))

    draws: dict[str, list[tuple[str, Variant | int]]] = {u.name: [] for u in units}
    for r in wanted:
        if isinstance(r, Variant):
            if r.kind != "rerandom":
                continue
            if r.unit not in draws:
                raise LayerfastError(f"distances: variant {r.label!r} is for no known unit.")
            draws[r.unit].append((f"rerandom:{r.seed}", r))
        else:
            seed = _integer(r, "rerandom seed")
            for u in units:
                draws[u.name].append((f"rerandom:{seed}", seed))

    rows = []
    for u in units:
        pkeys = param_keys(params, u)
        theta0_all = ckpts.tensors(0, u.keys)
        with _one_thread():
            origin = _Origin({k: theta0_all[k] for k in pkeys})
            for t in taus:
                rows.append(_row(u.name, t, ckpts.tensors(t, pkeys), origin))
        for label, src in draws[u.name]:
            # a variant's draw measured when it was made (for the engine, or make_variants'
            # init check): the same numbers, without drawing it again
            stats = src.draw_stats(ckpts) if isinstance(src, Variant) else None
            if stats is not None and all(k in stats for k in origin.theta0):
                rows.append(_row_of(u.name, label, stats, origin))
                continue
            # drawn on the caller's threads, like the engine's draw of the same variant
            if isinstance(src, Variant):
                theta = src.overrides()
            else:
                theta = rerandom_draw(model, u, src, arch, theta0_all)
            with _one_thread():
                rows.append(_row(u.name, label, theta, origin))
            del theta
        del origin, theta0_all
    return pd.DataFrame(rows, columns=COLUMNS)
