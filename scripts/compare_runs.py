"""Compare several `layerfast analyze` outputs (e.g. one per training seed): per unit, the error
after a reset to τ = 0 and the mean re-randomization error, each run a column, and how often
each verdict came out. Used for the seed study in docs/reproduction.md.

    python scripts/compare_runs.py runs/fcn100-analysis runs/fcn100-s1-analysis ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def load(d: Path) -> pd.DataFrame:
    t = pd.read_csv(d / "results.csv")
    base = t.loc[t["kind"] == "baseline", "error"].iloc[0]
    units = t[(t["unit"] != "*") & (t["kind"].isin(["reinit", "rerandom"]))]
    r0 = units[(units["kind"] == "reinit") & (units["checkpoint"] == 0)].set_index("unit")
    rr = units[units["kind"] == "rerandom"].groupby("unit", sort=False)["error"].mean()
    return pd.DataFrame({"baseline": base, "reinit0": r0["error"], "delta0": r0["delta_error"],
                         "verdict0": r0["verdict"], "rerandom": rr})


def labels(dirs: list[Path]) -> list[str]:
    """A column name per run: the dir's name, with as many parent dirs as it takes to tell the
    runs apart (seed0/analysis and seed1/analysis would otherwise share one column, the
    second run's numbers silently replacing the first's)."""
    parts = [d.resolve().parts for d in dirs]
    depth = [1] * len(dirs)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth, strict=True)]
        clash = [i for i, n in enumerate(names) if depth[i] < len(parts[i])
                 and any(m == n and parts[j] != parts[i] for j, m in enumerate(names))]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    if len(set(names)) < len(names):  # a dir named twice
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="OUT", help="a `layerfast analyze --out` dir")
    dirs = p.parse_args(argv).runs
    missing = [d for d in dirs if not (Path(d) / "results.csv").is_file()]
    if missing:
        print(f"compare_runs: no results.csv in {missing[0]} (a finished analyze --out dir?)",
              file=sys.stderr)
        return 2
    runs = dict(zip(labels([Path(d) for d in dirs]), (load(Path(d)) for d in dirs), strict=True))
    units = list(next(iter(runs.values())).index)
    names = list(runs)
    print("reset to τ=0: error % (Δ vs baseline, points); * = critical")
    print(f"{'unit':10s} " + " ".join(f"{n[-18:]:>18s}" for n in names) + "   critical")
    for u in units:
        cells, crit = [], 0
        for n in names:
            r = runs[n].loc[u]
            star = "*" if r["verdict0"] == "critical" else " "
            crit += star == "*"
            cells.append(f"{100 * r['reinit0']:6.1f} ({100 * r['delta0']:+5.1f}){star}")
        print(f"{u:10s} " + " ".join(f"{c:>18s}" for c in cells) + f"   {crit}/{len(names)}")
    print(f"{'baseline':10s} " + " ".join(f"{100 * runs[n]['baseline'].iloc[0]:18.2f}" for n in names))
    print("re-randomized (mean of seeds), error %")
    for u in units:
        print(f"{u:10s} " + " ".join(f"{100 * runs[n].loc[u, 'rerandom']:18.1f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
