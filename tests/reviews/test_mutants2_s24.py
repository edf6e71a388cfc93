"""Mutation testing of session 24's non-engine code (build's class-count words, the .npz's
counted arrays, stored_dtypes, bench's --profile probe, the in-memory renamer, train's --out
check): each test kills a mutant the related s24 tests let through."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from layerfast import bench
from layerfast.build import classes_from
from layerfast.checkpoints.stored import stored_dtypes
from layerfast.data import open_data
from layerfast.errors import LayerfastError, collect_warnings
from layerfast.inputs import _renamer
from layerfast.train import _check_out


def test_an_upper_case_npz_is_said_as_a_npz() -> None:
    """_is_npz lower-cases as open_data does: 'X.NPZ' declares its count as a .npz."""
    src = SimpleNamespace(classes_from_labels=())
    assert classes_from("X.NPZ", src) == "declared by 'X.NPZ' (its num_classes)"


def test_an_empty_label_array_is_not_counted(tmp_path: Path) -> None:
    """A .npz whose y_test is empty counts y_train alone (an empty array has no largest
    label: counting it raised)."""
    path = tmp_path / "d.npz"
    x = np.zeros((4, 1, 4, 4), np.float32)
    np.savez(path, x_train=x, y_train=np.array([0, 1, 2, 1]),
             x_test=x[:0], y_test=np.zeros(0, np.int64))
    src = open_data(str(path), split="train")
    assert src.classes_from_labels == ("y_train",) and src.num_classes == 3


class _Ck:
    """The little of a CheckpointDir that stored_dtypes reads."""

    def __init__(self, dtypes: dict[int, dict[str, str]], final: int) -> None:
        self.final, self.labels, self._d = final, sorted(dtypes), dtypes
        self.files = {t: Path(f"epoch_{t:03d}.pt") for t in dtypes}

    def key_dtypes(self, t: int) -> dict[str, str]:
        return self._d[t]


def test_theta0_is_read_whatever_the_taus() -> None:
    """θ⁰ is always read (distances, the rerandom checks): its stored dtype is recorded and
    warned about even when the taus name only the final epoch."""
    model = torch.nn.Linear(2, 2)
    ck = _Ck({0: {"weight": "float16", "bias": "float16"},
              2: {"weight": "float32", "bias": "float32"}}, final=2)
    with collect_warnings() as said:
        got = stored_dtypes(ck, model, [2])
    assert got == {"0": "float16", "2": "float32"}
    assert any("epoch_000.pt stores weights in float16" in w for w in said)


def test_a_key_the_model_holds_as_an_integer_is_not_compared() -> None:
    """A floating tensor in the file for a key the model holds as an integer (or not at all)
    is not a rounding of the model's: no KeyError, no warning."""
    model = torch.nn.BatchNorm1d(2)
    ck = _Ck({1: {"weight": "float32", "bias": "float32", "running_mean": "float32",
                  "running_var": "float32", "num_batches_tracked": "float16"}}, final=1)
    with collect_warnings() as said:
        assert stored_dtypes(ck, model, [1]) == {"1": "float16+float32"}
    assert said == []


def test_two_model_dtypes_are_both_named() -> None:
    """Rounded tensors of a bfloat16 and a float32 model tensor: cast to both dtypes, named."""
    model = torch.nn.Linear(2, 2)
    model.bias.data = model.bias.data.bfloat16()
    ck = _Ck({1: {"weight": "float16", "bias": "float8_e4m3fn"}}, final=1)
    with collect_warnings() as said:
        stored_dtypes(ck, model, [1])
    assert "cast to the model's dtypes (bfloat16, float32)" in said[0]


def test_a_directory_profile_is_called_one(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="is a directory; name a file for the table"):
        bench._probe_profile(tmp_path)


def test_a_parent_that_is_a_link_loop_is_not_called_missing(tmp_path: Path) -> None:
    """A parent that is there (a symlink loop) but cannot be entered is not 'does not exist'."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(LayerfastError, match="cannot be written") as exc:
        bench._probe_profile(loop / "p.txt")
    assert "does not exist" not in str(exc.value)


def test_an_interrupted_run_removes_the_probes_file(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the timing (a BaseException, not an Exception) still removes the file
    the probe created."""
    prof = tmp_path / "p.txt"

    def interrupted(args: argparse.Namespace) -> dict:
        assert prof.exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "check_args", lambda args: None)
    monkeypatch.setattr(bench, "_timed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench._run(argparse.Namespace(profile=prof))
    assert not prof.exists()


def test_the_resolved_folder_is_renamed_too(tmp_path: Path) -> None:
    """The folder passed through a link (macOS's /tmp -> /private/tmp) is said in messages by
    either path: the resolved one's epoch files are 'state dict τ=N' too."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "epoch_001.pt").write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(real)
    rename = _renamer(link, None, {"ckpts": "state_dicts"})
    assert "epoch_001.pt" not in rename(f"{real}{os.sep}epoch_001.pt: bad")
    assert "epoch_001.pt" not in rename(f"{link}{os.sep}epoch_001.pt: bad")


def test_a_dangling_link_in_out_is_not_in_the_way(tmp_path: Path) -> None:
    """A dangling symlink named epoch_001.pt is replaced by the write: not refused."""
    (tmp_path / "epoch_001.pt").symlink_to(tmp_path / "nowhere")
    _check_out(tmp_path, True, [1])
    (tmp_path / "epoch_002.pt").mkdir()
    with pytest.raises(LayerfastError, match="epoch_002.pt is in the way"):
        _check_out(tmp_path, True, [2])


def test_a_dir_appearing_before_the_lock_is_refused_under_it(tmp_path: Path,
                                                             monkeypatch) -> None:
    """The check repeated under the lock looks at the run's own epochs: a directory named
    epoch_001.pt that appeared between the first check and the lock is refused there."""
    from layerfast import train

    real = train._lock

    def racing(out: Path, created: list[Path]):
        (out / "epoch_001.pt").mkdir()
        return real(out, created)

    monkeypatch.setattr(train, "_lock", racing)
    with pytest.raises(LayerfastError, match="epoch_001.pt is in the way"):
        train._prepare_out(tmp_path / "out", False, [0, 1])


def test_a_huge_run_json_is_not_read_for_labels(tmp_path: Path) -> None:
    """run.json over 16 MiB is not read for the heatmap's labels (as `summary` reads it): the
    defaults."""
    from layerfast.report import _recorded_labels

    (tmp_path / "run.json").write_text('{"precision": "bf16", "pad": "' + "x" * (17 << 20)
                                       + '"}')
    assert _recorded_labels(tmp_path)["precision"] is None


def test_a_manifest_count_that_cannot_be_built_says_so(tmp_path: Path, monkeypatch) -> None:
    """A count from manifest.json that cannot be built is said to be the manifest's, not the
    data's."""
    import layerfast.models
    from layerfast.build import build
    from layerfast.checkpoints import write_manifest

    model = torch.nn.Linear(2, 2)
    for t in (0, 1):
        torch.save(model.state_dict(), tmp_path / f"epoch_{t:03d}.pt")
    write_manifest(tmp_path, [{"epoch": t, "file": f"epoch_{t:03d}.pt"} for t in (0, 1)],
                   num_classes=10)

    def cannot(*a, **k):
        raise LayerfastError("cannot build fcn3x256 for 10 classes: out of memory")

    monkeypatch.setattr(layerfast.models, "build_model", cannot)
    with pytest.raises(LayerfastError, match="the class count is manifest.json's num_classes"):
        build("fcn3x256", tmp_path, data="digits")
