"""The summary table printed at the end of a run: one line per unit, plain aligned text.

Plain text (no rich/colour) because the same string goes to a terminal, a CI log, a notebook
and a file, and must read the same everywhere; ASCII only except unit names, so that a Windows
console or a latin-1 log never chokes on it. Verdicts are recomputed from `delta_error` with the
threshold given here, so the footer's threshold is by construction the one the verdicts used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from layerfast.report.tables import fit_labels, printable, tau_of, unit_order

__all__ = ["summary_table"]

#: The interp grid shows at most this many α columns (the first and last half of them).
MAX_ALPHA_COLS = 12


def _pct(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def _verdict(delta: float, threshold: float) -> str:
    """As metrics.results_table: no verdict ("") where delta_error is NaN (no samples)."""
    if not math.isfinite(delta):
        return ""
    return "robust" if delta <= threshold + 1e-12 else "critical"


def _ranges(taus: Sequence[int]) -> str:
    """The critical τ, in order, as a list in which `a-b` stands only for every integer from a
    to b: [0,1,2,3,10] -> '0-3,10', [0,3] -> '0,3'. Runs of τ consecutive among the evaluated
    checkpoints but not as integers are listed one by one: with only τ 0 and 3 evaluated,
    '0-3' read as critical at 0, 1, 2 and 3 (and [0,1,2,3,10] read '0-10')."""
    if not taus:
        return "none"
    parts: list[str] = []
    start = prev = taus[0]
    for t in [*taus[1:], None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if t is not None:
            start = prev = t
    return ",".join(parts)


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if j in right else c.ljust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _labels(values: Sequence[float]) -> list[str]:
    """Short labels (`:g`), or exact ones (`repr`) when the short ones would repeat a label."""
    short = [f"{v:g}" for v in values]
    return short if len(set(short)) == len(short) else [repr(v) for v in values]


def _interp_lines(table: pd.DataFrame) -> list[str]:
    """The interp rows as a grid: a line per unit and τ (and σ, when several), a column per α,
    the test error in each cell (mean and sample sd over the seeds when σ > 0 drew several).
    Where a unit stays within the threshold as α falls toward 0 is what module criticality
    reads. Past `MAX_ALPHA_COLS` α the middle ones are left out (results.csv has them all)."""
    ip = table[table["kind"].astype(str) == "interp"]
    if not len(ip) or "alpha" not in ip.columns:
        return []
    sig = (ip["sigma"] if "sigma" in ip.columns else pd.Series(0.0, index=ip.index)).fillna(0.0)
    alphas = sorted({float(a) for a in ip["alpha"].dropna()})
    sigmas = sorted({float(x) for x in sig})
    shown = list(range(len(alphas)))
    if len(alphas) > MAX_ALPHA_COLS:
        half = MAX_ALPHA_COLS // 2
        shown = [*shown[:half], -1, *shown[-half:]]
    names = _labels(alphas)
    head = ["unit", "tau", *(["sigma"] if len(sigmas) > 1 else []),
            *("..." if j < 0 else f"alpha={names[j]}" for j in shown)]
    sig_names = dict(zip(sigmas, _labels(sigmas), strict=True))
    rows, counts = [head], set()
    for unit in unit_order(ip["unit"].astype(str)):
        u = ip[ip["unit"].astype(str) == unit]
        for tau in sorted({int(t) for t in u["checkpoint"].dropna()}):
            for x in sigmas:
                sel = u[(u["checkpoint"] == tau).to_numpy() & (sig[u.index] == x).to_numpy()]
                if not len(sel):
                    continue
                row = [printable(unit), str(tau), *([sig_names[x]] if len(sigmas) > 1 else [])]
                for j in shown:
                    if j < 0:
                        row.append("...")
                        continue
                    errs = sel.loc[sel["alpha"] == alphas[j], "error"].to_numpy(dtype=np.float64)
                    counts.add(len(errs))
                    cell = _pct(float(errs.mean())) if len(errs) else "-"
                    if len(errs) > 1:
                        cell += f" ({100 * float(errs.std(ddof=1)):.2f})"
                    row.append(cell)
                rows.append(row)
    noise = ""
    if sigmas[-1] > 0:
        noise = f" + noise (sigma={sig_names[sigmas[0]]})" if len(sigmas) == 1 else " + noise"
    many = max(counts, default=1)
    mean = ""
    if many > 1:
        mean = f"; mean (sd) of {many} seeds" if counts <= {0, many} else "; mean (sd) over seeds"
    title = f"interp: unit := (1-alpha)*theta^tau + alpha*theta^final{noise}{mean}"
    return [title, *_align(rows, set(range(1, len(head))))]


def _distance_note(shown: bool, measured: bool, dashes: bool) -> str:
    """The footer line that says what the `max l2_rel` column holds, or why it is not there."""
    if not shown:
        why = ("only tau=0 was measured, whose distance from itself is 0" if measured
               else "distances are measured from tau=0, which the checkpoints lack")
        return f"max l2_rel: not shown: {why}"
    dash = "; -: none finite (e.g. ||theta^0||_2 = 0)" if dashes else ""
    return ("max l2_rel: a unit's largest ||theta^tau - theta^0||_2 / ||theta^0||_2 over the "
            f"checkpoints measured{dash}")


def summary_table(
    table: pd.DataFrame,
    distances: pd.DataFrame | None = None,
    threshold: float = 0.05,
    bn: str = "with-layer",
    split: str = "test",
    precision: str | None = None,
) -> str:
    """Render the per-unit summary of a results table as aligned plain text.

    Columns: unit; error after reinit to the earliest τ (τ0, normally the initialization);
    error after rerandom as mean (sd over seeds, sample standard deviation; just the mean for
    one seed); the verdicts for both; every τ at which reinit is critical (the paper's point
    is that critical layers become robust after a few epochs; `a-b` only where every integer
    between was evaluated, `_ranges`); and, with `distances`, the largest relative ℓ2
    distance from θ^0 over the τ measured other than 0 (itself: 0 by definition), said in the
    footer, which says too why the column is missing when no such τ was measured. Each row also carries the baseline error, so
    a row read alone (grep, a pasted line) says what it is compared with; the header line gives
    the baseline's Wilson interval, the footer the threshold. The footer also gives the
    "(all units)" reference row at every τ (the whole model reset: the training curve, which
    is all a `--reset fullmodel` run has: such a run judges no unit, so it has no verdict
    column, no distance column and no threshold line, and the footer says so), and says when
    `bn` "keep" held normalization back.
    interp rows (`--reset interp`) follow as a grid of their own, unit and τ by α.
    `split` names the data split the errors were measured on (`--split train`: "baseline
    train error", not "test error"). `precision`, the run's (run.json): a bf16 or tf32 run says
    so in the footer, where a table pasted or reprinted without the command would otherwise
    pass for fp32's, the mode that reproduces the naive loop (bf16 moved a ResNet-20 row by
    0.68 points, and an FCN verdict at the threshold).
    """
    threshold = float(threshold) + 0.0  # `--threshold -0` printed "<= -0 (-0 points)"
    kinds = table["kind"].astype(str)
    base = table[kinds == "baseline"]
    reinit = table[(kinds == "reinit") & table["checkpoint"].notna()]
    rr = table[kinds == "rerandom"]
    full = table[(kinds == "fullmodel") & table["checkpoint"].notna()]
    units = unit_order(table.loc[kinds.isin(["reinit", "rerandom"]), "unit"].astype(str))
    taus = sorted({int(t) for t in reinit["checkpoint"]})
    # τ0 of the reinit column and of the "(all units)" reference row: from the fullmodel rows
    # when there are no reinit rows (--reset fullmodel[,rerandom]), whose only τ results they are.
    full_taus = sorted({int(t) for t in full["checkpoint"]})
    tau0 = taus[0] if taus else (full_taus[0] if full_taus else None)
    seeds = sorted({int(s) for s in rr["seed"].dropna()})

    # The largest l2_rel over the τ measured besides 0: θ^0 against itself is 0 by definition,
    # so with only τ = 0 measured a column of "0" read as "never moved from its init".
    max_rel: dict[str, float] = {}
    moved = False  # some τ other than 0 measured
    if distances is not None and len(distances):
        for unit, cp, rel in zip(
            distances["unit"].astype(str), distances["checkpoint"], distances["l2_rel"], strict=True
        ):
            if tau_of(cp) in (None, 0):
                continue
            moved = True
            if pd.notna(rel):
                max_rel[unit] = max(max_rel.get(unit, -math.inf), float(rel))
    rel_col = distances is not None and bool(units) and moved

    base_cell = _pct(float(base.iloc[0]["error"])) if len(base) else "-"
    head = ["unit", "baseline"]
    if tau0 is not None:  # with fullmodel rows only, the column holds the whole-model reset
        head.append(f"{'reinit' if taus else 'reset'}@{tau0}")
    if len(rr):
        head.append("rerandom mean (sd)" if len(seeds) > 1 else "rerandom")
    if units:  # fullmodel rows alone (--reset fullmodel) judge no unit: no verdict column
        head.append("verdict")
    if taus:
        head.append("critical at tau")
    if rel_col:
        head.append("max l2_rel")
    right = {j for j, h in enumerate(head)
             if h.startswith(("baseline", "reinit@", "reset@", "rerandom", "max"))}

    lines: list[list[str]] = [head]
    pending: list[tuple[list[str], list[str]]] = []
    # a 1,500-character unit name (a long --units regex) made every line that wide
    shown = dict(zip(units, fit_labels(units, ellipsis="..."), strict=True))
    for unit in units:
        row = [shown[unit], base_cell]
        verdicts = []
        ri = reinit[reinit["unit"].astype(str) == unit]
        if tau0 is not None:
            at0 = ri[ri["checkpoint"] == tau0]
            if len(at0):
                row.append(_pct(float(at0["error"].mean())))
                v = _verdict(float(at0["delta_error"].mean()), threshold)
                verdicts.append(f"reinit@{tau0}: {v or '-'}")
            else:
                row.append("-")
        if len(rr):
            r = rr[rr["unit"].astype(str) == unit]
            if len(r) == 0:
                row.append("-")
            else:
                errs = r["error"].to_numpy(dtype=np.float64)
                cell = _pct(float(errs.mean()))
                if len(errs) > 1:
                    cell += f" ({100 * float(errs.std(ddof=1)):.2f})"
                row.append(cell)
                judged = [_verdict(float(d), threshold) for d in r["delta_error"]]
                judged = [v for v in judged if v]
                crit = judged.count("critical")
                if not judged:
                    verdicts.append("rerandom: -")
                elif crit in (0, len(judged)):
                    verdicts.append(f"rerandom: {'critical' if crit else 'robust'}")
                else:
                    verdicts.append(f"rerandom: mixed ({crit}/{len(judged)} critical)")
        row.append("")  # filled in below, once the verdict parts' widths are known
        pending.append((row, verdicts))
        if taus:
            crit_taus = sorted(
                int(t)
                for t, d in zip(ri["checkpoint"], ri["delta_error"], strict=True)
                if _verdict(float(d), threshold) == "critical"
            )
            judged = ri["delta_error"].notna().any()
            row.append(_ranges(crit_taus) if judged else "-")
        if rel_col:
            rel = max_rel.get(unit)
            if rel is None:
                row.append("-")
            elif rel == 0:  # a unit that did not move (frozen): "0", not "0.00e+00"
                row.append("0")
            elif 1e-3 <= rel < 1e4:
                row.append(f"{rel:.4f}")
            else:  # a diverged τ (1e38) in fixed point would be 39 digits wide
                row.append(f"{rel:.2e}")
        lines.append(row)

    if len(full) and tau0 is not None:
        at0 = full[full["checkpoint"] == tau0]
        row = ["(all units)", base_cell, _pct(float(at0["error"].mean())) if len(at0) else "-"]
        row += [""] * (len(head) - len(row))
        lines.append(row)

    # Verdicts: pad each part to its widest so "rerandom: ..." starts in the same place.
    widths = [max((len(v[k]) for _, v in pending if len(v) > k), default=0) for k in range(2)]
    for row, verdicts in pending:
        row[head.index("verdict")] = ("  ".join(v.ljust(widths[k]) for k, v in enumerate(verdicts))
                                      .rstrip() or "-")

    text = _align(lines, right)
    grid = _interp_lines(table)
    table_shown = len(lines) > 1 or not grid  # no empty per-unit table above an interp grid
    rule = "-" * max(len(s) for s in [*(text if table_shown else []), *grid])
    body = [rule, text[0], rule, *text[1:]] if table_shown else []
    if grid:
        body += [rule, *grid]
    if len(base):
        b = base.iloc[0]
        title = (
            f"baseline {'train' if split == 'train' else 'test'} error "
            f"{_pct(float(b['error']))} "
            f"[95% CI {_pct(float(b['error_lo']))}, {_pct(float(b['error_hi']))}], "
            f"n={int(b['n']):,}"
        )
    else:
        title = "no baseline row"
    foot = [
        f"threshold: robust <=> error - baseline error <= {threshold:g} "
        f"({100 * threshold:g} points), else critical",
    ] if pending else []  # fullmodel or interp rows alone: no verdict anywhere
    if len(seeds) > 1:
        foot.append(f"rerandom: mean (sample sd) of the error over {len(seeds)} seeds, in % points")
    if distances is not None and units:
        foot.append(_distance_note(rel_col, len(distances) > 0, any(u not in max_rel for u in units)))
    if tau0 is not None and len(full):
        kept = "; normalization layers kept at the final model (--bn keep)" if bn == "keep" else ""
        what = (f"(reference{kept})" if units
                else f"(no reinit or rerandom rows, so no robust/critical verdict{kept})")
        foot.append(f"(all units): the whole model reset to tau={tau0} at once {what}")
        if len(full_taus) > 1:
            cells = [f"{t}: {_pct(float(full[full['checkpoint'] == t]['error'].mean()))}"
                     for t in full_taus]
            if len(cells) > 12:  # a run that kept every epoch: its two ends
                cells = [*cells[:6], "...", *cells[-6:]]
            foot.append("whole model reset, at each tau: " + ", ".join(cells))
    if precision in ("bf16", "tf32"):
        foot.append(f"precision: {precision}: its rounding can move an error by up to about a "
                    "point from fp32's (--precision fp32 reproduces the naive loop)")
    return "\n".join([title, *body, rule, *foot])
