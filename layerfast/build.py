"""The final model built for the data and validated against its checkpoints (`build`), for
`analyze` (and the dry run, `list_units`, which reads the class count the same way).

Split out of `layerfast.analysis`: building the model is one concern (the class count from the
manifest or the data, the head and input checks, the logits' width), the study around it
another. `layerfast.analysis` re-exports `build`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from layerfast.errors import LayerfastError


def _shape_mismatches(ck: Any, labels: list[int] | None, ref: dict[str, torch.Tensor],
                      num_classes: int) -> tuple[int, bool, list[str]]:
    """(the checkpoints' class count where a head mismatches, else 0; any other mismatch; the
    files that fit) for the checkpoints `labels` (all when None) against the state dict `ref`.
    Only a head mismatch (the model's shape leads with `num_classes`, the checkpoint's not)
    blames the data's class count: a torchvision (3-channel) checkpoint with 1-channel data
    mismatches only in conv1.weight. Files that fit (the model's keys, every shape equal) show
    the model built from the data and --arch right: neither is blamed for the others."""
    from layerfast.checkpoints.keymap import is_tolerated_missing

    head, other = 0, False
    fit: list[str] = []
    for label in ck.labels if labels is None else labels:
        try:
            shapes = ck.shapes(label)
        except LayerfastError:  # validate named what is wrong with this file already
            continue
        # a file with missing or extra keys does not fit either, whatever its shapes
        fits = set(shapes) <= set(ref) and all(
            k in shapes or is_tolerated_missing(k) for k in ref)
        for key, shape in shapes.items():
            want = tuple(ref[key].shape) if key in ref else None
            if want is None or tuple(shape) == want:
                continue
            fits = False
            if want[:1] == (num_classes,) and tuple(shape[:1]) != want[:1]:
                head = max(head, int(shape[0]) if len(shape) else 1)
            else:
                other = True
        if fits:
            fit.append(ck.files[label].name)
    return head, other, fit


#: How a message says a .npz declared its class count, names the value to change there, and
#: names the num_classes array a .npz whose labels miss a class lacks: in-memory data's are
#: `data=(x, y, num_classes)`'s (`inputs.named_as_passed` rewrites them).
NPZ_DECLARED = "declared by {} (its num_classes)"
NPZ_SET = "or make the num_classes of {} {}"
NPZ_DECLARE = "or a num_classes array in {} must declare the classes they miss"


def _is_npz(data: str) -> bool:
    """Whether the spec `data` opens a .npz, as `open_data` decides it: stripped, any case
    (`--data "x.npz "` opens x.npz, and its count is still said as a .npz's)."""
    return data.strip().lower().endswith(".npz")


def classes_from(data: str, src: Any) -> str:
    """Where the class count of the data `src` (opened from the spec `data`) came from, as a
    message says it: declared by the data (a fixed data set, class folders, a .npz's
    num_classes, a .beton's sidecar), or its largest label + 1 over the label arrays named
    (a bare .npz counts every y array it holds, not only the split's)."""
    counted = src.classes_from_labels
    if counted:
        return f"the largest label of {data!r} + 1 (over {', '.join(map(repr, counted))})"
    if _is_npz(data):
        return NPZ_DECLARED.format(repr(data))
    return f"declared by {data!r}"


def _head_fix(data: str, src: Any, head: int, num_classes: int) -> str:
    """What to do when the state dicts' head has `head` classes and the data's count
    (`classes_from`) is `num_classes`. A count counted from labels is wrong where the labels
    are (past the checkpoint's classes), or misses a class the labels never show, which a
    .npz can declare; a declared count is the data's own, which no label changes."""
    npz = _is_npz(data)
    if src.classes_from_labels:
        fix = "labels must be 0..classes-1 of the checkpoint's model"
        return fix + (f", {NPZ_DECLARE.format(repr(data))}" if npz and head > num_classes
                      else "")
    fix = "the checkpoint's model is for another class count: evaluate on the data it was trained on"
    return fix + (f", {NPZ_SET.format(repr(data), head)}" if npz else "")


def build(arch: str, ckpts: str | os.PathLike[str], data: str = "digits", split: str = "test",
          final: int | None = None, max_samples: int | None = None,
          checkpoints: str | list[int] = "all") -> tuple[Any, Any, Any, Any]:
    """The final model with its checkpoints and data, validated: (model, spec, ckdir, source).

    Only the checkpoints the run reads are validated (keys, shapes, finite values): the final
    one, θ⁰ (distances, the rerandom checks) and `checkpoints`; a NaN in an epoch the run was
    told to leave out must not refuse it, and a 100-file directory is not read end to end for
    `--checkpoints 0`. Labels are checked against the model's outputs here, once, because the
    engine scores on the device where an out-of-range label is a device assert, not a readable
    error."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.data import open_data
    from layerfast.models import build_model, load_tensors

    ck = CheckpointDir(ckpts, final=final)
    src = open_data(data, split=split, max_samples=max_samples, split_flag="--split")
    man = ck.manifest or {}
    from_data = "num_classes" not in man
    num_classes = man.get("num_classes", src.num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LayerfastError(f"{ck.path / 'manifest.json'}: num_classes must be a positive "
                             f"integer, got {num_classes!r}")
    # Without a manifest the class count is the data's (declared, or its largest label + 1): a
    # stray label (a synset offset such as 15075141, an id) makes a head of millions of outputs,
    # whose allocation fails (a traceback, exit 1) or succeeds and then mismatches the checkpoint.
    where = classes_from(data, src) if from_data else "manifest.json's num_classes"
    try:
        model, spec = build_model(arch, num_classes, tuple(src.shape))
    except LayerfastError as exc:
        if not str(exc).startswith("cannot build"):
            raise
        raise LayerfastError(f"{exc}; the class count is {where}") from None
    used = None if checkpoints == "all" else sorted(
        {ck.final, *checkpoints, *({0} & set(ck.labels))})
    try:
        ck.validate(model.state_dict(), labels=used)
    except LayerfastError as exc:
        if "shape" not in str(exc):
            raise
        head, other, fit = _shape_mismatches(ck, used, model.state_dict(), num_classes)
        if fit:  # the model fits these files: the others come from another model
            shown = ", ".join(fit[:3]) + (f" and {len(fit) - 3} more" if len(fit) > 3 else "")
            # the final model and θ⁰ are always read; another epoch can be left out
            always = {ck.files[t].name for t in {ck.final, *({0} & set(ck.labels))}}
            fix = ("replace them, or leave their epochs out with --checkpoints"
                   if always <= set(fit) else "replace them")
            raise LayerfastError(f"{exc} ({shown} fit the model, so the other files were saved "
                                 f"from a different model: {fix})") from None
        if head and from_data:  # fewer: labels that miss the top class (inputs.named_as_passed)
            fewer = f", fewer than the {head:,} of the checkpoint" * (head > num_classes)
            raise LayerfastError(f"{exc} (the model was built for {num_classes:,} classes, {where}"
                                 f"{fewer}; {_head_fix(data, src, head, num_classes)})") from None
        if other and not head:
            raise LayerfastError(f"{exc} (the model was built for inputs of shape "
                                 f"{tuple(src.shape)}, the samples of {data!r} ({split}); the "
                                 "checkpoint's model takes other inputs, or is another "
                                 "--arch)") from None
        raise
    ck.check_trained()  # a dir holding only τ=0 (a diverged first epoch) has no trained model
    load_tensors(model, ck.tensors(ck.final), strict=False)
    labels = src.labels()
    if labels.numel() == 0:
        raise LayerfastError(f"the data {data!r} ({split}) is empty")
    lo, hi = int(labels.min()), int(labels.max())
    out_features = _num_outputs(model, src)
    from layerfast.engine.batches import check_classes

    check_classes(out_features)  # one logit: every variant error 0, every unit robust
    if lo < 0 or hi >= out_features:
        raise LayerfastError(f"labels of {data!r} lie in {lo}..{hi}, but the model has "
                             f"{out_features} outputs (classes 0..{out_features - 1})")
    return model, spec, ck, src


def _num_outputs(model: torch.nn.Module, src: Any) -> int:
    """The logits' width, from two zero samples in the model's own float dtype (a float64 model
    takes float64). A model that cannot take the data's samples is bad input, said here."""
    from layerfast.engine.tracing import attributes_kept
    from layerfast.models import input_dtype

    dtype = input_dtype(model)
    was = model.training
    model.eval()
    try:
        # attributes the call sets (a cache filled on first use) are taken back: the engine's
        # first-batch check must see the first fill to find a cache derived from the weights
        with torch.no_grad(), attributes_kept(list(model.modules())):
            out = model(torch.zeros(2, *src.shape, dtype=dtype))  # 2: rows must follow B
    except Exception as exc:  # noqa: BLE001 - any failure here is a model/data mismatch
        msg = " ".join(str(exc).split())[:300]
        raise LayerfastError(f"the model does not run on this data's samples (shape "
                             f"{tuple(src.shape)}): {type(exc).__name__}: {msg}") from exc
    finally:
        model.train(was)
    from layerfast.engine.batches import check_logits

    check_logits(out, 2)  # the engine's check: [classes, batch] and batch-pooled logits too
    return int(out.shape[1])


def _manifest_classes(ckpts: Path) -> int | None:
    """The class count a checkpoint directory's manifest.json records (analyze builds the
    model for it), or None where it records none: a factory whose layers depend on the class
    count has other units for another one. One that is no positive integer is refused, as
    `build` refuses it: the dry run passed a directory the real run stops at."""
    from layerfast.checkpoints.discover import read_manifest

    man = (read_manifest(ckpts) or {}) if ckpts.is_dir() else {}
    if "num_classes" not in man:
        return None
    nc = man["num_classes"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise LayerfastError(f"{ckpts / 'manifest.json'}: num_classes must be a positive "
                             f"integer, got {nc!r}")
    return nc
