"""What the docs say, executed (session 17 review): each test pins one claim a run contradicted."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def finished_run(ckpts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import layerfast

    out = tmp_path_factory.mktemp("docsrun") / "run"
    layerfast.analyze("fcn3x256", ckpts, data="digits", device="cpu", out=out, progress=False,
                      reset="reinit", checkpoints=[0], max_samples=60, figures=False)
    return out


@pytest.mark.parametrize("bad", ["7", "-3", '"0.1"', "null"])
def test_report_names_a_bad_threshold_not_a_missing_run_json(finished_run: Path, bad: str,
                                                             capsys) -> None:
    """docs/decisions.md: a threshold outside [0, 1] is "unknown", like a missing run.json; the
    note must not claim the run.json that was read is unreadable."""
    from layerfast.cli import main

    run_json = finished_run / "run.json"
    saved = run_json.read_text()
    try:
        run_json.write_text(f'{{"threshold": {bad}, "bn": "with-layer"}}')
        assert main(["report", str(finished_run)]) == 0
        text = capsys.readouterr().out
        assert "threshold is unknown" in text
        assert "no readable run.json" not in text
        assert "(run.json records no threshold in [0, 1]: the run's threshold is unknown)" in text
    finally:
        run_json.write_text(saved)


def test_report_still_says_a_missing_run_json_is_unreadable(finished_run: Path, capsys) -> None:
    from layerfast.cli import main

    run_json = finished_run / "run.json"
    saved = run_json.read_text()
    try:
        for text in (None, "{not json", "[1, 2]"):
            run_json.unlink(missing_ok=True)
            if text is not None:
                run_json.write_text(text)
            assert main(["report", str(finished_run)]) == 0
            assert ("(no readable run.json: the run's threshold is unknown)"
                    in capsys.readouterr().out), text
    finally:
        run_json.write_text(saved)
