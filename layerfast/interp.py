"""`--reset interp --alphas A,... [--sigma S,...]`: what `analyze` asks of DESIGN §3's interp kind.

Each unit := (1 − α)·θ^τ + α·θ^final (+ σ·N(0, 1) on its floating parameters), for every chosen
τ but the final one (from the final, every α is the baseline) and every α and σ: module
criticality (Chatterji, Neyshabur & Sedghi, 2020) reads how far α can fall toward θ^τ, under
how much noise, before the error leaves the baseline's. The variants themselves are built by
`variants.make_variants(interp=...)`; this module only reads and checks the options.

α is an interpolation weight, so it must lie in [0, 1]: beyond, the line extrapolates, and
BatchNorm variances (interpolated like weights) can turn negative, which gives NaN logits that
read as an error rate. σ is an absolute standard deviation (not relative to the weights' scale)
and must be >= 0, and at most the weights' dtype maximum / NOISE_REACH (the noise must fit).
Values are sorted, without repeats, and -0.0 is 0.0, so that run.json, the resume fingerprint
and the rows do not tell apart requests that evaluate the same thing (as `--checkpoints` and
`--seeds` are sorted).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from layerfast.errors import LayerfastError

#: More values than any sweep needs: each is a variant of every unit and τ (a typo, not a study).
MAX_VALUES = 1000

#: More interp variants of one unit and τ than any study needs: |α| × (each σ = 0 once, each
#: σ > 0 once per seed). Each list alone is bounded (MAX_VALUES, MAX_SEEDS), but not their
#: product: 1000 α × 1000 σ × 1000 seeds built 10⁹ lazy variants per unit and τ until memory
#: ran out, the failure MAX_SEEDS exists to turn into a clear error. Ten times MAX_VALUES
#: keeps a dense grid (100 α × 10 σ × 10 seeds) legal.
MAX_GRID = 10 * MAX_VALUES

#: A bound on |z| for torch's float64 standard normal draws, with a margin: Box–Muller on
#: 53-bit uniforms reaches at most sqrt(-2·ln 2⁻⁵³) ≈ 8.57. σ times it must fit the weights'
#: dtype: a σ just below float32's maximum (3e38) made a quarter of the noisy weights Inf,
#: and the rows read as chance with only the generic NaN/Inf-logits warning.
NOISE_REACH = 10.0

#: A number as a user writes one: Python's float() also reads "1_0" (as 10), "nan" and "inf".
_DECIMAL = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", re.ASCII)


def parse_numbers(value: Any, flag: str, example: str) -> list[float]:
    """`value` as finite floats without repeats, in order: a comma-separated string (the CLI),
    a number (also NumPy's and 0-d tensors), or an iterable of numbers."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray | memoryview):
        # iterating bytes gives their character codes: sigma=b"0.1" ran σ = 46, 48 and 49
        raise LayerfastError(f"{flag} takes finite numbers like {example}, as a str or a list; "
                             f"got {type(value).__name__} {bytes(value)!r}")
    if isinstance(value, str):
        items: list[Any] = [v for v in value.split(",") if v.strip()]
    else:
        try:
            items = list(value)
        except TypeError:  # a scalar: float, np.float32, np.int64, a 0-d array or tensor
            items = [value]
    out: list[float] = []
    for item in items:
        try:
            # bools (NumPy's too), str other than a plain decimal, and bytes are not numbers here
            plain = not isinstance(item, bool | np.bool_ | str | bytes) or (
                isinstance(item, str) and _DECIMAL.fullmatch(item) is not None)
            v = float(item) if plain else math.nan
        except (TypeError, ValueError, OverflowError):  # 10**400 overflows a float
            v = math.nan
        if not math.isfinite(v):
            raise LayerfastError(f"{flag} takes finite numbers like {example}; got {item!r}")
        out.append(v + 0.0)  # -0.0 -> 0.0
    out = list(dict.fromkeys(out))
    if not out:
        raise LayerfastError(f"{flag} names no value; give numbers like {example}")
    if len(out) > MAX_VALUES:
        raise LayerfastError(f"{flag} names more than {MAX_VALUES} values: ask for fewer")
    return out


def interp_options(resets: Sequence[str], alphas: Any,
                   sigma: Any) -> tuple[list[float], list[float]] | None:
    """(alphas, sigmas) when `resets` asks for interp, else None, after checking the options
    agree with `--reset`: an α or σ that would change nothing is an error, not a run that
    ignores it."""
    alpha_list = parse_numbers(alphas, "--alphas", "0.25,0.5,0.75")
    sigmas = parse_numbers(sigma, "--sigma", "0,0.01")
    if "interp" not in resets:
        if alpha_list or any(sigmas):
            flag = "--alphas" if alpha_list else "--sigma"
            raise LayerfastError(f"{flag} is for interpolation: add interp to --reset "
                                 f"(now {','.join(resets)})")
        return None
    if not alpha_list:
        raise LayerfastError("--reset interp needs --alphas, e.g. --alphas 0.25,0.5,0.75: each "
                             "unit := (1 - alpha)·θ^τ + alpha·θ^final")
    outside = [a for a in alpha_list if not 0 <= a <= 1]
    if outside:
        raise LayerfastError(
            f"--alphas must lie in [0, 1]; got {outside[0]:g}: beyond, the line from θ^τ to "
            "θ^final extrapolates, and BatchNorm variances can turn negative")
    negative = [s for s in sigmas if s < 0]
    if negative:
        raise LayerfastError(f"--sigma must be >= 0 (a standard deviation); got {negative[0]:g}")
    # The noise is drawn in float64, then cast to the weights' dtype (float32 for the
    # registry's models; make_variants checks the model's own): noise beyond it is Inf there.
    huge = [s for s in sigmas if s > sigma_limit(torch.float32)]
    if huge:
        raise LayerfastError(f"--sigma {huge[0]:g} makes noise beyond float32's range: "
                             f"{sigma_reach_note(torch.float32)}")
    return sorted(alpha_list), sorted(sigmas) or [0.0]


def sigma_limit(dtype: torch.dtype) -> float:
    """The largest σ whose noise (σ·N(0, 1), |N(0, 1)| < NOISE_REACH) stays finite in `dtype`."""
    return torch.finfo(dtype).max / NOISE_REACH


def sigma_reach_note(dtype: torch.dtype) -> str:
    """Why a σ above `sigma_limit(dtype)` is refused, and the limit, for one-line errors."""
    name = str(dtype).removeprefix("torch.")
    return (f"a standard normal draw reaches ~8.6, so σ must be <= {sigma_limit(dtype):.3g} "
            f"({name}'s maximum / {NOISE_REACH:g}) or noisy weights become Inf")


def check_grid(alphas: Sequence[float], sigmas: Sequence[float], seeds: Sequence[int]) -> None:
    """Refuse an α × σ × seed grid of more than `MAX_GRID` variants per unit and τ, before any
    variant is built (`parse_flags`, so `--list-units` refuses it too)."""
    noisy = sum(1 for s in sigmas if s > 0)
    per = len(alphas) * (len(sigmas) - noisy + noisy * len(seeds))
    if per > MAX_GRID:
        raise LayerfastError(
            f"--alphas × --sigma × --seeds asks for {per} interp variants per unit and τ "
            f"({len(alphas)} alphas, {len(sigmas)} sigmas of which {noisy} draw noise once per "
            f"seed, {len(seeds)} seeds), more than {MAX_GRID}: ask for fewer")


def interp_requests(units: Iterable[Any], taus: Sequence[int], final: int,
                    alphas: Sequence[float],
                    sigmas: Sequence[float]) -> list[tuple[str, int, float, float]]:
    """`make_variants`'s interp requests: per unit, τ, σ, α (the summary's grid order), every
    chosen τ but the final one."""
    earlier = [t for t in taus if t != final]
    if not earlier:
        raise LayerfastError(f"interp interpolates from a checkpoint τ toward the final model "
                             f"(τ={final}), and the only checkpoint chosen is the final one: "
                             "choose an earlier one with --checkpoints")
    return [(u.name, t, a, s) for u in units for t in earlier for s in sigmas for a in alphas]
