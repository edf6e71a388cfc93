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
