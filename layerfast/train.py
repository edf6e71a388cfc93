"""`layerfast train`: train a registry model and save the paper's checkpoint schedule (DESIGN §2).

The analysis needs θ^τ at a few epochs τ, not a training framework, so this is a deliberately
thin loop: plain SGD with momentum, cross-entropy, no augmentation, fp32 (the model is built
with float32 as the default dtype, whatever the caller set; a factory that makes its model
float64 itself trains it in float64). What it guarantees:

* **Layout.** One file `epoch_{τ:03d}.pt` per checkpoint holding `model.state_dict()` (CPU
  tensors, loadable with `weights_only=True`) plus `manifest.json`, both written atomically
  (temporary file, fsync, `os.replace`), so a killed run never leaves a half-written file. The
  manifest is rewritten after every checkpoint (`"complete": false` until the end): a run killed
  at epoch 50 still leaves a readable directory of the checkpoints it reached. Its `warnings`
  list keeps every `layerfast: warning:` the run printed (a one-split data file).
* **Recorded errors match the analysis.** Each checkpoint is evaluated when saved, in eval mode,
  fp32 (TF32 off), on the *whole* test split in its stored order, top-1 = first maximal logit,
  counted on the device: the same definition as `layerfast.engine`, so the analysis's
  `fullmodel@τ` row reproduces `test_error` exactly.
* **Reproducible.** The CPU generator (and the training GPU's) seeded right before building the
  model (θ⁰ depends only on arch, data shape and seed, on any device: the model is built on the
  CPU), and a separate seeded CPU generator for the per-epoch shuffle (same order on CPU and
  CUDA). Python's `random` and numpy's global generator are seeded too (numpy with the seed
  mod 2³²), as `seed_everything` does: a user's factory that initialises with `np.random` or
  a forward that draws from `random` gets the same θ⁰ and the same run for the same seed. No
  other generator is touched, and all of these are restored afterwards.

The training split is gathered into memory once (uint8 stays uint8) and indexed by a fresh
permutation each epoch; `DataSource.batches` is sequential by contract, and MNIST / digits /
CIFAR-sized sets fit easily. On CUDA it is staged on the GPU when under 2 GiB (indexing there
avoids a host gather per batch), otherwise kept in host memory (`to_device` pins each batch).
Batches are normalised by `to_device`, exactly like evaluation. A trailing batch of a single
sample is skipped for that epoch (BatchNorm cannot train on one sample; the next shuffle covers
it).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import layerfast
from layerfast.checkpoints import MANIFEST, SUFFIXES, write_manifest
from layerfast.checkpoints.discover import read_manifest
from layerfast.checkpoints.save import save_atomic
from layerfast.data import open_data, to_device
from layerfast.data.source import DataSource, check_finite
from layerfast.data.spec import absolute_spec
from layerfast.engine.batches import check_logits
from layerfast.engine.precision import float32_default, precision_context, resolve_device
from layerfast.errors import (
    LayerfastError,
    collect_warnings,
    progress_bar,
    refused_paths_are_input,
    warn,
)
from layerfast.exclusive import exclusive
from layerfast.models import build_model, input_dtype, load_tensors
from layerfast.options import check_dir_path, count, flag, int_list, is_int
from layerfast.rng import forked_host_generators, seeded_host_generators

PAPER_CHECKPOINTS: tuple[int, ...] = (0, 1, 2, 3, 8, 40, 90, 100)
SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")
_EARLY = (0, 1, 2, 3)  # kept as they are: the paper's interesting changes happen here
_FILE_RE = re.compile(r"^epoch_\d+\.pt$")
_TMP_RE = re.compile(r"^\.(epoch_\d+\.pt|manifest\.json)\..+\.tmp$")
_STAGE_ON_GPU_BYTES = 2 << 30
_EVAL_BATCH = 1024
#: More epochs than any study trains (the paper: 100): the bound makes a typo such as
#: `--epochs 99999999999` a usage error up front instead of a run that never ends, whose final
#: label (from 2**63 on) analyze would refuse anyway.
MAX_EPOCHS = 10**6
#: A diverged run's advice. The option by its flag, as every train message names it (CLI and
#: Python alike, docs/decisions.md: `lr=` is `--lr`), and the rate as the chance note gives it:
#: "lower lr=0.1" named neither the flag of the CLI nor a form the other messages use.
_LOWER_LR = "lower --lr (this run's: {:g})"


def checkpoint_schedule(epochs: int,
                        checkpoints: Sequence[int] | str | None = None) -> list[int]:
    """The epochs τ at which to save, sorted and unique; 0 and `epochs` are always included.

    Default (None): the paper's 0, 1, 2, 3, 8, 40, 90, 100 for a 100-epoch run. For any other
    length the early epochs 0, 1, 2, 3 are kept as they are (those ≤ `epochs`) and only the
    later ones are scaled, τ' = round_half_up(τ·epochs/100), then deduplicated: 10 epochs ->
    0,1,2,3,4,9,10; 20 -> 0,1,2,3,8,18,20; 5 -> 0,1,2,3,5; 200 -> 0,1,2,3,16,80,180,200.
    An explicit list is used as given (each τ in 0..epochs), plus 0 and `epochs`: τ=0 is the
    re-initialization target and the final model is what training produced. A string is the
    CLI's form, `"0,1,10"`, so `train(checkpoints=...)` takes what `--checkpoints` takes; an
    int is one epoch, as `"5"` is (and as `analyze(checkpoints=5)` reads one label).
    """
    if not is_int(epochs) or epochs < 1:
        raise LayerfastError(f"--epochs must be a positive integer, got {epochs!r}")
    epochs = int(epochs)
    if epochs > MAX_EPOCHS:
        raise LayerfastError(f"--epochs must be at most {MAX_EPOCHS:,} (the paper trains 100), "
                             f"got {epochs}")
    if checkpoints is None:
        late = (math.floor(t * epochs / 100 + 0.5) for t in PAPER_CHECKPOINTS if t not in _EARLY)
        taus = {t for t in _EARLY if t <= epochs} | set(late)
    else:
        if isinstance(checkpoints, str):
            checkpoints = int_list(checkpoints, "--checkpoints")
        elif is_int(checkpoints):  # refused as "not a list", where "5" and analyze took it
            checkpoints = [checkpoints]
        if isinstance(checkpoints, bytes) or not isinstance(checkpoints, Iterable):
            raise LayerfastError(
                f"--checkpoints must be a list of epochs such as [0, 1, 10], got {checkpoints!r}"
            )
        taus = set()
        for t in checkpoints:
            if not is_int(t) or not 0 <= t <= epochs:
                raise LayerfastError(f"--checkpoints: epoch {t!r} is not an integer in "
                                     f"0..{epochs} (--epochs {epochs})")
            taus.add(int(t))
    return sorted(taus | {0, epochs})


def lr_at(schedule: str, lr: float, progress: float) -> float:
    """Learning rate at `progress` = epochs done / epochs (a float in [0, 1)).

    `train` sets it before every step, with progress counted in steps (epoch + step/steps per
    epoch), for every schedule:
    cosine: lr·(1 + cos(π·progress))/2 (no warm-up, ends near 0);
    step: lr, ÷10 from 50% and ÷100 from 75% of the training steps (the classic CIFAR recipe;
    both drops fall on epoch boundaries only when `epochs` is a multiple of 4, else one or both
    come mid-epoch: for 30 epochs the ÷100 comes halfway through epoch 23);
    constant: lr throughout.
    """
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return lr * (0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0)
    return lr


@torch.no_grad()
def evaluate(model: nn.Module, source: Any, device: torch.device) -> dict[str, Any]:
    """Top-1 error and mean cross-entropy over every sample of `source`, in stored order.

    Same counting as the engine (`layerfast.engine.naive`): argmax takes the first maximal
    logit, the last partial batch counts, fp32 with TF32 off, sums kept on the device and read
    once. Leaves the model in eval mode (callers restore train mode)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    with precision_context("fp32", device):
        for xb, yb in source.batches(_EVAL_BATCH):
            x, y = to_device(xb, yb, source, device, input_dtype(model), False)
            logits = _forward(model, x, "the test split").float()
            correct += (logits.argmax(1) == y).sum()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
    n, c = int(source.n), int(correct.item())
    return {"test_error": (n - c) / n, "test_loss": float(loss.item()) / n,
            "test_correct": c, "test_n": n}  # fmt: skip


def _old_checkpoints(out: Path) -> list[str]:
    """Names in `out` that would make it look like (or clash with) a checkpoint directory."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.is_file() and (p.name == MANIFEST or p.suffix.lower() in SUFFIXES))  # fmt: skip


def _check_out(out: Path, overwrite: bool, taus: Sequence[int]) -> None:
    """Refuse an unusable `out` without touching the disk, so that bad input found later still
    leaves nothing behind: a file in the way, old checkpoints and no `overwrite`, or something
    that is not a file (a directory) where the run will write `manifest.json` or the
    `epoch_NNN.pt` of an epoch in `taus`: that failed at its write, after `overwrite` had
    deleted the old run and the first checkpoints of the new one were written."""
    if out.exists() and not out.is_dir():
        raise LayerfastError(f"--out {out}: exists and is not a directory")
    if out.is_dir():  # one listing, not a stat per epoch of a long --checkpoints list
        written = {MANIFEST} | {f"epoch_{t:03d}.pt" for t in taus}
        for name in sorted(p.name for p in out.iterdir() if p.name in written):
            if (out / name).exists() and not (out / name).is_file():  # a dangling link is fine
                raise LayerfastError(f"--out {out}: {name} is in the way (not a file: this run "
                                     "writes a file of that name); remove it or choose another "
                                     "directory")
    old = _old_checkpoints(out)
    if old and not overwrite:
        shown = ", ".join(old[:5]) + (", ..." if len(old) > 5 else "")
        try:
            unfinished = (read_manifest(out) or {}).get("complete") is False
        except LayerfastError:
            unfinished = False
        why = (" of a run that did not finish (manifest.json: complete false; training does not "
               "resume, it starts over)") if unfinished else ""
        raise LayerfastError(
            f"--out {out} already holds checkpoints ({shown}){why}; pass --overwrite to replace "
            "them (overwrite=True from Python), or choose another directory"
        )


def _prepare_out(out: Path, overwrite: bool, taus: Sequence[int]) -> tuple[list[Path], Any]:
    """Create `out` (after `_check_out`, once every input is validated) and, with `overwrite`,
    delete the manifest and the `epoch_NNN.pt` files of an old run (other files are left alone;
    the new manifest lists exactly the new files, so discovery ignores them). `taus`: the
    epochs the run will save, as `_check_out` takes them.

    Returns the directories it created, innermost first, so a run that fails before writing
    anything can remove them again."""
    _check_out(out, overwrite, taus)
    created: list[Path] = []
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayerfastError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):  # before deleting anything of an old run
        _remove_created([], created)
        raise LayerfastError(f"--out {out}: the directory is not writable")
    # Two runs into one --out (a sweep that forgot to vary it) both passed the check above and
    # then overwrote each other's epoch files: the last manifest listed errors of weights that
    # the other run wrote. One run at a time, and the check repeated under the lock.
    lock = _lock(out, created)
    try:
        _check_out(out, overwrite, taus)
    except BaseException:
        _unlock(out, lock)
        raise
    # the hidden temporaries of a killed run's atomic writes (each as big as a checkpoint);
    # under the lock no other run is writing them
    for tmp in out.glob(".*.tmp"):
        if _TMP_RE.match(tmp.name) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
    for name in _old_checkpoints(out):
        if name == MANIFEST or _FILE_RE.match(name):
            try:
                (out / name).unlink()
            except OSError as exc:
                _unlock(out, lock)
                raise LayerfastError(
                    f"--out {out}: cannot remove the old {name} ({exc.strerror or exc})"
                ) from None
    return created, lock


def _lock(out: Path, created: list[Path]) -> Any:
    """`store`'s advisory lock on `out` (a second run there fails with a clear message)."""
    from layerfast.store import _acquire_lock

    try:
        return _acquire_lock(out)
    except BaseException:
        _remove_created([], created)
        raise


def _unlock(out: Path, lock: Any) -> None:
    """Drop the lock and its file (so that a run that wrote nothing leaves `out` as it was)."""
    if lock is None:
        return
    from layerfast.store import LOCKNAME

    with contextlib.suppress(OSError):
        (out / LOCKNAME).unlink()
    lock.close()


@contextlib.contextmanager
def _writing(out: Path, name: str) -> Iterator[None]:
    """A failed write (disk full, quota, permissions changed under the run) as one line: the
    atomic writes have already removed their temporary file, so `out` holds whole files only."""
    try:
        yield
    except OSError as exc:
        raise LayerfastError(f"--out {out}: cannot write {name} ({exc.strerror or exc})") from None


def _remove_created(files: Sequence[Path], dirs: Sequence[Path]) -> None:
    """Undo a run that failed before its first manifest: its files, then the directories it
    created (innermost first, only while empty: nothing of the user's is ever removed)."""
    for f in files:
        with contextlib.suppress(OSError):
            f.unlink()
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def _stop_recorded(out: Path, entries: list[dict], meta: dict[str, Any]) -> Iterator[None]:
    """Record in manifest.json (`"stopped"`) why a run that wrote checkpoints stopped early
    (a divergence, bad data, a model that fails mid-run): its `complete: false` manifest said
    only "interrupted or diverged", with an empty `warnings` list, and the message on the
    terminal was all there was. `analyze` of those checkpoints repeats the reason. Any other
    exception too (CUDA out of memory, a failing backward), as its type and first line: only a
    LayerfastError was kept, and they left "interrupted or diverged". An interrupt (Ctrl-C, a
    BaseException) is what that default says, and is left to it."""
    try:
        yield
    except Exception as exc:
        # Only beside what the manifest on disk already lists: the error may be that the
        # last checkpoint's manifest write failed. Best effort: the run's own error is raised.
        with contextlib.suppress(Exception):
            listed = len((read_manifest(out) or {}).get("checkpoints") or ())
            if listed:
                meta["stopped"] = _stop_reason(exc)
                with _writing(out, MANIFEST):
                    write_manifest(out, entries[:listed], **meta)
        raise


def _stop_reason(exc: Exception) -> str:
    """What `"stopped"` records: a LayerfastError's message as it is (written for the user);
    any other exception as its type and the first line of its message (torch's CUDA
    out-of-memory message runs on over several lines of allocator advice)."""
    if isinstance(exc, LayerfastError):
        return str(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def _warn_if_one_split(data: str, train_src: DataSource, test_src: DataSource) -> None:
    """A one-split source (an .npz without x_train/x_test, a .beton) serves the same samples as
    'train' and 'test'; the 'test' errors recorded in the manifest are then training errors, and
    the analysis of the run measures memorisation. Allowed (it is the user's data), but said."""
    k = min(64, train_src.n, test_src.n)
    if k == 0:
        return
    (xa, ya), (xb, yb) = (next(iter(s.batches(k))) for s in (train_src, test_src))
    if torch.equal(ya, yb) and xa.shape == xb.shape and torch.equal(xa, xb):
        warn(f"{data}: its train and test splits begin with the same {k} samples (a one-split "
             "file?); the test errors recorded will be training errors")


def _warn_if_at_chance(error: float | None, num_classes: int, lr: float) -> None:
    """Say when the trained model ended within 5 points of chance (1 − 1/C), analyze's own
    margin for a baseline whose verdicts say nothing: the run did not learn (too high a
    learning rate for the arch, as lr 0.1 is for a deep FCN on digits), and the only sign
    was that note, once the checkpoints were analysed."""
    chance = 1.0 - 1.0 / num_classes
    if error is not None and error + 0.05 >= chance:
        warn(f"the trained model's test error ({100 * error:.2f}%) is within 5 points of chance "
             f"({100 * chance:.2f}% for {num_classes} classes): it did not learn; another --lr "
             f"(this run's: {lr:g}; too high stalls a deep net as surely as too low) or more "
             "epochs may help")


def _check_seed(seed: object) -> None:
    """torch seeds take 64 bits; the manifest and the analysis store seeds as int64. A larger
    value used to fail inside `manual_seed` with a traceback, after `out` was created."""
    if not is_int(seed) or not -(2**63) <= seed < 2**63:
        raise LayerfastError(f"--seed must be an integer in -2**63..2**63-1, got {seed!r}")


def _check_step_sizes(model: nn.Module, lr: float, weight_decay: float) -> None:
    """SGD multiplies by lr and weight_decay in the parameters' dtype: a value beyond that
    dtype's range (`--lr 1e308` for float32 weights) failed at the first step, with torch's
    RuntimeError "value cannot be converted to type float without overflow" as a traceback,
    exit 1, after epoch_000.pt and a manifest were written. Refused before anything is."""
    for dtype in sorted({p.dtype for p in model.parameters() if p.is_floating_point()}, key=str):
        top = torch.finfo(dtype).max
        for name, v in (("--lr", lr), ("--weight-decay", weight_decay)):
            if v > top:
                raise LayerfastError(f"{name} must be at most {top:.4g}, the largest "
                                     f"{str(dtype).removeprefix('torch.')} the model's "
                                     f"weights hold; got {v:g}")


def _batch_sizes(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The training steps' (start, stop) over `n` samples: batches of `batch_size`, a lone
    trailing sample dropped (it would break BatchNorm's training statistics). With
    `batch_size` 1 every batch is one sample: none is dropped (the model's probe has already
    refused BatchNorm on batches of one)."""
    steps = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if batch_size > 1 and len(steps) > 1 and steps[-1][1] - steps[-1][0] == 1:
        steps.pop()
    return steps


def _probe(model: nn.Module, arch: str, source: DataSource, batch_size: int) -> None:
    """Before anything is written: the model must return one row of at least `num_classes`
    logits per sample in eval mode (analyze's probe and check), and logits again from a
    training-mode forward (a model may return a tuple only when training, as torchvision's
    GoogLeNet does) on 2 samples, or on 1 when training gives it a batch of one (BatchNorm
    cannot train on it), or, when 2 fail, on its smallest training batch (up to 64). Otherwise
    torch's error came as a traceback from the first evaluation or training step, after
    epoch_000.pt was written. It runs on a copy of the model that shares its tensors, when one
    can be made (else the model's state, plain attributes and modes are put back), under
    forked random states and fp32, so the seeded run trains exactly as without it."""
    from layerfast.build import _num_outputs, classes_from

    smallest = min(j - i for i, j in _batch_sizes(int(source.n), batch_size))
    # A copy that shares the parameters and buffers (no second model in memory); the buffers
    # a training forward updates (BatchNorm's statistics) are put back from clones below.
    tensors = [*model.parameters(), *model.buffers()]
    try:
        probe = copy.deepcopy(model, {id(t): t for t in tensors})
    except Exception:  # noqa: BLE001 - a model that cannot be copied: restored below instead
        probe = model
    buffers = [(b, b.clone()) for b in model.buffers()]
    saved = {k: v.clone() for k, v in model.state_dict().items()} if probe is model else {}
    # the modules' plain attributes (a step counter), which a model that cannot be copied
    # changes in its own forward
    plain = [(m, {k: v for k, v in vars(m).items() if isinstance(v, int | float | bool)})
             for m in model.modules()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        # fp32 as the training itself (the flags are global: a forward could read them)
        with torch.random.fork_rng(devices=[]), forked_host_generators(), \
                precision_context("fp32", torch.device("cpu")):
            width = _num_outputs(probe, source)
            if width < 2:  # one logit: cross-entropy is 0 from the first step; analyze refuses it
                raise LayerfastError(
                    f"{arch} returns {width} logit{'' if width == 1 else 's'} per sample "
                    f"({source.num_classes} class(es) in the data): cross-entropy over one logit "
                    "is 0 whatever the weights, so nothing would be learned, and analyze "
                    "refuses such a model; train a classifier with 2 or more classes")
            if width < source.num_classes:
                raise LayerfastError(
                    f"{arch} returns {width} logits per sample, but the data has "
                    f"{source.num_classes} classes, {classes_from(source.name, source)}: the "
                    "model needs one output per class")
            probe.train()
            tries = list(dict.fromkeys((min(smallest, 2), min(smallest, 64))))
            for k, size in enumerate(tries):
                try:
                    with torch.no_grad():
                        out = probe(torch.zeros(size, *source.shape, dtype=input_dtype(probe)))
                    break
                except Exception as exc:  # noqa: BLE001 - user code: anything it raises
                    if k + 1 < len(tries):
                        continue  # a model that needs more samples: its smallest batch
                    msg = " ".join(str(exc).split())[:300]
                    # a batch of one comes from a one-sample training split (--max-samples 1,
                    # whatever --batch-size says) or from --batch-size 1: name what made it
                    hint = ("" if size > 1
                            else "; train on 2 or more samples (--max-samples 2 or more)"
                            if source.n == 1 else "; use --batch-size 2 or more")
                    raise LayerfastError(
                        f"{arch} cannot train on a batch of {size} sample{'s' * (size > 1)} "
                        f"({type(exc).__name__}: {msg}){hint}") from exc
            try:
                check_logits(out, size)
            except LayerfastError as exc:
                raise LayerfastError(f"in training mode, {exc}") from None
    finally:
        with torch.no_grad():
            for b, before in buffers:
                b.copy_(before)
        if probe is model:
            load_tensors(model, saved)
            for m, attrs in plain:
                vars(m).update(attrs)
        for m, mode in modes:
            m.training = mode


def _forward(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """`model(x)`, with a failure of the user's model on one batch as a LayerfastError."""
    try:
        out = model(x)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: anything it raises is bad input
        if "CUDA error" in str(exc) or type(exc).__name__ == "AcceleratorError":
            raise  # a broken device, not the model (as analyze's Evaluator judges it)
        msg = " ".join(str(exc).split())[:300]
        raise LayerfastError(
            f"the model fails on {what} (a batch of {int(x.shape[0])}): "
            f"{type(exc).__name__}: {msg}"
        ) from exc
    check_logits(out, int(x.shape[0]))
    return out


def _gather(source: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as raw (x, y) tensors, staged where per-batch indexing is cheapest.

    Past `_STAGE_ON_GPU_BYTES` it stays in ordinary host memory: each batch is a fresh tensor
    (`x_all[idx]`), which `to_device` pins on its own, so pinning the whole split would only
    lock that much RAM for nothing."""
    xs, ys = zip(*source.batches(4096), strict=True)
    x, y = torch.cat(xs), torch.cat(ys).to(torch.int64)
    if device.type == "cuda" and x.nbytes + y.nbytes <= _STAGE_ON_GPU_BYTES:
        return x.to(device), y.to(device)
    return x, y


@refused_paths_are_input
@exclusive
def train(
    arch: str | Callable[..., nn.Module],
    data: str | os.PathLike[str],
    epochs: int,
    out: str | os.PathLike[str],
    checkpoints: Sequence[int] | str | None = None,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str = "auto",
    schedule: str = "cosine",
    progress: bool = True,
    max_samples: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train `arch` on `data` for `epochs`, saving checkpoints into `out`; returns the manifest.

    `arch`: a registry name, `package.module:factory`, or (as `analyze` takes it) the factory
    itself, recorded in the manifest as `module:qualname`.

    Hyper-parameters: SGD(lr, momentum, weight_decay on every parameter, as torchvision's
    reference scripts do), cross-entropy, schedule per `lr_at`. Defaults lr 0.1 / weight_decay
    5e-4 are the common CIFAR recipe for ResNets and VGG with BatchNorm; plain VGG usually wants
    0.01-0.05 (a diverging run stops with an error that says so). The FCN: 0.1 is right for
    short runs (digits, 5 cosine epochs: 5% test error at 0.1, 9% at 0.05, 31% at 0.01).
    `checkpoints`: see `checkpoint_schedule`. Each manifest entry's `train_loss` is the mean
    training loss of the steps of the epoch that ended at it (per sample, over the shuffled
    batches as they were trained, the weights moving between them: not a loss of the saved
    weights, which `test_loss` is; None for τ=0). `max_samples` caps the *training* split only
    (for quick runs); test errors are always over the full test split, so they stay comparable
    with an analysis of the same checkpoints. `device`: "auto" (CUDA when visible), "cpu",
    "cuda", "cuda:1", ...
    """
    if isinstance(data, os.PathLike):  # Path("x.npz"), as `out` may be: recorded as its string
        data = os.fspath(data)
    taus = checkpoint_schedule(epochs, checkpoints)
    epochs = int(epochs)  # a numpy integer or 0-d tensor too: the returned manifest is the JSON
    if schedule not in SCHEDULES:
        raise LayerfastError(f"unknown --schedule {schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
    progress, overwrite = flag(progress, "progress"), flag(overwrite, "overwrite")
    batch_size = count(batch_size, "--batch-size")
    if batch_size is None:
        raise LayerfastError("--batch-size must be a positive integer; got None")
    max_samples = count(max_samples, "--max-samples")  # numpy integers too: the manifest is JSON
    for name, v in (("--lr", lr), ("--momentum", momentum), ("--weight-decay", weight_decay)):
        # any real number (np.float32 too, as analyze's threshold), never a bool
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v)
                                       and v >= 0):
            # lr 0 is refused below too: its message must not invite it (`--help`: above 0)
            bound = "above 0" if name == "--lr" else ">= 0"
            raise LayerfastError(f"{name} must be a finite number {bound}, got {v!r}")
    # plain floats: the manifest is JSON, and the returned dict should equal what it holds
    lr, momentum, weight_decay = float(lr), float(momentum), float(weight_decay)
    if lr == 0:  # no step moves the weights: every checkpoint would equal θ⁰
        raise LayerfastError("--lr must be above 0 (0.1 is usual for SGD): with lr 0 every "
                             "checkpoint equals the initial weights")
    if momentum >= 1:  # the velocity would never decay: the run diverges, blamed on the lr
        raise LayerfastError(f"--momentum must be below 1 (0.9 is usual), got {momentum!r}")
    _check_seed(seed)
    seed = int(seed)  # a numpy integer too: the manifest is JSON
    check_dir_path(out)
    if not str(out).strip():  # Path("") is the current directory: checkpoints among its files
        raise LayerfastError("--out is empty: name the directory for the checkpoints")
    out = Path(out)
    _check_out(out, overwrite, taus)
    dev = resolve_device(device)

    # The caller's RNG state is restored afterwards: training reseeds, the caller should not see it.
    cuda_ids = []
    if dev.type == "cuda":
        cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with contextlib.ExitStack() as stack:
        # every warning also goes into the manifest, read when the run is analysed months later
        warned = stack.enter_context(collect_warnings())
        # opened inside the block: opening warns too (a .beton holding the other split), and
        # that warning reached stderr only, never the manifest. No --split: neither names one.
        train_src = open_data(data, split="train", max_samples=max_samples, split_flag=None)
        test_src = open_data(data, split="test", split_flag=None)
        if test_src.num_classes != train_src.num_classes or test_src.shape != train_src.shape:
            raise LayerfastError(
                f"{data}: train and test splits disagree (classes {train_src.num_classes} vs "
                f"{test_src.num_classes}, shape {train_src.shape} vs {test_src.shape})"
            )
        # Gradients on whatever the caller's mode: `train` called inside `torch.no_grad()` (or
        # `inference_mode`, where even the parameters would be built as inference tensors)
        # failed at its first `backward`, after epoch_000.pt and a manifest were written.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        # fp32 as documented: a caller's torch.set_default_dtype(torch.float64) built the model
        # in float64, which trained and saved float64 checkpoints (a factory that asks for
        # float64 itself, `.double()`, still gets it: `input_dtype` feeds it float64 data)
        stack.enter_context(float32_default())
        _warn_if_one_split(data, train_src, test_src)
        stack.enter_context(torch.random.fork_rng(cuda_ids))
        stack.enter_context(seeded_host_generators(seed))
        # θ⁰ depends on the seed only: built on the CPU, then moved. Only the generators that
        # fork_rng restores are seeded: torch.manual_seed would also reseed every other CUDA
        # device (all of them for a CPU run), which the caller would then see.
        torch.random.default_generator.manual_seed(seed)
        for i in cuda_ids:  # dropout & co. on the training GPU
            with torch.cuda.device(i):
                torch.cuda.manual_seed(seed)
        model, spec = build_model(arch, train_src.num_classes, train_src.shape)
        # a factory object (as `analyze` takes one) is named `module:qualname`, as analyze
        # names it: the manifest is JSON, and analyze compares its arch with the one it got
        arch = arch if isinstance(arch, str) else spec.name
        if not any(p.requires_grad for p in model.parameters()):  # SGD's bare ValueError else
            raise LayerfastError(f"{arch} has no trainable parameters: nothing to train")
        _probe(model, arch, train_src, batch_size)
        _check_step_sizes(model, lr, weight_decay)
        model.to(dev)
        x_all, y_all = _gather(train_src, dev)  # decodes every image: broken files show here
        # NaN/Inf inputs would show as a NaN loss, blamed on the learning rate: blame the data
        check_finite(f"{data}: the training inputs", x_all,
                     "training on them would only diverge. Fix or drop those samples.")
        # Only now, with every input validated, is anything written.
        created, lock = _prepare_out(out, overwrite, taus)
        # Until the first manifest exists, a failure (an undecodable test image, Ctrl-C) must
        # leave `out` as it was: `pending` is what to undo, emptied once a manifest lists it.
        # Both lists are empty by the time the run succeeds, so this undoes nothing then.
        pending: list[Path] = []
        stack.callback(_remove_created, pending, created)
        stack.callback(_unlock, out, lock)  # runs first: its file must go before the rmdir
        shuffle = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        n = int(y_all.shape[0])
        steps = _batch_sizes(n, batch_size)
        meta: dict[str, Any] = {
            # absolute: `analyze` without --data evaluates on it from any directory
            "arch": arch, "data": absolute_spec(data), "num_classes": train_src.num_classes,
            "in_shape": list(train_src.shape), "seed": seed, "epochs": epochs, "lr": lr,
            "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
            "schedule": schedule, "device": str(dev), "torch": torch.__version__,
            "layerfast": layerfast.__version__, "train_n": n, "max_samples": max_samples,
            "complete": False, "warnings": warned,
        }  # fmt: skip
        entries: list[dict[str, Any]] = []
        post: dict[str, str] = {}
        # a bar that cannot be written must not stop the training (errors.progress_stream)
        bar = stack.enter_context(progress_bar(progress, auto=True, total=epochs * len(steps),
                                               desc=f"train {arch}", unit="step",
                                               dynamic_ncols=True))  # fmt: skip

        def save(epoch: int, train_loss: float | None) -> None:
            name = f"epoch_{epoch:03d}.pt"
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            res = evaluate(model, test_src, dev)
            model.train()
            # A finite training loss does not prove a usable model: the last steps of an epoch
            # can still blow the weights up (lr too high), leaving inf/NaN weights or logits that
            # overflow (test loss NaN). Such a checkpoint is not written, and the run stops the
            # way a NaN training loss stops it, instead of ending "complete" with a broken model.
            broken = [k for k, v in state.items()
                      if v.is_floating_point() and not bool(torch.isfinite(v).all())]  # fmt: skip
            if broken or not math.isfinite(res["test_loss"]):
                why = (f"non-finite weights in {', '.join(broken[:3])}" if broken
                       else f"test loss {res['test_loss']}: its outputs overflow")  # fmt: skip
                if not epoch:
                    raise LayerfastError(f"the initial model of {arch} is not finite ({why})")
                raise LayerfastError(f"training diverged at epoch {epoch} ({why}); "
                                     f"{_LOWER_LR.format(lr)}")
            if not entries:
                pending.append(out / name)
            with _writing(out, name):
                save_atomic(state, out / name)
            entries.append({"epoch": epoch, "file": name, **res, "train_loss": train_loss})
            with _writing(out, MANIFEST):
                write_manifest(out, entries, **meta)
            pending.clear()  # listed by a manifest: a readable (if incomplete) run from now on
            created.clear()
            post["test_err"] = f"{res['test_error']:.4f}"
            bar.set_postfix(post, refresh=False)

        # fp32 as documented, whatever the caller's global flags say: on CUDA, convolutions
        # otherwise run in TF32 (cuDNN's default) and matmuls in TF32 after a
        # torch.set_float32_matmul_precision("high") elsewhere in the process.
        stack.enter_context(precision_context("fp32", dev))
        t0 = time.perf_counter()
        dtype = input_dtype(model)
        model.train()
        save(0, None)  # τ=0 is always in the schedule: the model before any step
        # a run that stops early says why in its manifest, not only on a terminal long gone
        with _stop_recorded(out, entries, meta):
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=shuffle).to(x_all.device)
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                seen = 0
                for s, (i, j) in enumerate(steps):
                    for group in opt.param_groups:
                        group["lr"] = lr_at(schedule, lr, (epoch + s / len(steps)) / epochs)
                    idx = perm[i:j]
                    x, y = to_device(x_all[idx], y_all[idx], train_src, dev, dtype, False)
                    loss = F.cross_entropy(_forward(model, x, f"training epoch {epoch + 1}"), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach().double() * (j - i)
                    seen += j - i
                    bar.update()
                train_loss = float(loss_sum.item()) / seen
                if not math.isfinite(train_loss):
                    raise LayerfastError(
                        f"training diverged at epoch {epoch + 1} (loss {train_loss}); "
                        f"{_LOWER_LR.format(lr)}"
                    )
                post["loss"] = f"{train_loss:.4f}"
                bar.set_postfix(post, refresh=False)
                if epoch + 1 in taus:
                    save(epoch + 1, train_loss)
        _warn_if_at_chance(entries[-1]["test_error"] if epochs else None,
                           train_src.num_classes, lr)
        meta.update(complete=True, train_seconds=round(time.perf_counter() - t0, 3))
        with _writing(out, MANIFEST):  # under the lock, as every file the run writes
            write_manifest(out, entries, **meta)
    return {"checkpoints": entries, **meta}
