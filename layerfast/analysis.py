"""`analyze()`: a whole study in one call (DESIGN.md §5) — the CLI's `layerfast analyze` is a
thin layer over it.

checkpoints + arch -> final model; data spec -> DataSource; units -> variants -> one engine pass
(resumable) -> results table with Wilson intervals and verdicts, distances, run.json, figures.
Everything is validated before the first batch; outputs appear atomically only once the pass is
complete, so a failed or killed run never leaves results that look finished.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from layerfast.errors import LayerfastError

RESETS = ("reinit", "rerandom", "fullmodel")


@dataclass
class Analysis:
    """The result of `analyze()`: `.table` (results.csv), `.distances`, `.run` (run.json)."""

    table: pd.DataFrame
    distances: pd.DataFrame
    run: dict
    out: Path | None = None
    units: list = field(default_factory=list)

    def plot(self, path: str | os.PathLike[str] | None = None, kind: str = "heatmap") -> Path:
        """Draw the paper-style heatmap (`kind="heatmap"`) or distance plot (`"distances"`)."""
        from layerfast import report

        if path is None:
            if self.out is None:
                raise LayerfastError("plot() needs a path when the analysis has no out dir")
            path = self.out / ("heatmap.png" if kind == "heatmap" else "distances.png")
        if kind == "heatmap":
            return report.heatmap(self.table, path, title=self.run.get("title"))
        if kind == "distances":
            return report.distance_plot(self.distances, path)
        raise LayerfastError(f"unknown plot kind {kind!r}: heatmap or distances")

    def summary(self) -> str:
        from layerfast import report

        return report.summary_table(self.table, self.distances, self.run["threshold"])


def _parse_checkpoints(checkpoints: str | Iterable[int]) -> str | list[int]:
    if isinstance(checkpoints, str):
        if checkpoints.strip() == "all":
            return "all"
        try:
            return [int(c) for c in checkpoints.split(",") if c.strip()]
        except ValueError:
            raise LayerfastError(f"--checkpoints takes 'all' or labels like 0,1,10; got {checkpoints!r}") from None
    return [int(c) for c in checkpoints]


def _parse_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _out_dir(out: str | os.PathLike[str] | None, arch: str) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("layerfast-out") / f"{arch.replace(':', '_').replace('/', '_')}-{stamp}"
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".layerfast-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LayerfastError(f"cannot write to the out dir {path}: {exc.strerror or exc}") from None
    return path


def _versions() -> dict:
    import layerfast

    return {"layerfast": layerfast.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def build(arch: str, ckpts: str | os.PathLike[str], data: str = "digits", split: str = "test",
          final: int | None = None, max_samples: int | None = None):
    """The final model with its checkpoints and data, validated: (model, spec, ckdir, source)."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.data import open_data
    from layerfast.models import build_model

    ck = CheckpointDir(ckpts, final=final)
    src = open_data(data, split=split, max_samples=max_samples)
    man = ck.manifest or {}
    num_classes = int(man.get("num_classes", src.num_classes))
    model, spec = build_model(arch, num_classes, tuple(src.shape))
    ck.validate(model.state_dict())
    model.load_state_dict(ck.tensors(ck.final), strict=False)
    labels = src.labels()
    if labels.numel() == 0:
        raise LayerfastError(f"the data {data!r} ({split}) is empty")
    lo, hi = int(labels.min()), int(labels.max())
    out_features = _num_outputs(model, src)
    if lo < 0 or hi >= out_features:
        raise LayerfastError(f"labels of {data!r} lie in {lo}..{hi}, but the model has "
                             f"{out_features} outputs (classes 0..{out_features - 1})")
    return model, spec, ck, src


def _num_outputs(model: torch.nn.Module, src: Any) -> int:
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(torch.zeros(1, *src.shape))
        model.train(was)
    if out.dim() != 2:
        raise LayerfastError(f"the model must return logits [batch, classes]; it returned {tuple(out.shape)}")
    return int(out.shape[1])


def analyze(arch: str, ckpts: str | os.PathLike[str], data: str = "digits", split: str = "test",
            granularity: str = "layer", units: str | Sequence[str] | None = None,
            bn: str = "with-layer", reset: str | Sequence[str] = RESETS,
            checkpoints: str | Iterable[int] = "all", seeds: int | Iterable[int] = 1,
            threshold: float = 0.05, device: str = "auto", precision: str = "auto",
            batch_size: int | None = None, max_samples: int | None = None,
            out: str | os.PathLike[str] | None = None, final: int | None = None,
            fresh: bool = False, progress: bool = True, figures: bool = True,
            fanout: bool = True) -> Analysis:
    """Reset every unit of the final model to each checkpoint τ and to fresh draws, evaluate all
    variants in one data pass, and write results.csv, distances.csv, run.json and the figures.

    `seeds`: a count n (seeds 1..n) or explicit seeds. Resumes a killed run in the same `out`
    with the same arguments; refuses different arguments there unless `fresh`.
    """
    from layerfast import report
    from layerfast.distances import distances as unit_distances
    from layerfast.engine import Evaluator
    from layerfast.metrics import results_table
    from layerfast.store import ResumeStore
    from layerfast.units import make_units
    from layerfast.variants import make_variants

    t0 = time.perf_counter()
    resets = _parse_list(reset) or list(RESETS)
    bad = [r for r in resets if r not in RESETS]
    if bad:
        raise LayerfastError(f"unknown --reset {bad[0]!r}: choose from {', '.join(RESETS)}")
    seed_list = list(range(1, int(seeds) + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not 0 <= threshold <= 1:
        raise LayerfastError(f"--threshold must lie in [0, 1]; got {threshold}")
    chosen = _parse_checkpoints(checkpoints)
    patterns = _parse_list(units) or None

    model, spec, ck, src = build(arch, ckpts, data, split, final, max_samples)
    unit_list = make_units(model, granularity=granularity, patterns=patterns, bn=bn, arch=spec)
    variants = make_variants(model, unit_list, ck, spec, reset=resets, checkpoints=chosen,
                             seeds=seed_list)
    path = _out_dir(out, arch)
    taus = ck.labels if chosen == "all" else chosen
    fingerprint = {
        "arch": arch, "ckpts": str(Path(ckpts).resolve()), "files": {str(k): v.name for k, v in ck.files.items()},
        "final": ck.final, "data": data, "split": split, "n": src.n, "granularity": granularity,
        "units": patterns, "bn": bn, "reset": resets, "checkpoints": taus, "seeds": seed_list,
        "device": device, "precision": precision, "batch_size": batch_size, "fanout": fanout,
    }
    store = ResumeStore(path, fingerprint, len(variants), fresh=fresh)
    try:
        n_done, counts, complete = store.load()
        ev = Evaluator(model, variants, device=device, precision=precision, batch_size=batch_size,
                       fanout=fanout)
        if not complete:
            bar = _progress(progress, src.n, n_done, len(variants))
            res = ev.run(src, start=n_done, counts=counts,
                         on_progress=(lambda n: bar.update(n - bar.n)) if bar else None,
                         on_checkpoint=store.save, checkpoint_every=5.0)
            if bar:
                bar.close()
            store.save(res.counts, res.n, complete=True)
            counts, n_done, engine = res.counts, res.n, {"plan": res.plan, "timings": res.timings,
                                                         "num_classes": res.num_classes}
            num_classes = res.num_classes
        else:
            num_classes = _num_outputs(model, src)
            engine = {"resumed_complete": True}
    finally:
        store.close()
    table = results_table(variants, counts, n_done, num_classes, threshold)
    rr = [v for v in variants if v.kind == "rerandom"]
    dist_taus: str | list[int] = chosen if "reinit" in resets else ()
    if 0 not in ck.labels:
        dist_taus = ()
    dist = unit_distances(model, unit_list, ck, rerandom=rr, arch=spec, checkpoints=dist_taus)
    run = {
        "arch": arch, "ckpts": str(Path(ckpts).resolve()),
        "checkpoints": {str(k): ck.files[k].name for k in ck.labels}, "final": ck.final,
        "data": data, "split": split, "n": n_done, "num_classes": num_classes,
        "device": str(ev.device), "precision": ev.precision, "batch_size": ev.batch_size,
        "granularity": granularity, "units": [u.name for u in unit_list], "patterns": patterns,
        "bn": bn, "reset": resets, "evaluated_checkpoints": taus, "seeds": seed_list,
        "threshold": threshold, "variants": len(variants), "versions": _versions(),
        "engine": engine, "seconds": round(time.perf_counter() - t0, 3),
        "command": " ".join(sys.argv), "manifest": {k: v for k, v in (ck.manifest or {}).items()
                                                   if k != "checkpoints"},
    }
    report.write_csv(table, path / "results.csv")
    report.write_csv(dist, path / "distances.csv")
    with report.atomic_path(path / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=2, default=str))
    result = Analysis(table, dist, run, path, unit_list)
    if figures:
        result.plot(kind="heatmap")
        if len(dist):
            result.plot(kind="distances")
    return result


def _progress(enabled: bool, total: int, done: int, nvar: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="img", desc=f"{nvar} variants", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def list_units(arch: str, data: str = "digits", granularity: str = "layer",
               units: str | Sequence[str] | None = None, bn: str = "with-layer",
               num_classes: int | None = None) -> list:
    """The units an analysis would reset, without checkpoints or evaluation (a dry run)."""
    from layerfast.data import open_data
    from layerfast.models import build_model
    from layerfast.units import make_units

    src = open_data(data, split="test", max_samples=1)
    model, spec = build_model(arch, num_classes or src.num_classes, tuple(src.shape))
    return make_units(model, granularity=granularity, patterns=_parse_list(units) or None, bn=bn,
                      arch=spec)
