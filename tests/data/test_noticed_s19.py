"""Session 19's fixes from the "noticed" list that need no model: messages about data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.data import open_data
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("spec", ["cifar10", "fashion-mnist", "mnist", "imagefolder"])
def test_an_archive_given_as_the_data_folder_is_told_to_extract_it(tmp_path: Path,
                                                                   spec: str) -> None:
    """`cifar10:cifar-10-python.tar.gz` said only "is a file, not a directory", and
    fashion-mnist added the apt hint, which points elsewhere when the user has a file."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(LayerfastError) as e:
        open_data(f"{spec}:{archive}")
    assert str(e.value) == (f"{spec}: directory {archive} is an archive: extract it and give "
                            "the folder it holds")


def test_the_apt_hint_is_for_a_missing_folder_only(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match=r"does not exist \(apt-get install dataset-fashion"):
        open_data(f"fashion-mnist:{tmp_path / 'nowhere'}")
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(LayerfastError) as e:
        open_data(f"fashion-mnist:{plain}")
    assert str(e.value) == f"fashion-mnist: directory {plain} is a file, not a directory"


def test_a_hidden_file_in_the_data_folder_does_not_change_the_resume_fingerprint(
        tmp_path: Path) -> None:
    """Finder rewrites `.DS_Store` (and leaves `._x.png`), which no reader reads: hashed, it
    made a killed run over an unchanged folder refuse to resume. A real file still counts."""
    from layerfast.analysis import _data_ids

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"png")
    before = _data_ids(f"imagefolder:{tmp_path}")
    (tmp_path / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "a" / "._0.png").write_bytes(b"appledouble")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_bytes(b"x")
    assert _data_ids(f"imagefolder:{tmp_path}") == before
    (tmp_path / "a" / "1.png").write_bytes(b"png")
    assert _data_ids(f"imagefolder:{tmp_path}") != before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_variant_overflowing_under_bf16_names_bf16s_range(precision: str, capsys) -> None:
    """A reset to a checkpoint holding 3.4e38 is finite in float32 but Inf in bf16: the
    per-variant warning blamed the reset alone, as if the weights themselves overflowed."""
    from types import SimpleNamespace

    import torch

    from layerfast.analysis import _check_finite_logits

    variants = [SimpleNamespace(label="baseline"), SimpleNamespace(label="reinit fc1 @0")]
    counts = torch.tensor([[5.0, 5.0, 1.0], [5.0, 5.0, float("inf")]])
    _check_finite_logits(variants, counts, "digits", precision)
    err = capsys.readouterr().err
    assert "1 variant gave NaN or Inf logits on some samples (reinit fc1 @0)" in err
    assert ("bf16's range" in err) == (precision == "bf16")


def test_an_image_in_a_linked_class_folder_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """imagefolder follows `cat -> /data/cat`; the fingerprint's `rglob` did not, so an image
    rewritten there was resumed over. A link loop is walked once."""
    import os

    from layerfast.analysis import _data_ids

    real = tmp_path / "real" / "cat"
    real.mkdir(parents=True)
    (real / "a.png").write_bytes(b"png")
    root = tmp_path / "imf"
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "b.png").write_bytes(b"png")
    (root / "cat").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(root, target_is_directory=True)
    before = _data_ids(f"imagefolder:{root}")
    (real / "a.png").write_bytes(b"png, rewritten")
    os.utime(real / "a.png", ns=(1, 1))
    assert _data_ids(f"imagefolder:{root}") != before


def test_in_memory_inputs_ignore_key_order_and_take_a_0d_num_classes(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """The same state dicts with their keys in another order went to another content folder
    (a missed resume); `num_classes` as `y.max() + 1` (a 0-d tensor) was refused."""
    import tempfile

    import torch

    from layerfast.inputs import _checked_ckpts, _checked_data

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = {"w": torch.ones(2), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.ones(2)}
    assert _checked_ckpts({0: a, 1: a})[1] == _checked_ckpts({0: b, 1: b})[1]
    assert _checked_ckpts({0: a})[1] != _checked_ckpts({0: {"w": torch.ones(2)}})[1]
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    arrays, _ = _checked_data((x, y, y.max() + 3), "test")
    assert int(arrays["num_classes"]) == 5
    with pytest.raises(LayerfastError, match="num_classes"):
        _checked_data((x, y, torch.tensor(True)), "test")
