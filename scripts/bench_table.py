"""The short table a GPU session prints last: one row per `layerfast bench --json` file.

`python3 scripts/bench_table.py DIR` reads DIR/bench-*.json (written by scripts/gpu_session.sh).
A case that failed or timed out leaves an empty or partial file: it is skipped, not fatal, so
the table of the cases that did finish still prints before the device call's time runs out.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PHASES = ("setup", "data", "baseline", "fanned", "swapped", "total")


def used_batch(plan: dict) -> int:
    """The batch the pass ran (at most n samples); a JSON from before session 22 has only the
    planned one."""
    return plan.get("batch_size_used", plan["batch_size"])


def rows(d: dict, name: str) -> list[str]:
    """The lines for one bench result: the figures, fan-out fallbacks and refusals, phases,
    profile top."""
    s = d["seconds"]
    pre = s.get("prefix_only")
    nan = math.nan
    xfloor = d["times_floor"]["layerfast"]  # None: a model with no matrix FLOPs has no floor
    out = [f"{name:16s} {d['variants']:4d} {s['naive']:9.1f} {pre or nan:9.2f} {s['layerfast']:11.2f} "
           f"{d['speedup_vs_naive']['layerfast']:8.1f} {(pre / s['layerfast']) if pre else nan:8.2f}"
           f" {d['floor']['seconds_measured_rate']:8.3g} {nan if xfloor is None else xfloor:7.1f}"
           f" {used_batch(d['layerfast_plan']):5d}"]
    if d.get("naive_scaled"):  # an extrapolation, not a measurement: say so on the row's next line
        k, v = d["naive_timed_variants"], d["variants"]
        timed = d.get("naive_timed", [])
        names = ", ".join(timed[:6]) + (", ..." if len(timed) > 6 else "")
        out.append(f"    naive s: timed on {k} of {v} variants, scaled x{v / k:.1f}"
                   + (f" ({names})" if names else ""))
    for k, why in d["layerfast_plan"].get("fanout_fallbacks", {}).items():
        out.append(f"    FAN-OUT FELL BACK at step {k}: {why}")
    for k, why in d["layerfast_plan"].get("fanout_refused", {}).items():
        out.append(f"    FAN-OUT REFUSED at step {k}: {why[:200]}")
    for w in d.get("warnings", []):  # untraced (the naive loop's speed), an OOM back-off
        out.append(f"    WARNING: {w[:160]}")
    ph = d.get("layerfast_phases", {})
    probes = d.get("layerfast_probes")
    out.append("    phases (s): " + ", ".join(f"{k} {ph[k]:.2f}" for k in PHASES if k in ph)
               + (f"; before the pass (probes) {probes:.2f}" if probes is not None else ""))
    for e in d.get("profile", {}).get("top", [])[:10]:
        out.append(f"    {e['share']:6.1%} {e['ms']:9.1f} ms {e['calls']:7d}x {e['op'][:60]}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bench_table.py DIR", file=sys.stderr)
        return 2
    print(f"{'case':16s} {'V':>4s} {'naive s':>9s} {'prefix s':>9s} {'layerfast s':>11s} "
          f"{'x naive':>8s} {'x prefix':>8s} {'floor s':>8s} {'/floor':>7s} {'B':>5s}")
    for f in sorted(Path(argv[0]).glob("bench-*.json")):
        try:
            lines = rows(json.loads(f.read_text()), f.stem[len("bench-"):])
        except (ValueError, KeyError, TypeError):
            continue
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
