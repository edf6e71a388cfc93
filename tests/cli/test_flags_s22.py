"""Input validation left loose (session 22): each bad value is refused up front with one clear
message (exit status 2 from the CLI), or said on stderr where it is a legitimate but surprising
choice. Each test failed on 449832c."""

from __future__ import annotations

import pytest

import layerfast
from layerfast.cli import main
from layerfast.errors import LayerfastError


@pytest.mark.parametrize("text", ["1,,2", "0,", ",0", " , "])
def test_analyze_checkpoints_with_an_empty_item_is_refused_as_train_refuses_it(text, capsys):
    """`analyze --checkpoints 1,,2` dropped the empty item without a word (exit 0), where
    `train --checkpoints 1,,2` is a usage error: the two commands read one flag alike now."""
    rc = main(["analyze", "--arch", "fcn3x256", "--list-units", "--checkpoints", text])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoints takes 'all' or labels like 0,1,10" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_analyze_api_checkpoints_with_an_empty_item_is_refused(ckpts, tmp_path):
    with pytest.raises(LayerfastError, match="--checkpoints takes"):
        layerfast.analyze("fcn3x256", ckpts, data="digits", checkpoints="0,,1",
                          out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_analyze_checkpoints_written_with_spaces_still_reads(capsys):
    assert main(["analyze", "--arch", "fcn3x256", "--list-units", "--checkpoints", "0, 1"]) == 0
