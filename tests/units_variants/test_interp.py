"""`analyze --reset interp --alphas A,... [--sigma S]`: the interpolation variants of DESIGN §3
(θ = (1−α)·θ^τ + α·θ^final, + Gaussian noise σ) from the CLI and `layerfast.analyze`, checked
against an independent forward pass, the other kinds' rows, and the bad-input rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import layerfast
from layerfast.errors import LayerfastError
from tests.cli.test_cli import cli


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _final(ckpts: Path) -> int:
    return max(c["epoch"] for c in json.loads((ckpts / "manifest.json").read_text())["checkpoints"])


def _forward_errors(ckpts: Path, state: dict) -> int:
    """Top-1 errors of fcn3x256 with `state` on digits' test split: a plain forward pass, none
    of layerfast's engine (its model registry and data loader only)."""
    from layerfast.data import open_data
    from layerfast.data.device import to_device
    from layerfast.models import build_model

    src = open_data("digits", split="test")
    model, _ = build_model("fcn3x256", src.num_classes, tuple(src.shape))
    model.load_state_dict(state)
    model.eval()
    wrong = 0
    with torch.no_grad():
        for x, y in src.batches(128):
            x, y = to_device(x, y, src, torch.device("cpu"))
            wrong += int((model(x).argmax(1) != y).sum())
    return wrong


def test_interp_rows_match_a_plain_forward_and_the_other_kinds(ckpts, tmp_path, capsys) -> None:
    """α = 0 is reinit to τ and α = 1 the final model, bit for bit; α = 0.5 equals a forward
    pass of the hand-interpolated weights; the columns, run.json and the summary's grid."""
    out = tmp_path / "run"
    rc, text, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out,
                         "--quiet", "--reset", "reinit,interp", "--alphas", "0,0.5,1",
                         "--checkpoints", "0,1", "--device", "cpu"], capsys)
    assert rc == 0, err
    from layerfast.report import read_results

    t = read_results(out / "results.csv")
    assert list(t.columns[-2:]) == ["alpha", "sigma"]
    ip = t[t["kind"] == "interp"]
    units = list(dict.fromkeys(t.loc[t["kind"] == "reinit", "unit"]))
    assert len(ip) == len(units) * 2 * 3  # units x τ (0, 1) x α; none at the final τ
    assert set(ip["sigma"]) == {0.0} and ip["seed"].isna().all()
    base = t[t["kind"] == "baseline"].iloc[0]
    cols = ["error", "loss", "agreement"]
    for u in units:
        for tau in (0, 1):
            at = ip[(ip["unit"] == u) & (ip["checkpoint"] == tau)].set_index("alpha")
            ri = t[(t["kind"] == "reinit") & (t["unit"] == u) & (t["checkpoint"] == tau)].iloc[0]
            assert list(at.loc[0.0, cols]) == list(ri[cols])
            assert list(at.loc[1.0, cols]) == list(base[cols])
    # α = 0.5 against the hand-made weights of fc2 (its weight and bias) at τ = 0
    final = _final(ckpts)
    th0 = torch.load(ckpts / "epoch_000.pt", weights_only=True)
    thf = torch.load(ckpts / f"epoch_{final:03d}.pt", weights_only=True)
    mixed = {k: (0.5 * th0[k].double() + 0.5 * v.double()).float() if k.startswith("fc2.") else v
             for k, v in thf.items()}
    row = ip[(ip["unit"] == "fc2") & (ip["checkpoint"] == 0) & (ip["alpha"] == 0.5)].iloc[0]
    assert round(row["error"] * row["n"]) == _forward_errors(ckpts, mixed)
    run = json.loads((out / "run.json").read_text())
    assert (run["reset"], run["alphas"], run["sigma"]) == (["reinit", "interp"], [0.0, 0.5, 1.0], [0.0])
    assert "interp: unit := (1-alpha)*theta^tau + alpha*theta^final" in text
    assert "alpha=0.5" in text and "fc2" in text.split("interp:")[1]


def test_noise_draws_one_variant_per_seed_reproducibly(ckpts, tmp_path) -> None:
    kw = dict(reset="interp", alphas=[0.5], sigma=0.05, seeds=2, checkpoints=[0], units="fc1",
              device="cpu", progress=False, figures=False)
    a = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "a", **kw).table
    b = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "b", **kw).table
    ip = a[a["kind"] == "interp"]
    assert list(ip["seed"]) == [1, 2] and set(ip["sigma"]) == {0.05}
    assert ip["loss"].iloc[0] != ip["loss"].iloc[1]  # two draws, not one twice
    assert a.equals(b)  # the same seeds draw the same noise
    no_noise = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "c",
                                 **{**kw, "sigma": 0.0}).table
    assert float(no_noise.loc[no_noise["kind"] == "interp", "loss"].iloc[0]) not in set(ip["loss"])


def test_interp_alone_writes_no_heatmap_and_report_keeps_its_rows(ckpts, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    rc, text, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out,
                         "--quiet", "--reset", "interp", "--alphas", "0.25,0.75", "--units", "fc4",
                         "--checkpoints", "0", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert not (out / "heatmap.png").exists() and (out / "distances.png").exists()
    assert "interp rows" in json.loads((out / "run.json").read_text())["heatmap_note"]
    assert "unit  baseline" not in text  # no empty per-unit table above the grid
    rc, again, err = cli(["report", out], capsys)
    assert rc == 0, err
    assert again.split("\n\n")[0] == text.split("\n\n")[0]  # the same summary, grid included
    assert "heatmap.png" not in again


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--reset", "reinit,interp"], "--reset interp needs --alphas"),
        (["--alphas", "0.5"], "--alphas is for interpolation: add interp to --reset"),
        (["--reset", "interp", "--alphas", "0.5", "--sigma", "-1"], "--sigma must be >= 0"),
        (["--reset", "interp", "--alphas", "0.5,1.5"], "--alphas must lie in [0, 1]; got 1.5"),
        (["--sigma", "0.1"], "--sigma is for interpolation"),
        (["--reset", "interp", "--alphas", "0.5,nan"], "--alphas takes finite numbers"),
        (["--reset", "interp", "--alphas", "half"], "--alphas takes finite numbers"),
        (["--reset", "interp", "--alphas", ","], "--alphas names no value"),
        (["--reset", "interp", "--alphas", ",".join(str(i / 1000) for i in range(1001))], "more than 1000 values"),
        (["--reset", "interp", "--alphas", "0.5", "--checkpoints", "FINAL"],
         "the only checkpoint chosen is the final one"),
    ],
)
def test_bad_interp_options_are_one_line_exit_2_and_write_nothing(ckpts, tmp_path, capsys, flags,
                                                                   said) -> None:
    flags = [str(_final(ckpts)) if f == "FINAL" else f for f in flags]
    out = tmp_path / "run"
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", out, "--quiet",
                      *flags], capsys)
    assert rc == 2 and said in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_alphas_are_part_of_the_resume_fingerprint(ckpts, tmp_path) -> None:
    kw = dict(reset="interp", checkpoints=[0], units="fc1", device="cpu", progress=False,
              figures=False)
    layerfast.analyze("fcn3x256", ckpts, out=tmp_path, alphas="0.5", **kw)
    with pytest.raises(LayerfastError, match="--fresh"):
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path, alphas="0.25", **kw)
    res = layerfast.analyze("fcn3x256", ckpts, out=tmp_path, alphas="0.25", fresh=True, **kw)
    assert list(res.table["alpha"].dropna()) == [0.25]


def test_seeds_without_noise_still_do_nothing(ckpts, tmp_path, capsys) -> None:
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", tmp_path / "r",
                      "--quiet", "--reset", "interp", "--alphas", "0.5", "--checkpoints", "0",
                      "--units", "fc1", "--seeds", "3"], capsys)
    assert rc == 0, err
    assert "--seeds 1,2,3 has no effect" in err


HEAD = ("unit,kind,checkpoint,seed,error,error_lo,error_hi,top5_error,loss,agreement,n,"
        "delta_error,verdict")
BASE = "*,baseline,,,0.1,0.05,0.2,0.0,0.3,1.0,100,0.0,"


@pytest.mark.parametrize(
    ("extra_head", "rows", "said"),
    [
        (",alpha,sigma", ["fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,0.5,-2"],
         "column 'sigma', row 2"),
        (",alpha,sigma", ["fc1,interp,,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,0.5,0"],
         "column 'checkpoint', row 2"),
        (",alpha,sigma", ["fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,,0"],
         "column 'alpha', row 2"),
        (",alpha,sigma", ["fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,0.5,"],
         "column 'sigma', row 2"),
        (",alpha,sigma", ["fc1,reinit,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,robust,0.5,0"],
         "column 'alpha', row 2"),
        (",alpha", ["fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,0.5"],
         "has column(s) alpha but not sigma"),
        ("", ["fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,"], "column 'kind', row 2"),
    ],
)
def test_report_refuses_broken_interp_rows(tmp_path, extra_head, rows, said) -> None:
    """An interp row without τ, α or σ vanished from the grid or made up a σ = 0 line; alpha
    without sigma dropped both columns and every interp row with them, without a word."""
    from layerfast.report import read_results

    base = BASE + ",," * bool(extra_head) if extra_head != ",alpha" else BASE + ","
    (tmp_path / "results.csv").write_text("\n".join([HEAD + extra_head, base, *rows]) + "\n")
    with pytest.raises(LayerfastError, match=re.escape(said)):
        read_results(tmp_path / "results.csv")


def test_negative_and_exponent_lists_reach_the_value_check(ckpts, tmp_path, capsys) -> None:
    """`--alphas -0.5,1` and `--sigma -1e-9` looked like flags to argparse ("expected one
    argument"), as `--seeds -1,2` did: they reach the check that says what is wrong."""
    for flags, said in ((["--alphas", "-0.5,1"], "--alphas must lie in [0, 1]; got -0.5"),
                        (["--alphas", "0.5", "--sigma", "-1e-9"], "--sigma must be >= 0")):
        rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out",
                          tmp_path / "r", "--quiet", "--reset", "interp", *flags], capsys)
        assert rc == 2 and said in err, err
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", tmp_path / "r",
                      "--quiet", "--reset", "interp", "--alphas", "1e-3,1", "--sigma", "0,1e-2",
                      "--checkpoints", "0", "--units", "fc1"], capsys)
    assert rc == 0, err
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (run["alphas"], run["sigma"]) == ([0.001, 1.0], [0.0, 0.01])


@pytest.mark.parametrize("alphas", [0.5, "0.5", [0.5], (a for a in [0.5])])
def test_alphas_from_python_take_any_number_form(alphas, ckpts, tmp_path) -> None:
    np = pytest.importorskip("numpy")
    kw = dict(reset="interp", checkpoints=[0], units="fc1", device="cpu", progress=False,
              figures=False)
    want = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "a", alphas=alphas, **kw).table
    for other in (np.float32(0.5), np.array(0.5), torch.tensor(0.5), np.array([0.5])):
        got = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "a", alphas=other,
                                sigma=np.float32(0), **kw).table
        assert got.equals(want)
    with pytest.raises(LayerfastError, match="--alphas takes finite numbers"):
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "b", alphas=True, **kw)


def test_minus_zero_is_zero(ckpts, tmp_path, capsys) -> None:
    """`--sigma -0` or `--alphas -0,1` made another fingerprint than 0: a rerun of the same
    request was refused, the difference unnamed (-0.0 == 0.0, but not in JSON)."""
    base = ["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", tmp_path, "--quiet",
            "--reset", "interp", "--checkpoints", "0", "--units", "fc1"]
    rc, _, err = cli([*base, "--alphas", "0,1"], capsys)
    assert rc == 0, err
    rc, text, err = cli([*base, "--alphas=-0,1", "--sigma=-0"], capsys)
    assert rc == 0 and "none evaluated again" in text, err
    assert "alpha=-0" not in text


def test_noise_is_shared_across_alphas_and_sigmas(ckpts, tmp_path) -> None:
    """Common random numbers: one standard normal draw per seed, unit and τ, scaled by σ, so
    a sweep over α or σ varies only what it sweeps. α = 1 with noise σ is the final model plus
    σ·z: the same z for σ and for 2σ."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.models import build_model
    from layerfast.units import make_units
    from layerfast.variants import make_variants

    model, spec = build_model("fcn3x256", 10, (1, 8, 8))
    ck = CheckpointDir(ckpts)
    model.load_state_dict(ck.tensors(ck.final))
    units = make_units(model, arch=spec)
    vs = make_variants(model, units, ck, spec, reset=(), seeds=[3],
                       interp=[("fc2", 0, 1.0, 0.1), ("fc2", 0, 1.0, 0.2), ("fc2", 0, 0.5, 0.1)])
    final = ck.tensors(ck.final)
    z = [{k: (t.double() - final[k].double()) for k, t in v.overrides().items()} for v in vs[1:3]]
    for k in z[0]:
        torch.testing.assert_close(z[1][k], 2 * z[0][k], rtol=1e-5, atol=1e-7)
    th0 = ck.tensors(0)
    half = {k: t.double() - (0.5 * th0[k].double() + 0.5 * final[k].double())
            for k, t in vs[3].overrides().items()}
    for k in z[0]:
        torch.testing.assert_close(half[k], z[0][k], rtol=1e-5, atol=1e-7)


def test_interp_measures_the_final_distance_and_the_grid_shows_spread(ckpts, tmp_path,
                                                                      capsys) -> None:
    """With --checkpoints 0, distances.csv held only zeros: ‖θ^final − θ⁰‖, the far end of
    every interpolation, is measured too. Several seeds show mean (sd) per cell."""
    rc, text, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", tmp_path,
                         "--quiet", "--reset", "interp", "--alphas", "0.5", "--sigma", "0.02,0.05",
                         "--seeds", "2", "--checkpoints", "0", "--units", "fc1"], capsys)
    assert rc == 0, err
    dist = (tmp_path / "distances.csv").read_text().splitlines()
    final = _final(ckpts)
    assert [line.split(",")[1] for line in dist[1:]] == ["0", str(final)]
    assert float(dist[2].split(",")[2]) > 0
    grid = text.split("interp: ")[1].splitlines()
    assert "+ noise; mean (sd) of 2 seeds" in grid[0]
    assert grid[1].split() == ["unit", "tau", "sigma", "alpha=0.5"]
    assert [line.split()[2] for line in grid[2:4]] == ["0.02", "0.05"]
    assert all(line.count("(") == 1 for line in grid[2:4])
    assert "threshold:" not in text  # no verdicts in an interp-only run


def test_grid_labels_stay_apart_and_many_alphas_are_cut() -> None:
    import pandas as pd

    from layerfast.report.terminal import MAX_ALPHA_COLS, summary_table

    rows = [dict(unit="*", kind="baseline", checkpoint=pd.NA, seed=pd.NA, error=0.1, error_lo=0.0,
                 error_hi=0.2, top5_error=0.0, loss=0.3, agreement=1.0, n=100, delta_error=0.0,
                 verdict="", alpha=float("nan"), sigma=float("nan"))]
    alphas = [0.1234567, 0.1234568, *[i / 40 for i in range(20)]]
    for a in alphas:
        rows.append({**rows[0], "unit": "fc1", "kind": "interp", "checkpoint": 0, "alpha": a,
                     "sigma": 0.0})
    text = summary_table(pd.DataFrame(rows))
    head = next(line for line in text.splitlines() if line.startswith("unit"))
    labels = [c for c in head.split() if c.startswith("alpha=")]
    assert len(labels) == MAX_ALPHA_COLS and len(set(labels)) == len(labels)
    assert "alpha=0.1234567" in labels and "..." in head


def test_report_of_a_baseline_alone_prints_its_table(tmp_path, capsys) -> None:
    """A results.csv holding only the baseline row: summary_table's rule took the max of an
    empty list (a traceback) once the per-unit table was hidden for interp-only runs."""
    from layerfast.report.terminal import summary_table

    (tmp_path / "results.csv").write_text(HEAD + "\n" + BASE + "\n")
    from layerfast.report import read_results

    text = summary_table(read_results(tmp_path / "results.csv"))
    assert text.splitlines()[0].startswith("baseline test error 10.00%")
    rc, out, err = cli(["report", tmp_path], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert out.startswith("baseline test error 10.00%")


def test_parse_numbers_refuses_an_overflowing_int() -> None:
    from layerfast.interp import parse_numbers

    with pytest.raises(LayerfastError, match="finite numbers"):
        parse_numbers([10**400], "--alphas", "0.5")


@pytest.mark.parametrize("text", ["1_0", "0_5", "inf", "nan", "-Infinity", "0x1", "١", "1 e2"])
def test_parse_numbers_reads_only_plain_decimals(text: str) -> None:
    """float() reads "1_0" as 10 and "١" as 1: a typo must not become another value."""
    from layerfast.interp import parse_numbers

    with pytest.raises(LayerfastError, match=f"finite numbers like 0.5; got '{text}'"):
        parse_numbers(f"0.25,{text}", "--alphas", "0.5")


@pytest.mark.parametrize("item", [np.bool_(True), b"1_0", b"0.5"])
def test_parse_numbers_refuses_numpy_bools_and_bytes(item: object) -> None:
    from layerfast.interp import parse_numbers

    with pytest.raises(LayerfastError, match="finite numbers"):
        parse_numbers([0.25, item], "--alphas", "0.5")


def test_parse_numbers_reads_what_users_write() -> None:
    from layerfast.interp import parse_numbers

    assert parse_numbers(" 0.5, 1,.25 ,1e-1,-0,+2E0", "--sigma", "0") == [0.5, 1, 0.25, 0.1, 0, 2]
    assert parse_numbers(["0.5", 0.25, np.float32(0.75)], "--alphas", "0.5") == [0.5, 0.25, 0.75]
