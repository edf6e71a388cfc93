"""`analyze()`: a whole study in one call (DESIGN.md §5) — the CLI's `layerfast analyze` is a
thin layer over it.

checkpoints + arch -> final model; data spec -> DataSource; units -> variants -> one engine pass
(resumable) -> results table with Wilson intervals and verdicts, distances, run.json, figures.
Everything is validated before the first batch; outputs appear atomically only once the pass is
complete, so a failed or killed run never leaves results that look finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from layerfast.build import _manifest_classes, build
from layerfast.errors import (
    LayerfastError,
    collect_warnings,
    progress_bar,
    progress_stream,
    quiet_warnings,
    refused_paths_are_input,
    say,
    warn,
)
from layerfast.exclusive import exclusive
from layerfast.flags import RESETS, _check_threshold, _checkpoint_every, _parse_units, parse_flags
from layerfast.options import check_dir_path, flag

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure

#: What a finished run writes into its out dir (DESIGN.md §5); run.json is written last.
OUTPUTS = ("results.csv", "distances.csv", "heatmap.png", "distances.png", "run.json")
#: Parent of the default out dirs `<arch>-<time>`.
DEFAULT_OUT = "layerfast-out"


@dataclass
class Analysis:
    """The result of `analyze()`: `.table` (results.csv), `.distances`, `.run` (run.json)."""

    table: pd.DataFrame
    distances: pd.DataFrame
    run: dict
    out: Path | None = None
    units: list = field(default_factory=list)

    def __repr__(self) -> str:  # the dataclass's would print all of run.json
        out = None if self.out is None else str(self.out)
        return (f"Analysis(arch={self.run.get('arch')!r}, out={out!r}, "
                f"units={len(self.units)}, rows={len(self.table)}, n={self.run.get('n')})")

    def plot(self, path: str | os.PathLike[str] | None = None, kind: str = "heatmap") -> Path:
        """Draw the paper-style heatmap (`kind="heatmap"`) or distance plot (`"distances"`) to
        the file `path` (default: the out dir's heatmap.png / distances.png), in the format its
        suffix names (`fig.pdf`, `fig.svg`; PNG without a suffix); a directory is refused."""
        from layerfast import report

        if path is None:
            if self.out is None:
                raise LayerfastError("plot() needs a path when the analysis has no out dir")
            path = self.out / ("heatmap.png" if kind == "heatmap" else "distances.png")
        if kind == "heatmap":
            return report.heatmap(self.table, path, **report.heatmap_labels(self.run))
        if kind == "distances":
            return report.distance_plot(self.distances, path)
        raise LayerfastError(f"unknown plot kind {kind!r}: heatmap or distances")

    def figure(self, kind: str = "heatmap") -> Figure:
        """The figure `plot` would write, as a matplotlib `Figure` (no file): the last line of
        a notebook cell shows it inline (once `%matplotlib inline` has run, or pyplot made a
        figure: IPython hooks up no Figure before), and `fig.savefig(...)` writes any format."""
        from layerfast import report

        if kind == "heatmap":
            return report.heatmap_figure(self.table, **report.heatmap_labels(self.run))
        if kind == "distances":
            return report.distance_figure(self.distances)
        raise LayerfastError(f"unknown plot kind {kind!r}: heatmap or distances")

    def summary(self, threshold: float | None = None) -> str:
        """The terminal table: one row per unit, the threshold stated (what the CLI prints);
        with `threshold`, judged afresh at it (as `layerfast report OUT --threshold T`)."""
        from layerfast import report

        if threshold is None:
            threshold = self.run["threshold"]
        _check_threshold(threshold)
        return report.summary_table(self.table, self.distances, float(threshold),
                                    self.run.get("bn", "with-layer"),
                                    split=str(self.run.get("split", "test")),
                                    precision=self.run.get("precision"))


def _data_spec(data: str | os.PathLike[str] | None,
               ckpts: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """`data`, or the spec the checkpoint directory's manifest.json names when it is None;
    and that manifest's path (None when `data` was given), for the run to say so once it has
    validated (a bad-input error stays one line).

    Never a fixed default: `--data` once defaulted to `digits`, and a model trained on other
    data whose head happened to fit was then analysed on digits, exit 0, without a word. The
    manifest's spec is the data the checkpoints were trained on (its test split is evaluated)."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.checkpoints.discover import read_manifest
    from layerfast.data.spec import absolute_spec

    if isinstance(data, os.PathLike):  # Path("x.npz"): recorded in run.json as its string
        data = os.fspath(data)
    if data is not None:
        return data, None
    root = Path(ckpts)
    if not root.is_dir():
        CheckpointDir(root)  # its own clear error for a missing or unreadable directory
    man = read_manifest(root)
    named = (man or {}).get("data")
    if man is not None and "data" in man and (not isinstance(named, str) or not named.strip()):
        raise LayerfastError(f"{root / 'manifest.json'}: data must be a data spec string, got "
                             f"{named!r}; pass --data")
    if named is None:
        raise LayerfastError(
            f"--data is required: {root} has no manifest.json naming the data its checkpoints "
            "were trained on; name the data to evaluate on (digits, fashion-mnist, cifar10:DIR, "
            "PATH.npz, ...; see docs/data.md)")
    # a relative path in a (hand-written) manifest is the manifest's, not the caller's cwd's
    return absolute_spec(named, base=root), root / "manifest.json"


def _other_data(data: str, ck: Any) -> str | None:
    """The data spec the checkpoints' manifest.json names where `--data` names other data,
    else None. A model whose input shape and head fit both was analysed on the other data
    without a word (a different normalisation, a different task, error near chance)."""
    named = (ck.manifest or {}).get("data")
    if not isinstance(named, str) or not named.strip():
        return None
    from layerfast.data.spec import same_data

    if same_data(data, named, ck.path):
        return None
    return named


def _out_dir(out: str | os.PathLike[str] | None, arch: str,
             fingerprint: dict) -> tuple[Path, bool]:
    """`out`, or by default `layerfast-out/<arch>-<time>` — unless an unfinished run with the
    same arguments is already there: rerunning the same command must resume it, and a fresh
    time stamp would start over instead. Also whether this call created the directory."""
    if out is not None and not str(out).strip():
        # Path("") is the current directory: the outputs, the lock and the store would land
        # among the user's own files
        raise LayerfastError("--out is empty: name a directory, or leave --out out for "
                             f"{DEFAULT_OUT}/<arch>-<time>")
    if out is None:
        from layerfast.store import find_unfinished

        # only characters every file system takes: a callable arch is named like
        # `__main__:<lambda>`, and `<`, `>` (and `:`) cannot be in a Windows file name
        prefix = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', arch)}-"
        found = find_unfinished(Path(DEFAULT_OUT), prefix, fingerprint)
        out = found or _fresh_dir(Path(DEFAULT_OUT), f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}")
        created = found is None
    else:
        created = not Path(out).exists()
    path = Path(out)
    made = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    probe = path / ".layerfast-write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:  # a full or read-only disk: leave nothing of ours behind
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        for d in (path, *made) if created else made:
            try:
                d.rmdir()  # only while empty: nothing of the user's is ever removed
            except OSError:
                pass
        raise LayerfastError(f"cannot write to the out dir {path}: {exc.strerror or exc}") from None
    return path, created


def _ours(path: Path) -> set[str]:
    """Which of the files a run writes in `path` exist now."""
    from layerfast.store import LOCKNAME, STORE_FILES

    return {n for n in (*OUTPUTS, *STORE_FILES, LOCKNAME) if (path / n).exists()}


@contextlib.contextmanager
def _removed_on_bad_input(path: Path, created: bool, existed: set[str],
                          store: Any) -> Iterator[None]:
    """Bad input found during the pass (non-finite logits, a model that fails on a later
    batch) must leave nothing behind either: an out dir this run created goes, with its store
    and lock (there is nothing to resume); in one it did not, the files a run writes are put
    back as they were (`existed`: those there before the run), what `--fresh` or a new pass
    set aside included. Ctrl-C and internal errors keep the run's store: a rerun resumes."""
    from layerfast.store import LOCKNAME, STORE_FILES, restore

    try:
        yield
    except LayerfastError:
        store.close_db()  # the lock stays held until the files are as they were
        if created:
            shutil.rmtree(path, ignore_errors=True)
        else:
            restore(path, (OUTPUTS, STORE_FILES, (LOCKNAME,)), existed)
        raise


def _check_out_files(path: Path, fresh: bool) -> None:
    """Bad input about the out dir's contents, before the lock and the store are taken:
    a directory where an output goes (an IsADirectoryError traceback once the pass was done),
    and results that no layerfast run's store accounts for (a copied run dir, a user's own
    results.csv), which a run used to replace without `--fresh`."""
    from layerfast.store import FILENAME, LOCKNAME, PREVIOUS

    for name in (*OUTPUTS, FILENAME, LOCKNAME):
        p = path / name
        if p.exists() and not p.is_file():
            raise LayerfastError(f"{p} is not a regular file, and the run writes its {name} "
                                 "there: remove it or choose another --out")
    aside = path / PREVIOUS
    if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
        raise LayerfastError(f"{aside} is not a directory, and the run keeps what it "
                             "replaces there: remove it or choose another --out")
    found = [n for n in OUTPUTS if (path / n).exists()]
    if found and not fresh and not (path / FILENAME).exists():
        # A --fresh run stopped (killed) right after setting the old store aside: say where it is
        why = (f" (a --fresh run was stopped after moving it into {aside})"
               if (aside / FILENAME).is_file() else "")
        raise LayerfastError(f"{path} already holds {', '.join(found)}, but no {FILENAME} of the "
                             f"run that wrote them{why}: pass --fresh to replace them, or choose "
                             "another --out")


def _fresh_dir(parent: Path, stem: str) -> Path:
    """`parent/stem`, or `stem-2`, `stem-3`, ... when taken: two runs started in the same second
    (a shell loop over archs' seeds, say) must not share a directory, where the second would
    delete the first's finished results. `mkdir` without exist_ok claims the name atomically."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayerfastError(f"cannot write to the out dir {parent}: {exc.strerror or exc}") from None
    for i in range(1, 1000):
        path = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise LayerfastError(f"cannot write to the out dir {path}: {exc.strerror or exc}") from None
        return path
    raise LayerfastError(f"{parent}: 999 directories named {stem}*: name one with --out")


def _remove_outputs(path: Path) -> None:
    """Outputs of an earlier run must not sit next to a pass in progress looking finished:
    they are set aside until this run has written its own (or put back on bad input). The
    hidden temporaries of a killed run's output writes are deleted (called with the lock
    held, before the pass and again before the outputs are written)."""
    from layerfast.report.tables import remove_temporaries
    from layerfast.store import set_aside

    set_aside(path, OUTPUTS)
    # a SIGKILLed output write leaves its temporary; under the lock none is anyone else's
    remove_temporaries(path, OUTPUTS)


def _versions() -> dict:
    import layerfast

    return {"layerfast": getattr(layerfast, "__version__", None), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def _command() -> str:
    """The command that ran this analysis, quoted so a shell takes it as it was (`--units
    'fc[12]'` unquoted is a glob): `layerfast ...` from the command line, whatever the entry
    point's path; from Python, the script and its arguments (run.json's `cwd` is beside it)."""
    import shlex

    from layerfast import cli

    if cli.INVOKED is not None:
        return shlex.join(["layerfast", *cli.INVOKED])
    # orig_argv keeps `-c CODE` and `-m MODULE`, which sys.argv reduces to "-c"
    return shlex.join([Path(sys.executable).name, *getattr(sys, "orig_argv", sys.argv)[1:]])


def _file_ids(ck: Any) -> dict[str, list]:
    """Name, size and mtime of each checkpoint: retraining into the same directory changes them,
    and progress summed over the old weights must not be continued with the new ones."""
    ids = {}
    for label, f in ck.files.items():
        st = f.stat()
        ids[str(label)] = [f.name, st.st_size, st.st_mtime_ns]
    return ids


def _data_ids(spec: str) -> list[str] | None:
    """The files the data spec reads (path, size, mtime of each, hashed): data rewritten between
    an interrupted run and its rerun, with the same sample count, must not be resumed over.
    Hidden files are left out, as every reader leaves them out: Finder rewriting a `.DS_Store`
    refused to resume a run over an unchanged image folder. So is what hidden folders hold,
    but for image files: imagefolder reads those, as torchvision does (`cat/.thumbs/a.png` is
    a sample), and one rewritten there must not be resumed over."""
    from layerfast.data.imagefolder import _is_image
    from layerfast.data.spec import data_paths

    def read(p: Path, root: Path) -> bool:
        *folders, name = p.relative_to(root).parts
        hidden = any(q.startswith(".") for q in folders)
        return p.is_file() and not name.startswith(".") and (not hidden or _is_image(name))

    paths = data_paths(spec)
    if not paths:
        return None
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(
            p for p in _files_under(root) if read(p, root))
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [str(p) for p in paths] + [h.hexdigest()]


def _files_under(root: Path) -> Iterator[Path]:
    """Every file under `root`, following linked folders as imagefolder does (`cat ->
    /data/cat`): `Path.rglob` does not follow them before Python 3.13, so an image rewritten
    there left the fingerprint as it was. A folder reached twice (a link loop) is walked once."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        yield from (Path(folder) / n for n in names)


def _keeps_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with torch's CPU random state put back afterwards: the model's factory draws
    its initialization, a model may draw in its forward, and a notebook's `torch.manual_seed(0);
    analyze(...); torch.randn(3)` must draw what it would without the analysis. And with
    float32 as torch's default dtype (`precision.float32_default`): a notebook's float64
    default built the model in float64, so the run drew other rerandom weights than fp32's
    while run.json said fp32."""
    @functools.wraps(fn)
    def kept(*args: Any, **kwargs: Any) -> Any:
        from layerfast.engine.precision import float32_default

        with torch.random.fork_rng(devices=[]), float32_default():
            return fn(*args, **kwargs)

    return kept


@refused_paths_are_input
@exclusive  # outside _keeps_rng: the saved random state is this call's own
@_keeps_rng
def analyze(arch: str | Callable[..., torch.nn.Module],
            ckpts: str | os.PathLike[str] | Mapping[int, Mapping[str, torch.Tensor]],
            data: str | os.PathLike[str] | tuple[Any, ...] | None = None,
            split: str = "test", granularity: str = "layer",
            units: str | Sequence[str] | None = None,
            bn: str = "with-layer", reset: str | Sequence[str] | None = RESETS,
            checkpoints: str | int | Iterable[int] = "all",
            seeds: int | str | Iterable[int] = 1,
            threshold: float = 0.05, device: str = "auto", precision: str = "auto",
            batch_size: int | None = None, max_samples: int | None = None,
            out: str | os.PathLike[str] | None = None, final: int | None = None,
            fresh: bool = False, progress: bool = True, figures: bool = True,
            fanout: bool | str | None = None, checkpoint_every: float | None = None,
            layout: str = "auto", alphas: str | Iterable[float] | None = None,
            sigma: float | str | Iterable[float] = 0.0, quiet: bool = False) -> Analysis:
    """Reset every unit of the final model to each checkpoint τ and to fresh draws, evaluate all
    variants in one data pass, and write results.csv, distances.csv, run.json and the figures.

    `data`: the data spec to evaluate on; None takes the one the checkpoints' manifest.json
    names (`layerfast train` writes it), and without one is an error. `checkpoints`: "all" or
    labels; `seeds`: a count n (seeds 1..n) or explicit seeds; both are sorted and repeats
    dropped, so the order given changes no row and no resume. `reset` may name "interp" (not a
    default kind): each unit := (1 − α)·θ^τ + α·θ^final for every α in `alphas` (in [0, 1])
    and every chosen τ but the final, plus Gaussian noise of each std in `sigma` on its
    parameters (one variant per seed when σ > 0; `layerfast.interp`). Resumes a killed run in
    the same `out` with the same arguments (progress saved every `checkpoint_every` seconds,
    default $LAYERFAST_CHECKPOINT_EVERY or 5); refuses different arguments there unless
    `fresh`. Everything is validated before `out` is touched, so bad input leaves no files
    in it. `quiet` (Python only): no `layerfast: warning:` lines on stderr, for a loop of many
    analyses; the warnings are still in run.json (`.run["warnings"]`). `progress=False` hides
    the bar.

    In memory (`layerfast.inputs`): `arch` may be a class or function returning an nn.Module
    (called as a `module:factory` is), `ckpts` a mapping {τ: state_dict} (which needs `data`),
    `data` a pair (x, y) of tensors or arrays (what a .npz with arrays x and y holds), or
    (x, y, num_classes) when the labels miss a class; they are written once to a
    content-addressed folder under the temp dir, so a rerun with the same objects resumes, and
    run.json's `inputs` says which were in memory.
    """
    from layerfast.checkpoints.stored import stored_dtypes
    from layerfast.engine import Evaluator
    from layerfast.engine.precision import model_dtype, resolve_device
    from layerfast.inputs import materialise, named_as_passed
    from layerfast.interp import interp_requests
    from layerfast.models.identity import definition_id
    from layerfast.store import PREVIOUS, ResumeStore
    from layerfast.units import make_units, tied_across_units
    from layerfast.variants import make_variants

    t0 = time.perf_counter()
    fresh, progress = flag(fresh, "fresh"), flag(progress, "progress")
    figures, quiet = flag(figures, "figures"), flag(quiet, "quiet")
    f = parse_flags(reset, alphas, sigma, seeds, threshold, batch_size, max_samples, final,
                    checkpoints, units)
    resets, interp, seed_list, seeded = f.resets, f.interp, f.seed_list, f.seeded
    threshold, final, batch_size, max_samples = f.threshold, f.final, f.batch_size, f.max_samples
    chosen, patterns = f.checkpoints, f.patterns
    if out is not None:  # else `Path(out)` fails once the model and the data have been read
        check_dir_path(out)
    resolve_device(device)  # up front: an unknown or absent device, before anything is read
    ckpts, data, inputs = materialise(ckpts, data, split)  # in-memory ones: written as files
    if not isinstance(ckpts, str | os.PathLike):
        raise LayerfastError(f"ckpts must be the path of a checkpoint directory or a mapping "
                             f"{{τ: state_dict}}; got a {type(ckpts).__name__}")
    data, named_by = _data_spec(data, ckpts)

    # Every `warn` from here on is also kept in run.json ("warnings"): stderr is gone when a
    # job's log is, and a warning is part of judging the run. So `quiet` loses none of them.
    with collect_warnings() as warned, quiet_warnings(quiet), named_as_passed(ckpts, data, inputs):
        every = _checkpoint_every(checkpoint_every)  # an infinite interval warns
        if not seeded and seed_list != [1]:  # 1 is the default: said only if asked
            warn(f"--seeds {','.join(map(str, seed_list))} has no effect: only rerandom (and "
                 f"interp with --sigma > 0) draws seeds, and --reset is {','.join(resets)}")
        model, spec, ck, src = build(arch, ckpts, data, split, final, max_samples, chosen)
        arch = arch if isinstance(arch, str) else spec.name  # a callable: `module:qualname`
        named = None if named_by or inputs else _other_data(data, ck)  # in memory: unnamed
        if named is not None:
            warn(f"--data {data!r} is not the data {ck.path / 'manifest.json'} names "
                 f"({named!r}), which the checkpoints were trained on; evaluating on {data!r}")
        if ck.incomplete:  # analysing a cut-short run can be the point; it must not be silent
            warn(f"{ck.path}: {ck.incomplete}; analysing the checkpoints it has")
        trained_as = (ck.manifest or {}).get("arch")
        if isinstance(trained_as, str) and trained_as != arch:  # the weights fitted: say it
            warn(f"{ck.path}: manifest.json says the checkpoints are {trained_as!r}; analysing "
                 f"them as {arch!r}")
        trained = (ck.manifest or {}).get("warnings")
        for w in trained if isinstance(trained, list) else ():  # still true of these checkpoints
            warn(f"{ck.path}: its training run warned: {w}")
        unit_list = make_units(model, granularity=granularity, patterns=patterns, bn=bn, arch=spec)
        for line in tied_across_units(model, unit_list):
            warn(line)
        taus = ck.labels if chosen == "all" else chosen
        stored = stored_dtypes(ck, model, taus)
        # The paper resets to earlier checkpoints; a later one asks another question. Analysing
        # the initialization (`--final 0`) has only later ones, on purpose.
        later = [t for t in taus if t > ck.final] if ck.final != ck.labels[0] else []
        if later:
            shown = ", ".join(map(str, later[:8])) + (", ..." if len(later) > 8 else "")
            warn(f"checkpoint{'s' * (len(later) > 1)} {shown} come{'s' * (len(later) == 1)} "
                 f"after the final model ({ck.final}): their rows reset units to weights "
                 f"trained past it (--checkpoints up to {ck.final} keeps to earlier ones)")
        variants = make_variants(
            model, unit_list, ck, spec, reset=[r for r in resets if r != "interp"],
            checkpoints=chosen, seeds=seed_list,
            interp=interp_requests(unit_list, taus, ck.final, *interp) if interp else None)
        ev = Evaluator(model, variants, device=device, precision=precision, batch_size=batch_size,
                       fanout=fanout, layout=layout)
        ev.plan_batch(src)  # B is part of the fingerprint: the planner picks it before the pass
        # Everything that changes the per-batch sums; threshold and figures do not, so a finished
        # run can be re-judged at another threshold without evaluating again.
        fingerprint = {
            # the arch's definition too: an edited mynet.py under the same name is another model
            "arch": arch, "model": definition_id(model, getattr(spec, "factory", None)),
            "ckpts": str(Path(ckpts).resolve()), "files": _file_ids(ck),
            "final": ck.final, "data": data, "data_files": _data_ids(data), "split": split,
            # a cap above the data's size cuts nothing (n says what ran): a rerun without it
            # must resume, as README promises for options that change nothing evaluated
            "max_samples": None if max_samples is not None and max_samples > src.n
            else max_samples, "n": src.n,
            "granularity": granularity, "units": patterns, "bn": bn, "reset": resets,
            "checkpoints": taus, "variants": len(variants),
            # only rerandom and interp's noise draw seeds: else they change nothing, and must
            # not refuse a rerun
            "seeds": seed_list if seeded else [],
            **({"alphas": interp[0], "sigma": interp[1]} if interp else {}),
            "device": str(ev.device), "precision": ev.precision, "batch_size": ev.batch_size,
            "fanout": ev.fanout, "max_fanout": ev.max_fanout, "channels_last": ev.channels_last,
            # progress counts samples over the passes, pass-major: which variants each pass
            # holds decides what a resumed count continues (a hash: 100s of indices)
            "passes": len(ev.passes()),
            "pass_layout": hashlib.sha256(json.dumps(ev.passes()).encode()).hexdigest()[:16],
        }
        t_build = time.perf_counter() - t0
        path, created = _out_dir(out, arch, fingerprint)
        _check_out_files(path, fresh)
        existed = _ours(path)
        # the lock first: a run that finds another holding it must not remove that one's dir
        with ResumeStore(path, fingerprint, len(variants), fresh, created) as store:
            with _removed_on_bad_input(path, created, existed, store):
                prev = store.load()
                # The baseline agrees with itself on every sample it has seen, whatever the
                # model. It is variant 0, in the first pass: `n_done` counts samples over the
                # passes, so it has seen min(n_done, n) of them. (Zeroed sums resumed as 100%
                # error, exit 0.)
                if prev.counts is not None and float(prev.counts[0, 3]) != min(prev.n_done,
                                                                               src.n):
                    raise LayerfastError(
                        f"{store.path} is damaged: its baseline row does not count the "
                        f"{min(prev.n_done, src.n)} samples it has seen; pass --fresh to start "
                        "over there")
                _check_progress(store.path, prev, src.n, len(ev.passes()))
                if named_by is not None:  # even --quiet: said once all is validated
                    say(f"layerfast: --data not given: evaluating on {data!r} ({split} split), "
                        f"the data {named_by} names")
                if prev.complete:
                    counts, n_done = prev.counts, prev.n_done
                    engine = {**prev.info, "resumed_from": n_done, "evaluated": 0}
                else:
                    _remove_outputs(path)
                    counts, n_done, engine = _run_pass(ev, src, store, prev, progress, every)
                # bad input, found after the pass
                _check_finite_logits(variants, counts, data, ev.precision, model)
            # Still holding the out dir's lock: a second run (--fresh) must not delete what this
            # one is writing, nor leave run.json beside another run's results.csv. A failure
            # from here on (a full disk) is not bad input: the finished store stays, and the
            # same command again only writes the outputs.
            t_pass = time.perf_counter() - t0 - t_build
            result = _write_outputs(
                path, variants, counts, n_done, engine, unit_list, model, spec, ck, resets, chosen,
                figures, t0, {"build": t_build, "pass": t_pass},
                run={
                    "arch": arch, "ckpts": str(Path(ckpts).resolve()),
                    "checkpoints": {str(k): ck.files[k].name for k in ck.labels}, "final": ck.final,
                    "data": data, "split": split, "max_samples": max_samples, "n": n_done,
                    "num_classes": engine["num_classes"], "device": str(ev.device),
                    "precision": ev.precision, "model_dtype": model_dtype(model),
                    "channels_last": ev.channels_last,
                    "fanout": ev.fanout,  # what ran (--fanout auto is on for CUDA only)
                    "batch_size": ev.batch_size, "granularity": granularity,
                    "units": [u.name for u in unit_list], "patterns": patterns, "bn": bn,
                    "reset": resets, "evaluated_checkpoints": taus, "seeds": seed_list,
                    **({"alphas": interp[0], "sigma": interp[1]} if interp else {}),
                    "threshold": threshold, "variants": len(variants), "versions": _versions(),
                    "command": _command(), "cwd": os.getcwd(),
                    "checkpoint_dtypes": stored,
                    "manifest": {k: v for k, v in (ck.manifest or {}).items() if k != "checkpoints"},
                    "incomplete": ck.incomplete,
                    "warnings": warned,  # filled until run.json is written: the chance note too
                    **({"inputs": inputs} if inputs else {}),  # which were in memory
                })
            shutil.rmtree(path / PREVIOUS, ignore_errors=True)  # what it replaced can go now
            return result


def _run_pass(ev: Any, src: Any, store: Any, prev: Any, progress: bool,
              every: float) -> tuple[torch.Tensor, int, dict]:
    """The engine pass from where `prev` stopped, saving progress into `store` as it goes."""
    from layerfast.engine.resumestate import StateMismatch

    passes = len(ev.passes())
    bar = _progress(progress, src.n * passes, prev.n_done, len(ev.variants),
                    f" in {passes} passes" if passes > 1 else "")
    store.engine_state = ev.resume_state  # saved with each segment, for the next rerun
    try:
        res = ev.run(src, start=prev.n_done, counts=prev.counts, state=prev.info.get("resume"),
                     on_progress=(lambda n: bar.update(n - bar.n)) if bar else None,
                     on_checkpoint=store.save, checkpoint_every=every)
    except StateMismatch as exc:  # said of the store it came from, as its other damage is
        raise LayerfastError(f"{store.path}: {exc}") from None
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (cli's handler): say what is kept
        if bar:
            bar.close()
            bar = None
        _say_saved(store, src.n, passes)
        raise
    finally:
        if bar:
            bar.close()
    engine = {"plan": res.plan, "timings": res.timings, "num_classes": res.num_classes,
              "resumed_from": prev.n_done, "evaluated": res.n * passes - prev.n_done,
              "checkpoint_every": every}
    store.finish(res.counts, res.n, engine)
    return res.counts, res.n, engine


def _check_progress(path: Path, prev: Any, n: int, passes: int) -> None:
    """A store marked finished is written out without evaluating again, so it must hold what
    `_run_pass` records at the end: every sample counted (a finished pass saves `n`, however
    many passes it took) and the engine record the outputs read (the class count, the plan).
    A hand edit that set `complete` on an unfinished store, or emptied its record, was a
    KeyError traceback, or results over part of the data written as the finished run. An
    unfinished one resumes at `n_done` of the `n` × `passes` samples: past them, the engine's
    "start offset 1000 is outside 0..64" said nothing of the store."""
    from layerfast.engine.plan import _is_int

    classes, plan = prev.info.get("num_classes"), prev.info.get("plan", {})
    if not prev.complete:
        if prev.n_done <= n * passes:
            return
        over = f" ({n * passes} over this run's {passes} passes)" if passes > 1 else ""
        why = f"it records {prev.n_done} samples done, but the data has {n}{over}"
    elif prev.n_done != n:
        why = f"it is marked finished after {prev.n_done} of the {n} samples"
    elif not _is_int(classes) or classes < 2 or not isinstance(plan, dict):
        why = "it is marked finished but holds no engine record of the pass"
    else:
        return
    raise LayerfastError(f"{path} is damaged: {why}; pass --fresh to start over there")


def _say_saved(store: Any, n: int, passes: int) -> None:
    """One stderr line on an interrupted pass: how far a rerun of the same command resumes
    from (the last save, not the moment of the interrupt)."""
    try:
        done = store.load().n_done
    except LayerfastError:
        return
    over = f" (over {passes} passes)" if passes > 1 else ""
    say(f"layerfast: {done} of {n * passes} samples{over} are saved in {store.path}; the same "
        "command resumes from there")


def _bf16_overflows(model: torch.nn.Module) -> list[str]:
    """The model's float32 tensors that are finite but that bf16 rounds to Inf (|x| beyond
    about 3.396e38, bfloat16's largest value 3.390e38 plus half a step): under bf16 autocast
    they are Inf in every convolution and matmul, while the fp32 pass evaluates them."""
    return [k for k, t in model.state_dict().items()
            if t.dtype == torch.float32 and bool(torch.isfinite(t).all())
            and not bool(torch.isfinite(t.to(torch.bfloat16)).all())]


def _check_finite_logits(variants: list, counts: torch.Tensor, data: str,
                         precision: str = "fp32", model: torch.nn.Module | None = None) -> None:
    """A NaN or Inf logit makes the loss sum non-finite, and its sample's error count means
    nothing (every comparison with NaN is false). Read from the sums after the pass, so the
    pass itself never waits on the device: a baseline with such logits is bad input (weights
    or BatchNorm statistics that overflow, or non-finite inputs), a variant with them a warning
    naming it (its reset made the network overflow; its loss is NaN, empty in results.csv, or
    +inf, the true mean cross-entropy when the label's logit is -inf and another's is not)."""
    loss = counts[:, 2].double()
    if not math.isfinite(float(loss[0])):
        # bf16's range is float32's less the top half-step: a weight there is finite in the
        # checkpoint (its check passed, fp32 evaluates it), so the checkpoint is not to blame
        over = _bf16_overflows(model) if precision == "bf16" and model is not None else []
        if over:
            shown = ", ".join(over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
            raise LayerfastError(
                f"the final model gives NaN or Inf logits on {data!r} under --precision bf16: "
                f"{shown} hold{'s' if len(over) == 1 else ''} float32 values beyond bfloat16's range (|x| > "
                f"{torch.finfo(torch.bfloat16).max:.4g}), which bf16 rounds to Inf; "
                "--precision fp32 evaluates them")
        under = " under --precision bf16" if precision == "bf16" else ""
        bf16 = "; or bf16's rounding overflows: --precision fp32 tells which" if under else ""
        raise LayerfastError(
            f"the final model gives NaN or Inf logits on {data!r}{under}: its weights or "
            "BatchNorm statistics overflow (a diverged or corrupted checkpoint, a negative "
            "running_var?) or the data holds non-finite values; its errors would mean "
            f"nothing{bf16}")
    bad = [v.label for v, x in zip(variants, loss.tolist(), strict=True) if not math.isfinite(x)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warn(f"{len(bad)} variant{'s' if len(bad) > 1 else ''} gave NaN or Inf logits on some "
             f"samples ({shown}): the reset makes the network overflow there, so their error "
             "counts are not meaningful and their loss is empty (NaN) or inf in results.csv"
             + ("; under --precision bf16 the cause may be bf16's range (float32 values "
                "beyond it round to Inf): --precision fp32 tells" if precision == "bf16" else ""))


def _write_outputs(path: Path, variants: list, counts: torch.Tensor, n_done: int, engine: dict,
                   unit_list: list, model: torch.nn.Module, spec: Any, ck: Any,
                   resets: list[str], chosen: str | list[int], figures: bool, t0: float,
                   timings: dict, run: dict) -> Analysis:
    """results.csv, distances.csv, the figures, and run.json last: a run.json on disk means
    every other output of that run is complete."""
    from layerfast import report
    from layerfast.engine.plan import warn_plan
    from layerfast.metrics import results_table

    t1 = time.perf_counter()
    _remove_outputs(path)  # a write that fails must not leave the old run.json beside new files
    table = results_table(variants, counts, n_done, engine["num_classes"], run["threshold"])
    note = _chance_note(table, engine["num_classes"], run["threshold"], run["split"])
    if note:  # every verdict would read "robust" against a baseline with nothing to lose
        warn(note)
        run["baseline_note"] = note
    warn_plan(engine.get("plan") or {})
    dist, why_none = _distance_rows(variants, unit_list, model, spec, ck, chosen)
    if why_none:
        run["distances_note"] = why_none  # why distances.csv holds only its header, no figure
    report.write_csv(table, path / "results.csv")
    report.write_csv(dist, path / "distances.csv")
    result = Analysis(table, dist, run, path, unit_list)
    if figures:
        if report.has_heatmap(table):
            result.plot(kind="heatmap")
        else:  # interp alone: the paper's figure has no row for it; the summary's grid has
            run["heatmap_note"] = ("no heatmap: the run has only interp rows, which the "
                                   "paper's figure has no place for (the summary shows them)")
        if len(dist):
            result.plot(kind="distances")
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings["outputs"] = round(time.perf_counter() - t1, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    run.update(engine=engine, timings=timings, seconds=timings["total"])
    with report.atomic_path(path / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=2, default=str))
    return result


def _chance_note(table: pd.DataFrame, num_classes: int, threshold: float,
                 split: str = "test") -> str | None:
    """Why the verdicts mean nothing, when the final model is itself within `threshold` of
    chance (1 - 1/C): no reset can then make it more than `threshold` worse on average, so
    every unit reads "robust" (a diverged run, the wrong checkpoint directory, the wrong data).
    The error is named by the `split` measured, as the summary and the heatmap name it."""
    chance = 1.0 - 1.0 / num_classes
    base = float(table.loc[table["kind"] == "baseline", "error"].iloc[0])
    if base + threshold < chance:
        return None
    which = "train" if split == "train" else "test"
    return (f"the final model's {which} error ({100 * base:.2f}%) is within the threshold "
            f"({100 * threshold:g} points) of chance ({100 * chance:.2f}% for {num_classes} "
            f"classes): the robust/critical verdicts say nothing about the units")


def _distance_rows(variants: list, unit_list: list, model: torch.nn.Module, spec: Any, ck: Any,
                   chosen: str | list[int]) -> tuple[pd.DataFrame, str | None]:
    """distances.csv's rows, and why there are none when there are none.

    DESIGN §5 defines distances per unit per τ, whatever `--reset` asks to evaluate, so the τ
    rows are those of the evaluated checkpoints (`--checkpoints`, default all) for every reset
    kind, reinit or not; rerandom rows come with the rerandom variants. All of it is measured
    from θ⁰, so a directory without τ = 0 gives no rows, and the returned reason says so.
    With interp rows the final τ is measured too: it is the far end of every interpolation,
    and ‖θ^final − θ⁰‖ is what module criticality weighs α by (with `--checkpoints 0` alone
    the rows held only zeros)."""
    from layerfast.distances import COLUMNS
    from layerfast.distances import distances as unit_distances

    if 0 not in ck.labels:
        found = ", ".join(map(str, ck.labels))
        return pd.DataFrame(columns=COLUMNS), (
            f"no distances: they are measured from the initialization (τ=0), and the checkpoint "
            f"directory has only τ = {found}")
    rr = [v for v in variants if v.kind == "rerandom"]
    if chosen != "all" and ck.final not in chosen and any(v.kind == "interp" for v in variants):
        chosen = sorted({*chosen, ck.final})  # in τ order, as every row: `--final` may be earlier
    dist = unit_distances(model, unit_list, ck, rerandom=rr, arch=spec, checkpoints=chosen)
    return dist, None


def _progress(enabled: bool, total: int, done: int, nvar: int, how: str = "") -> Any:
    """A tqdm bar on stderr (stdout stays clean for the summary), starting at resumed samples
    (samples over all passes when the variants take several)."""
    if not enabled or progress_stream() is None:
        return None
    return progress_bar(total=total, initial=done, unit="img", desc=f"{nvar} variants{how}",
                        dynamic_ncols=True, leave=False)


def list_units(arch: str | Callable[..., torch.nn.Module],
               data: str | tuple[Any, ...] | None = None, granularity: str = "layer",
               units: str | Sequence[str] | None = None, bn: str = "with-layer",
               num_classes: int | None = None,
               ckpts: str | os.PathLike[str] | Mapping[int, Any] | None = None,
               split: str = "test") -> list:
    """The units an analysis would reset, without evaluation (a dry run). Only the data's
    sample shape and class count matter (a conv net's units can depend on the input size):
    `data`, else with `ckpts` the data their manifest.json names (with analyze's errors for a
    directory it would refuse), else digits. In-memory `arch` and `data` as for `analyze`
    (nothing is written); in-memory `ckpts` name no data, so they need `data`. `split` is the
    one the analysis would read, opened as analyze opens it: a .beton of the train split under
    `--split train` was warned about as "used here as the test split"."""
    from layerfast.data import open_data
    from layerfast.engine.precision import float32_default
    from layerfast.inputs import need_data, open_pair
    from layerfast.models import build_model
    from layerfast.units import make_units

    need_data(ckpts, data)
    if isinstance(data, tuple | list):
        src = open_pair(data, max_samples=1)
    else:
        if data is None and ckpts:  # `--data ""` is a bad spec, refused as analyze refuses it
            data = _data_spec(None, ckpts)[0]
        src = open_data("digits" if data is None else data, split=split, max_samples=1,
                        split_flag="--split")
    if num_classes is None and isinstance(ckpts, str | os.PathLike):
        num_classes = _manifest_classes(Path(ckpts).expanduser())  # as analyze builds it
    # the factory's init draws: not the caller's; fp32 as analyze builds it
    with torch.random.fork_rng(devices=[]), float32_default():
        # `is None`, not `or`: num_classes=0 is refused by build_model, not read as "not given"
        model, spec = build_model(arch, src.num_classes if num_classes is None else num_classes,
                                  tuple(src.shape))
    from layerfast.units import tied_across_units

    unit_list = make_units(model, granularity=granularity, patterns=_parse_units(units), bn=bn,
                           arch=spec)
    for line in tied_across_units(model, unit_list):  # as analyze warns: a dry run shows it too
        warn(line)
    return unit_list
