"""`analyze --reset interp --alphas A,... [--sigma S]`: the interpolation variants of DESIGN §3
(θ = (1−α)·θ^τ + α·θ^final, + Gaussian noise σ) from the CLI and `layerfast.analyze`, checked
against an independent forward pass, the other kinds' rows, and the bad-input rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerfast
from layerfast.errors import LayerfastError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def cli(argv, capsys):
    from layerfast.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


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
    assert (run["reset"], run["alphas"], run["sigma"]) == (["reinit", "interp"], [0.0, 0.5, 1.0], 0.0)
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
        (["--reset", "interp", "--alphas", "0.5", "--sigma", "-1"], "--sigma must be"),
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


def test_report_refuses_a_bad_alpha_cell(tmp_path) -> None:
    from layerfast.report import read_results

    head = ("unit,kind,checkpoint,seed,error,error_lo,error_hi,top5_error,loss,agreement,n,"
            "delta_error,verdict,alpha,sigma")
    rows = ["*,baseline,,,0.1,0.05,0.2,0.0,0.3,1.0,100,0.0,,,",
            "fc1,interp,0,,0.2,0.1,0.3,0.0,0.5,0.9,100,0.1,,0.5,-2"]
    (tmp_path / "results.csv").write_text("\n".join([head, *rows]) + "\n")
    with pytest.raises(LayerfastError, match="column 'sigma', row 2"):
        read_results(tmp_path / "results.csv")


def test_a_negative_alpha_list_reaches_the_run(ckpts, tmp_path, capsys) -> None:
    """`--alphas -0.5,1.5` (extrapolation) looked like a flag to argparse ("expected one
    argument"), as `--seeds -1,2` did."""
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--ckpts", ckpts, "--out", tmp_path / "r",
                      "--quiet", "--reset", "interp", "--alphas", "-0.5,1.5", "--checkpoints", "0",
                      "--units", "fc1"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["alphas"] == [-0.5, 1.5]
