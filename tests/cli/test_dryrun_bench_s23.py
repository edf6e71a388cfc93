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


@pytest.mark.parametrize("with_ckpts", [False, True])
def test_list_units_refuses_an_empty_data_spec_as_analyze_does(
    tmp_path, with_ckpts: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """`analyze --data ""` is refused ("unknown data spec ''"), but the dry run `--list-units`
    read the empty spec as no --data at all and listed digits' units (or those of the data the
    checkpoints' manifest names), exit 0: a dry run must not pass a command the real run
    refuses. Now the same one-line refusal, exit 2."""
    argv = ["analyze", "--arch", "fcn3x256", "--list-units", "--data", ""]
    if with_ckpts:
        ck = tmp_path / "ck"
        ck.mkdir()
        (ck / "manifest.json").write_text(json.dumps(
            {"checkpoints": [{"epoch": 0, "file": "epoch_000.pt"}], "data": "digits"}))
        argv += ["--ckpts", str(ck)]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning:" not in ln]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("layerfast: error:"), err
    assert "data spec ''" in lines[0], err


@pytest.mark.parametrize("device", ["bogus", "", "tpu"])
def test_list_units_refuses_a_device_the_run_refuses(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`analyze --device bogus` is refused ("unknown --device"), but `--list-units` never
    looked at --device: it listed the units, exit 0, for a command that cannot run. Now the
    dry run refuses it with the run's line, exit 2."""
    rc = main(["analyze", "--arch", "fcn3x256", "--list-units", "--device", device])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning:" not in ln]
    assert rc == 2, err
    assert len(lines) == 1 and "unknown --device" in lines[0], err


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:7", "auto"])
def test_list_units_checks_the_device_name_only(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether the GPU is there is left to the run (docs/decisions.md: a command for a GPU
    machine can be dry-run on a laptop)."""
    assert main(["analyze", "--arch", "fcn3x256", "--list-units", "--device", device]) == 0
    assert "fc1" in capsys.readouterr().out
