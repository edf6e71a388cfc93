"""`layerfast train`'s bad-value messages name the flag the user typed (session 23).

Defect: train's checks named options by their Python keywords, so `layerfast train
--max-samples 0` answered "max_samples must be a positive integer; got 0" and `--batch-size 0`
"batch_size must be ...", `--weight-decay -1` "weight_decay must be ...", where `layerfast
analyze --max-samples 0` says "--max-samples must be ..." and docs/decisions.md has messages
name options by their flags for the CLI and the Python API alike (`max_samples=` is
`--max-samples`). Now every train check names its flag, one line, exit 2, nothing written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfast.cli import main
from layerfast.errors import LayerfastError

BAD = [
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--max-samples", "0"], "--max-samples must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--lr", "-1"], "--lr must be a finite number above 0"),
    (["--momentum", "1"], "--momentum must be below 1"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--seed", str(2**63)], "--seed must be an integer"),
    (["--checkpoints", "0,1,10"], "--checkpoints: epoch 10 is not an integer in 0..5 (--epochs 5)"),
]


@pytest.mark.parametrize("args, said", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_train_names_the_flag(args: list[str], said: str, tmp_path: Path, capsys) -> None:
    argv = ["train", "--arch", "fcn1x4", "--data", "digits", "--out", str(tmp_path / "run"),
            "--quiet", *args]
    if "--epochs" not in args:
        argv += ["--epochs", "5"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and said in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_api_names_the_flags_too(tmp_path: Path) -> None:
    """As analyze's API does: `max_samples=0` is `--max-samples`."""
    from layerfast.train import train

    with pytest.raises(LayerfastError, match="^--max-samples must be a positive integer"):
        train("fcn1x4", "digits", 1, tmp_path / "run", max_samples=0, progress=False)
    with pytest.raises(LayerfastError, match="^unknown --schedule 'linear'"):
        train("fcn1x4", "digits", 1, tmp_path / "run", schedule="linear", progress=False)
