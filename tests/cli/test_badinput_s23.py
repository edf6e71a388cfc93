"""Bad input to every command, re-checked from the shell (review s23)."""

from __future__ import annotations

import json

import pytest

from layerfast.cli import main


def test_bench_takes_a_batch_size_beyond_sys_maxsize(capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --batch-size 99999999999999999999` passed the flag check (a positive integer) and
    layerfast's own passes (one batch of all samples), then the naive loop's DataLoader failed
    inside itertools.islice ("Stop argument ... must be ... <= sys.maxsize"): a traceback,
    exit 1. A batch size from n up is one batch of all n samples, for the naive loop too."""
    big = 10**20
    rc = main(["bench", "--max-samples", "16", "--checkpoints", "2", "--seeds", "1",
               "--naive-variants", "1", "--no-prefix-only", "--device", "cpu", "--json",
               "--batch-size", str(big)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    out = json.loads(captured.out)
    assert out["naive_batch_size"] == big and out["naive_batch_size_used"] == 16
