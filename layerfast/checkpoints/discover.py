"""Which files of a checkpoint directory are checkpoints, and which τ each one is (DESIGN §2).

A label is the training time τ a file was saved at: `manifest.json` says it when present
(the layout `layerfast train` writes), otherwise the last integer in the file stem
(`epoch_003.pt` -> 3, `checkpoint-3.safetensors` -> 3). Anything ambiguous is an error rather
than a guess, because a wrong label silently mislabels every result row.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerfast.errors import LayerfastError

SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".safetensors")
MANIFEST = "manifest.json"
#: Labels are stored as int64 downstream (results tables, the resume store), so a label must be
#: below 2**63; a larger one would pass discovery and only fail after the whole evaluation.
MAX_LABEL = 2**63 - 1
_INT_RE = re.compile(r"\d+")
#: A shard of a checkpoint split over several files (Hugging Face's `save_pretrained`:
#: `model-00001-of-00002.safetensors`, `pytorch_model-00001-of-00003.bin`).
_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)$")
#: Lightning's ModelCheckpoint name-clash suffix: `epoch=2-step=24-v1`, `last-v1` (appended when
#: the name was already taken). The stem's last integer is then that version, not a τ.
_VERSION_RE = re.compile(r"^(?P<base>.+)-v(?P<version>\d+)$")
#: A Lightning metric in a file name: `epoch=2`, `step=24`, `val_loss=0.31`.
_LIGHTNING_RE = re.compile(r"\w=-?\d")
#: Suffixes training code also saves checkpoints under, which layerfast does not read (`.bin`:
#: Hugging Face's `pytorch_model.bin`; `.tar`: timm's `checkpoint-3.pth.tar`; pickles). Beside
#: checkpoints it reads, a labelled one is refused: skipped, it silently made an earlier τ the
#: final model.
FOREIGN_SUFFIXES: tuple[str, ...] = (".bin", ".tar", ".pkl", ".pickle")
#: Unfinished copies: a browser's download in progress (`epoch_3.pt.part`, Chrome's
#: `.crdownload`) or another tool's save cut short (`epoch_3.pt.tmp`). Labelled later than
#: every checkpoint read, they are refused as the foreign suffixes are: the final model is
#: still on its way.
PARTIAL_SUFFIXES: tuple[str, ...] = (".part", ".partial", ".crdownload", ".tmp")


def new_file_mode() -> int:
    """The mode a plainly created file gets here: 0o666 minus the process umask (0o644 usually).

    `tempfile.mkstemp` creates 0600 files, which atomic writers then rename into place; results
    and checkpoints are meant to be shared like any file `open()` creates. The umask can only be
    read by setting it, so it is set and restored at once.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def is_checkpoint_file(path: Path) -> bool:
    """A regular, non-hidden file with one of the supported suffixes (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SUFFIXES


def label_from_stem(stem: str) -> int | None:
    """The last integer in a file stem, or None: `epoch=3-step=300` -> 300."""
    found = _INT_RE.findall(stem)
    return int(found[-1]) if found else None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest.json, or None when the directory has none (a broken link to one is
    an error, as a broken link to a checkpoint is)."""
    path = directory / MANIFEST
    if _is_broken_link(path):
        # not "no manifest": the file names' integers would silently replace its epochs
        raise LayerfastError(
            f"{path} is a broken link (to {os.readlink(path)}); restore its target or remove "
            "the link."
        )
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, UTF-8, or an
        # integer of more than 4300 digits; RecursionError: arrays nested too deep
        raise LayerfastError(f"{path}: cannot parse the manifest ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise LayerfastError(
            f'{path}: the manifest must be an object with a "checkpoints" list of '
            '{"epoch": <int>, "file": <name>} entries.'
        )
    return data


def discover(directory: str | os.PathLike[str]) -> tuple[dict[int, Path], dict[str, Any] | None]:
    """Label -> file for one checkpoint directory, plus its manifest (or None).

    With a manifest, exactly the files it lists are the checkpoints (other files in the
    directory are ignored); without one, every supported file directly in the directory is.
    """
    root = Path(directory)
    if not root.exists():
        raise LayerfastError(f"checkpoint directory {root} does not exist.")
    if not root.is_dir():
        raise LayerfastError(f"{root} is not a directory: --ckpts takes a checkpoint directory.")
    manifest = read_manifest(root)
    if manifest is not None:
        files = _from_manifest(root, manifest)
    else:
        files = _from_names(root)
    if not files:
        nested = _in_subfolders(root)
        if nested:
            raise LayerfastError(_subfolder_message(root, nested))
        raise LayerfastError(
            f"no checkpoints in {root}: expected files ending in {', '.join(SUFFIXES)} "
            f"(or a {MANIFEST} listing them)."
        )
    return dict(sorted(files.items())), manifest


def _in_subfolders(root: Path) -> list[Path]:
    """Checkpoint-looking files one folder down (`checkpoint-500/model.safetensors`, or
    `pytorch_model.bin` from older transformers), sorted by folder: Hugging Face Trainer's layout,
    one subfolder per checkpoint, whose file names carry no label. Where a folder's names say
    which file is the model, only that one: the Trainer saves `optimizer.pt`, `scheduler.pt`,
    `rng_state.pth` and `training_args.bin` beside it."""
    found: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir()
                       if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in (*SUFFIXES, ".bin"))  # fmt: skip
        found += [f for f in files if "model" in f.stem.lower()] or files
    return found


def _subfolder_message(root: Path, nested: list[Path]) -> str:
    """Name the files found one folder down and the link that makes each a checkpoint here:
    layerfast reads one file per checkpoint directly in the directory (DESIGN §2), labelled by
    the last integer of its name, and a manifest lists only names in the directory."""
    names = [f"{f.parent.name}/{f.name}" for f in nested]
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (
        f"no checkpoints in {root}, but its subfolders hold {shown} (one folder per "
        "checkpoint, as Hugging Face's Trainer saves them): layerfast reads one file per "
        "checkpoint directly in the directory, labelled by the last integer of its name or "
        f"by a {MANIFEST}. Link each one in: {_link_command(root, Path(names[0]))}"
    )


def _link_command(root: Path, rel: Path) -> str:
    """`ln -s checkpoint-500/model.safetensors ROOT/checkpoint-500.safetensors`: the link is
    named after the file's folder (which carries the step), a `.bin` (torch.save) as `.pt`."""
    suffix = ".pt" if rel.suffix.lower() == ".bin" else rel.suffix
    return f"ln -s {shlex.quote(str(rel))} {shlex.quote(str(root / (rel.parent.name + suffix)))}"


def _from_manifest(root: Path, manifest: Mapping[str, Any]) -> dict[int, Path]:
    where = root / MANIFEST
    files: dict[int, Path] = {}
    seen: dict[tuple[int, int], tuple[int, str]] = {}
    for i, entry in enumerate(manifest["checkpoints"]):
        if not isinstance(entry, Mapping):
            raise LayerfastError(f"{where}: checkpoints[{i}] is not an object.")
        epoch, name = entry.get("epoch"), entry.get("file")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise LayerfastError(
                f'{where}: checkpoints[{i}] needs a non-negative integer "epoch", got {epoch!r}.'
            )
        if epoch > MAX_LABEL:
            raise LayerfastError(
                f'{where}: checkpoints[{i}] has "epoch" {epoch}, out of range: epochs must be '
                "below 2**63."
            )
        if not isinstance(name, str) or not name or Path(name).name != name:
            # `checkpoint-500/model.safetensors` is inside the directory too: say what is meant
            folder = isinstance(name, str) and "/" in name.strip("/")
            hint = (f" For a file in a subfolder, link it in ({_link_command(root, Path(name))}) "
                    "and list the link." if folder and ".." not in Path(name).parts
                    and not Path(name).is_absolute() else "")  # fmt: skip
            raise LayerfastError(
                f'{where}: checkpoints[{i}] needs a "file" name directly in the directory (no '
                f"folders), got {name!r}.{hint}"
            )
        path = root / name
        if _is_broken_link(path):
            raise LayerfastError(
                f"{where} lists {name} (epoch {epoch}), which is a broken link "
                f"(to {os.readlink(path)})."
            )
        if not path.exists():
            raise LayerfastError(f"{where} lists {name} (epoch {epoch}), which does not exist.")
        if not path.is_file():
            raise LayerfastError(
                f"{where} lists {name} (epoch {epoch}), which is not a regular file."
            )
        if path.suffix.lower() not in SUFFIXES:
            raise LayerfastError(f"{where}: {name} is not a {'/'.join(SUFFIXES)} file.")
        if epoch in files:
            raise LayerfastError(
                f"{where}: epoch {epoch} is listed twice ({files[epoch].name} and {name})."
            )
        _refuse_same_file(where, seen, epoch, path)
        files[epoch] = path
    return files


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _refuse_same_file(
    where: Path, seen: dict[tuple[int, int], tuple[int, str]], label: int, path: Path
) -> None:
    """One file under two labels would make "reinit@τ1" silently mean τ2: refuse it. Compared by
    (device, inode), so a symlink to another listed file counts too; `seen` collects them."""
    st = path.stat()
    key = (st.st_dev, st.st_ino)
    if key in seen:
        other_label, other = seen[key]
        same = path.name if other == path.name else f"{other} and {path.name}"
        raise LayerfastError(
            f"{where}: {same} is the same file under two epochs ({other_label} and {label}); "
            "each epoch needs its own checkpoint file."
        )
    seen[key] = (label, path.name)


def _from_names(root: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    seen: dict[tuple[int, int], tuple[int, str]] = {}
    unlabeled: list[str] = []
    for path in sorted(root.iterdir()):
        if (_is_broken_link(path) and not path.name.startswith(".")
                and path.suffix.lower() in SUFFIXES):  # fmt: skip
            # skipping it would silently make an earlier τ the final model
            raise LayerfastError(
                f"{root}: {path.name} is a broken link (to {os.readlink(path)}); restore its "
                "target or remove the link."
            )
        if (not path.name.startswith(".") and path.suffix.lower() in SUFFIXES
                and path.exists() and not path.is_file()):  # fmt: skip
            # a directory, or a link to /dev/zero: skipping it would make an earlier τ final
            raise LayerfastError(
                f"{root}: {path.name} is not a regular file; replace it with the checkpoint it "
                "should be, or move it away."
            )
        if not is_checkpoint_file(path):
            continue
        _refuse_shard(root, path)
        _refuse_version_suffix(root, path)
        label = label_from_stem(path.stem)
        if label is None:
            unlabeled.append(path.name)
            continue
        if label > MAX_LABEL:
            raise LayerfastError(
                f"{root}: {path.name} has label {label} (the last integer of the file name), out "
                f"of range: labels must be below 2**63. Rename it or write a {MANIFEST}."
            )
        if label in files:
            raise LayerfastError(
                f"{root}: {files[label].name} and {path.name} both have label {label} (the last "
                f"integer of the file name). Rename one or write a {MANIFEST}."
            )
        _refuse_same_file(root, seen, label, path)
        files[label] = path
    if unlabeled:
        raise LayerfastError(
            f"{root}: cannot tell the epoch of {', '.join(unlabeled)}: the label is the last "
            f"integer of the file name (epoch_003.pt). Rename, move it away, or write a {MANIFEST}."
        )
    if files:
        _refuse_foreign(root, files)
    return files


def _is_partial_copy(path: Path) -> bool:
    """An unfinished copy of a checkpoint: a partial suffix after a checkpoint's own
    (`epoch_3.pt.part`, `epoch_3.pt.crdownload`, `epoch_3.pt.tmp`, `epoch_3.bin.part`). Any
    other `.tmp` (a logger's `wandb_20240101.tmp`, `events.out.tfevents.1700000000.tmp`) is no
    checkpoint on its way, and its large number refused the directory."""
    return (path.suffix.lower() in PARTIAL_SUFFIXES
            and Path(path.stem).suffix.lower() in SUFFIXES + FOREIGN_SUFFIXES)


def _refuse_foreign(root: Path, files: dict[int, Path]) -> None:
    """A file that looks like a later checkpoint than any in `files`, under a suffix layerfast
    does not read (`epoch_3.bin` beside `epoch_0.pt`, `epoch_1.pt`): skipped, it made τ=1 the
    final model without a word. One labelled no later (accelerate's `random_states_0.pkl`, an
    `optimizer_1.bin`) changes no final model and is left alone, as before. (The stem's last
    integer: `checkpoint-3.pth.tar`'s stem `checkpoint-3.pth` gives 3.) An unfinished copy
    (`epoch_3.pt.part`, `.crdownload`, `.tmp`) is refused the same way, with its own advice."""
    last = max(files)
    name = files[last].name
    later = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
             and (p.suffix.lower() in FOREIGN_SUFFIXES or _is_partial_copy(p))
             and (label_from_stem(p.stem) or 0) > last]
    partial = sorted(p.name for p in later if p.suffix.lower() in PARTIAL_SUFFIXES)
    if partial:
        one = len(partial) == 1
        raise LayerfastError(
            f"{root}: {', '.join(partial[:3])}{' ...' if len(partial) > 3 else ''} "
            f"look{'s' * one} like {'an unfinished copy' if one else 'unfinished copies'} (a "
            f"download or save cut short) of {'a checkpoint' if one else 'checkpoints'} later "
            f"than {name}: let {'it' if one else 'them'} finish, or move "
            f"{'it' if one else 'them'} away; skipped, {name} would silently be the final "
            "model.")
    foreign = sorted(p.name for p in later)
    if foreign:
        one = len(foreign) == 1
        raise LayerfastError(
            f"{root}: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
            f"look{'s' * one} like {'a checkpoint' if one else 'checkpoints'} later than "
            f"{name}, but layerfast reads only {', '.join(SUFFIXES)} files: rename a torch.save "
            "file to .pt (a safetensors one to .safetensors), or move it away; skipped, "
            f"{name} would silently be the final model."
        )


def _refuse_shard(root: Path, path: Path) -> None:
    """A shard of a multi-file checkpoint is not a checkpoint: its last integer is the shard
    count, so every shard got the same label and the refusal advised renaming one (which would
    turn the halves of one model into two checkpoints, each missing the other's tensors)."""
    m = _SHARD_RE.search(path.stem)
    if m is None or int(m.group(2)) <= 1:  # `-00001-of-00001` holds the whole model
        return
    raise LayerfastError(
        f"{root}: {path.name} is shard {int(m.group(1))} of {int(m.group(2))} of one checkpoint "
        "split over several files; layerfast reads one file per checkpoint. Merge the shards "
        "into one state dict (safetensors.torch.load_file each, save_file the union) and give "
        f"it its epoch in its name (epoch_003.safetensors) or a {MANIFEST}."
    )


def _refuse_version_suffix(root: Path, path: Path) -> None:
    """Lightning's name-clash suffix is not a label: `epoch=2-step=24-v1.ckpt` got label 1 (the
    last integer, DESIGN §2) beside `epoch=1-step=12.ckpt` (label 12), so the epoch-1 model was
    analysed as the final one without a word. Refused only for Lightning's own names: the rest
    of the stem is `last` or holds a `key=value` with an integer (its default template,
    `epoch=2-step=24`). Other stems keep the contract's last integer: `net-v2.pt` and
    `resnet18-v2.pt` have label 2."""
    m = _VERSION_RE.match(path.stem)
    if m is None:
        return
    base = m.group("base")
    if base.lower() != "last" and not _LIGHTNING_RE.search(base):
        return
    suffix = f"-v{m.group('version')}"
    raise LayerfastError(
        f"{root}: {path.name} ends in {suffix}, the suffix Lightning's ModelCheckpoint adds when "
        f"a name is taken: its last integer would be its label ({int(m.group('version'))}), not "
        f"its epoch or step. Rename it to the label it should have, or write a {MANIFEST} "
        "listing every checkpoint with its epoch."
    )


def _json_default(obj: object) -> object:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        return item()
    raise TypeError(f"manifest metadata: {type(obj).__name__} is not JSON serialisable")


def write_manifest(
    directory: str | os.PathLike[str], entries: list[dict[str, Any]], **metadata: Any
) -> Path:
    """Write `manifest.json` = {"checkpoints": entries, **metadata} atomically.

    Atomic (temporary file in the same directory, fsync, os.replace) because a training run
    killed mid-write must never leave a half manifest that makes the directory unreadable.
    Each entry needs `epoch` (int) and `file` (a name in the directory); extra keys (e.g.
    `test_error`) are kept. Returns the manifest's path.
    """
    root = Path(directory)
    if "checkpoints" in metadata:
        raise ValueError("write_manifest: 'checkpoints' is reserved for the entries")
    epochs: set[int] = set()
    for e in entries:
        epoch, name = e.get("epoch"), e.get("file")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_LABEL:
            raise ValueError(f"write_manifest: entry {e!r} needs an int 'epoch' in 0..2**63-1")
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise ValueError(f"write_manifest: entry {e!r} needs a plain file name 'file'")
        if epoch in epochs:
            raise ValueError(f"write_manifest: epoch {epoch} appears twice")
        epochs.add(epoch)
    data = {"checkpoints": list(entries), **metadata}
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp creates 0600; a manifest is meant to be shared
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / MANIFEST
