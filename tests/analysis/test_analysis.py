"""`layerfast.analyze()` end to end on `digits` (DESIGN.md §5): the outputs, their columns and
the exact invariants a reader of results.csv relies on.

One small FCN is trained once per module (a few seconds) and analysed once; the tests read that
run. Exact equalities are exact on purpose: a reinit to the final τ *is* the baseline, and the
full model at τ *is* the checkpoint the trainer evaluated, so any difference is a bug.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import layerfast
from layerfast.analysis import OUTPUTS, list_units
from layerfast.errors import LayerfastError
from layerfast.metrics import COLUMNS

SEEDS = 2
UNITS = ["fc1", "fc2", "fc3", "fc4"]
DIST_COLUMNS = ["unit", "checkpoint", "l2", "l2_rel", "linf"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def run(ckpts, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("analysis")
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", seeds=SEEDS, device="cpu",
                            out=out, progress=False)
    return res


@pytest.fixture(scope="module")
def manifest(ckpts) -> dict:
    return json.loads((ckpts / "manifest.json").read_text())


def _taus(manifest: dict) -> list[int]:
    return [c["epoch"] for c in manifest["checkpoints"]]


def test_writes_exactly_the_outputs(run) -> None:
    for name in OUTPUTS:
        assert (run.out / name).is_file(), name
    visible = {p.name for p in run.out.iterdir() if not p.name.startswith(".")}
    assert visible == set(OUTPUTS) | {"progress.sqlite"}


def test_results_columns_and_rows(run, manifest) -> None:
    header = (run.out / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == list(COLUMNS)
    t = pd.read_csv(run.out / "results.csv", keep_default_na=False, na_values=[""])
    assert list(t.columns) == list(COLUMNS) == list(run.table.columns)
    taus = _taus(manifest)
    kinds = t["kind"].value_counts().to_dict()
    assert kinds == {"baseline": 1, "reinit": len(UNITS) * len(taus),
                     "rerandom": len(UNITS) * SEEDS, "fullmodel": len(taus)}
    assert len(t) == run.run["variants"]
    # one row per variant: no (unit, kind, checkpoint, seed) twice
    assert not t.duplicated(["unit", "kind", "checkpoint", "seed"]).any()
    base = t.iloc[0]
    assert base["kind"] == "baseline" and base["unit"] == "*"
    assert base["delta_error"] == 0 and base["agreement"] == 1
    assert math.isnan(base["checkpoint"]) and math.isnan(base["seed"])
    assert (t["n"] == 360).all()
    assert set(t.loc[t.kind == "fullmodel", "unit"]) == {"*"}
    assert set(t.loc[t.kind == "reinit", "unit"]) == set(UNITS)
    assert t.loc[t.kind == "rerandom", "checkpoint"].isna().all()
    assert sorted(set(t.loc[t.kind == "rerandom", "seed"])) == list(range(1, SEEDS + 1))
    assert t.loc[t.kind != "rerandom", "seed"].isna().all()


def test_errors_intervals_and_verdicts(run) -> None:
    t = run.table
    assert ((t.error_lo <= t.error) & (t.error <= t.error_hi)).all()
    assert ((t.error_lo >= 0) & (t.error_hi <= 1)).all()
    assert np.allclose(t.delta_error, t.error - t.error.iloc[0], atol=1e-12)
    judged = t.kind.isin(["reinit", "rerandom"])
    expect = np.where(t.delta_error <= run.run["threshold"], "robust", "critical")
    assert (t.loc[judged, "verdict"] == expect[judged.to_numpy()]).all()
    assert (t.loc[~judged, "verdict"] == "").all()
    assert set(t.loc[t.kind == "rerandom", "verdict"]) == {"critical"}  # chance-level on digits


def test_reinit_to_final_is_the_baseline_bit_for_bit(run, manifest) -> None:
    """Issue 6's invariant. What it checks: each unit's reset to the final τ loads exactly the
    final tensors, and the engine then scores it as the baseline. It does not compute those
    rows (the engine's shortcut takes them from the baseline's logits); that the shortcut is
    taken for equal tensors only, and agrees with a full forward, is test_engine_edges.py's
    test_only_variants_equal_to_the_live_tensors_are_scored_as_the_baseline."""
    t, final = run.table, _taus(manifest)[-1]
    base = t.iloc[0]
    rows = t[(t.kind == "reinit") & (t.checkpoint == final)]
    assert len(rows) == len(UNITS)
    for _, r in rows.iterrows():
        assert r.error == base.error and r.loss == base.loss and r.agreement == 1.0


def test_fullmodel_reproduces_the_trainers_errors(run, manifest) -> None:
    t = run.table.set_index(["kind", "checkpoint"])
    for c in manifest["checkpoints"]:
        err = t.loc[("fullmodel", c["epoch"]), "error"]
        # Exact in counts: the same samples are counted wrong as when the trainer saved τ.
        assert err == (c["test_n"] - c["test_correct"]) / c["test_n"]
        # test_error itself is 1 - c/n, which may differ from (n - c)/n in the last ulp.
        assert err == pytest.approx(c["test_error"], abs=1e-15)
    assert t.loc[("fullmodel", _taus(manifest)[-1]), "error"] == run.table.error.iloc[0]


def test_distances(run, manifest) -> None:
    d = pd.read_csv(run.out / "distances.csv", dtype={"checkpoint": str})
    assert list(d.columns) == DIST_COLUMNS == list(run.distances.columns)
    taus = _taus(manifest)
    for unit in UNITS:
        rows = d[d.unit == unit]
        assert list(rows.checkpoint) == [str(x) for x in taus] + [f"rerandom:{s}" for s in
                                                                    range(1, SEEDS + 1)]
        zero = rows[rows.checkpoint == "0"].iloc[0]
        assert zero.l2 == 0 and zero.l2_rel == 0 and zero.linf == 0
        assert (rows.l2 >= 0).all() and (rows.linf <= rows.l2 + 1e-12).all()
        assert (rows[rows.checkpoint.str.startswith("rerandom")].l2 > 0).all()


@pytest.mark.parametrize("reset", ["rerandom", "fullmodel", "rerandom,fullmodel"])
def test_distances_do_not_depend_on_reinit(reset, ckpts, manifest, tmp_path) -> None:
    """DESIGN §5: distances per unit per τ whatever `--reset` evaluates (τ rows for the
    evaluated checkpoints), rerandom rows only with rerandom; distances.png with them."""
    res = layerfast.analyze("fcn3x256", ckpts, reset=reset, device="cpu", out=tmp_path,
                            progress=False, max_samples=50)
    d = pd.read_csv(tmp_path / "distances.csv", dtype={"checkpoint": str})
    rr = ["rerandom:1"] if "rerandom" in reset else []
    for unit in UNITS:
        assert list(d[d.unit == unit].checkpoint) == [str(t) for t in _taus(manifest)] + rr
    assert (tmp_path / "distances.png").is_file() and "distances_note" not in res.run
    some = layerfast.analyze("fcn3x256", ckpts, reset=reset, checkpoints="0,2", device="cpu",
                             out=tmp_path / "some", progress=False, max_samples=50,
                             figures=False)
    assert set(some.distances.checkpoint.astype(str)) == {"0", "2", *rr}


def test_no_distances_without_tau0_says_why(ckpts, tmp_path) -> None:
    import shutil

    d = Path(shutil.copytree(ckpts, tmp_path / "ck"))
    (d / "epoch_000.pt").unlink()
    man = json.loads((d / "manifest.json").read_text())
    man["checkpoints"] = [c for c in man["checkpoints"] if c["epoch"] != 0]
    (d / "manifest.json").write_text(json.dumps(man))
    res = layerfast.analyze("fcn3x256", d, reset="rerandom", device="cpu", out=tmp_path / "o",
                            progress=False, max_samples=50)
    assert res.distances.empty and not (tmp_path / "o" / "distances.png").exists()
    note = json.loads((tmp_path / "o" / "run.json").read_text())["distances_note"]
    assert "τ=0" in note


def test_repeated_option_values_are_dropped(ckpts, tmp_path) -> None:
    """`--checkpoints 0,0,2`, `--reset reinit,reinit` and seeds 1,1 ask for what 0,2 / reinit /
    1 ask for: run.json lists each once and the same out dir resumes instead of refusing."""
    from layerfast.flags import _parse_checkpoints, _parse_list, _seed_list

    assert _parse_checkpoints("0,0,4, 0") == [0, 4] and _parse_checkpoints([3, 3, 1]) == [1, 3]
    assert _parse_list("reinit, reinit,fullmodel") == ["reinit", "fullmodel"]
    assert _parse_list(["fc1", "fc1"]) == ["fc1"] and _seed_list([2, 1, 2]) == [1, 2]
    kw = dict(device="cpu", out=tmp_path, progress=False, max_samples=50, figures=False)
    first = layerfast.analyze("fcn3x256", ckpts, checkpoints="0,2", reset="reinit,rerandom",
                              seeds=[1], **kw)
    again = layerfast.analyze("fcn3x256", ckpts, checkpoints="0,0,2",
                              reset="reinit,reinit,rerandom", seeds=[1, 1], **kw)
    assert again.run["engine"]["evaluated"] == 0  # resumed: the same arguments
    for res in (first, again):
        assert res.run["evaluated_checkpoints"] == [0, 2] and res.run["reset"] == ["reinit",
                                                                                   "rerandom"]
        assert res.run["seeds"] == [1]
    pd.testing.assert_frame_equal(first.table, again.table)


def test_run_json(run, ckpts, manifest) -> None:
    r = json.loads((run.out / "run.json").read_text())
    for key in ("arch", "checkpoints", "data", "n", "device", "precision", "granularity", "bn",
                "threshold", "seeds", "versions", "timings", "engine"):
        assert key in r, key
    assert r["arch"] == "fcn3x256" and r["data"] == "digits" and r["n"] == 360
    assert r["checkpoints"] == {str(c["epoch"]): c["file"] for c in manifest["checkpoints"]}
    assert (r["device"], r["precision"], r["granularity"], r["bn"]) == ("cpu", "fp32", "layer",
                                                                        "with-layer")
    assert r["threshold"] == 0.05 and r["seeds"] == list(range(1, SEEDS + 1))
    assert r["versions"]["layerfast"] == layerfast.__version__ and r["versions"]["torch"]
    assert r["timings"]["total"] > 0
    assert r["engine"]["resumed_from"] == 0 and r["engine"]["evaluated"] == 360
    assert r["units"] == UNITS


def test_python_api_plot_and_summary(run, tmp_path) -> None:
    p = run.plot(tmp_path / "fig.png")
    assert p.is_file() and p.stat().st_size > 1000
    assert run.plot(tmp_path / "d.png", kind="distances").is_file()
    with pytest.raises(LayerfastError, match="unknown plot kind"):
        run.plot(tmp_path / "x.png", kind="pie")
    text = run.summary()
    assert "fc1" in text and "threshold" in text


def test_python_api_figure_returns_the_plotted_figure(run, tmp_path) -> None:
    """`plot()` wrote a PNG and returned its path: a notebook showed nothing. `figure()` gives
    the matplotlib Figure `plot()` saves, with a canvas (savefig works) and no pyplot state."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    open_before = plt.get_fignums()
    fig = run.figure()
    assert isinstance(fig, Figure) and plt.get_fignums() == open_before
    assert "Test error (%)" in fig._suptitle.get_text()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert {"fc1", "fc2", "fc3", "fc4"} <= set(labels)
    fig.savefig(tmp_path / "h.svg")  # any format, through its own canvas
    assert (tmp_path / "h.svg").stat().st_size > 1000
    dist = run.figure("distances")
    assert "from their initialization" in dist._suptitle.get_text() and len(dist.axes) >= 2
    with pytest.raises(LayerfastError, match="unknown plot kind"):
        run.figure("pie")


def test_threshold_rejudges_a_finished_run_without_evaluating(run, ckpts, monkeypatch) -> None:
    """The threshold does not change the sums: rerunning a finished run at another threshold
    reuses them (no engine pass) and only the verdicts move."""
    from layerfast.engine import Evaluator

    def no_pass(*a, **k):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(Evaluator, "run", no_pass)
    before = (run.out / "results.csv").read_bytes()
    res = layerfast.analyze("fcn3x256", ckpts, seeds=SEEDS, device="cpu", out=run.out,
                            progress=False, figures=False, threshold=0.5)
    t = res.table
    judged = t.kind.isin(["reinit", "rerandom"])
    assert (t.loc[judged, "verdict"] == np.where(t.delta_error <= 0.5, "robust", "critical")[
        judged.to_numpy()]).all()
    assert res.run["engine"]["evaluated"] == 0 and res.run["engine"]["resumed_from"] == 360
    layerfast.analyze("fcn3x256", ckpts, seeds=SEEDS, device="cpu", out=run.out,
                      progress=False, figures=False)  # back to 0.05
    assert (run.out / "results.csv").read_bytes() == before


@pytest.mark.parametrize("granularity,count,first,last",
                         [("block", 18, "stem", "fc"), ("stage", 6, "stem", "fc"),
                          ("layer", 54, "conv1", "fc")])
def test_list_units_resnet50(granularity, count, first, last) -> None:
    units = list_units("resnet50", "synthetic:imagenet", granularity)
    names = [u.name for u in units]
    assert len(names) == count and names[0] == first and names[-1] == last
    if granularity == "block":
        depth = {1: 3, 2: 4, 3: 6, 4: 3}  # ResNet-50's blocks per stage
        assert names[1:-1] == [f"layer{s}.{b}" for s, n in depth.items() for b in range(n)]
    if granularity == "stage":
        assert names[1:-1] == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.cuda
def test_cuda_analysis_matches_cpu(run, ckpts, manifest, tmp_path) -> None:
    """The whole analysis on the GPU, fp32 (TF32 off): planned batch, fan-out on by default,
    on-device scoring. Counts equal the CPU run's up to one near-tie flip per variant; reinit
    to the final τ is still scored as the baseline (bit for bit, by the engine's shortcut for
    variants equal to the live tensors, which here are on the GPU)."""
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", seeds=SEEDS, device="cuda",
                            precision="fp32", out=tmp_path / "gpu", progress=False)
    assert res.run["device"].startswith("cuda")
    assert res.run["engine"]["plan"]["fanned_variants"] > 0, res.run["engine"]["plan"]
    assert res.run["batch_size"] >= 32
    cpu, gpu = run.table, res.table
    assert list(cpu["unit"]) == list(gpu["unit"]) and list(cpu["kind"]) == list(gpu["kind"])
    n = int(cpu["n"].iloc[0])
    flips = ((cpu["error"] - gpu["error"]) * n).round().abs()
    print(f"max flips per variant {flips.max()}, over {len(flips)} variants")
    assert flips.max() <= 1
    base = gpu[gpu["kind"] == "baseline"]["error"].iloc[0]
    final = manifest["checkpoints"][-1]["epoch"]
    last = gpu[(gpu["kind"] == "reinit") & (gpu["checkpoint"] == final)]
    assert (last["error"] == base).all()


def test_a_baseline_at_chance_is_warned_about(ckpts, tmp_path, capsys) -> None:
    """The initialization analysed as the final model (final=0) is at chance: no reset can make
    it 5 points worse on average, so every unit would read "robust". The run says so, on
    stderr and in run.json; a trained final model gets no such note."""
    kw = dict(reset="reinit", device="cpu", progress=False, figures=False)
    res = layerfast.analyze("fcn3x256", ckpts, final=0, out=tmp_path / "init", **kw)
    base = res.table.loc[res.table.kind == "baseline", "error"].item()
    assert base >= 0.85  # the premise: an untrained 10-class model
    run = json.loads((tmp_path / "init" / "run.json").read_text())
    note = run["baseline_note"]
    assert "chance (90.00% for 10 classes)" in note and "say nothing" in note
    assert note in capsys.readouterr().err
    assert run["warnings"] == [note]  # every warning of the run is kept beside its results
    assert (res.table.loc[res.table.kind == "reinit", "verdict"] == "robust").all()
    trained = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "final", **kw)
    assert "baseline_note" not in trained.run and "chance" not in capsys.readouterr().err
    assert json.loads((tmp_path / "final" / "run.json").read_text())["warnings"] == []


def test_an_out_of_memory_back_off_is_a_warning_kept_in_run_json(ckpts, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    """Running out of memory halves the forwards for the rest of the run: exact, but slower than
    the plan. That was only a number in run.json's engine.plan; it is a warning now, on stderr
    and in run.json's "warnings", and the results equal a run that had the memory."""
    from layerfast.engine.graph import Program

    kw = dict(reset="reinit", device="cpu", progress=False, figures=False, batch_size=64)
    clean = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "clean", **kw)
    real, failed = Program.run, []

    def run_once_out_of_memory(self, x, start=0, *a, **k):
        if "keep" in k and x.shape[0] == 64 and not failed:  # the first baseline forward
            failed.append(x.shape[0])
            raise torch.OutOfMemoryError("simulated")
        return real(self, x, start, *a, **k)

    monkeypatch.setattr(Program, "run", run_once_out_of_memory)
    res = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "oom", **kw)
    assert failed == [64] and res.run["engine"]["plan"]["rows_after_oom"] == 32
    warned = json.loads((tmp_path / "oom" / "run.json").read_text())["warnings"]
    assert len(warned) == 1 and warned[0].startswith("the device ran out of memory")
    assert "every batch in pieces of 32 samples" in warned[0]
    assert warned[0] in capsys.readouterr().err
    assert json.loads((tmp_path / "clean" / "run.json").read_text())["warnings"] == []
    exact = ["unit", "kind", "checkpoint", "error", "top5_error", "agreement", "n", "verdict"]
    pd.testing.assert_frame_equal(res.table[exact], clean.table[exact])  # the same counts


def test_only_the_checkpoints_the_run_reads_are_validated(ckpts, tmp_path) -> None:
    """A NaN in an epoch the run leaves out (`--checkpoints 0`) used to refuse the run: every
    file of the directory was validated and scanned, read end to end. Now only the final τ, θ⁰
    and the chosen τ are; asking for the broken epoch is still the clear error."""
    import shutil

    d = Path(shutil.copytree(ckpts, tmp_path / "ck"))
    sd = torch.load(d / "epoch_001.pt", weights_only=True)
    sd["fc2.weight"][0, 0] = float("nan")
    torch.save(sd, d / "epoch_001.pt")
    kw = dict(reset="reinit", device="cpu", progress=False, figures=False)
    res = layerfast.analyze("fcn3x256", d, checkpoints="0", out=tmp_path / "o0", **kw)
    assert set(res.table.checkpoint.dropna().astype(int)) == {0}  # reinit to θ⁰ only
    assert sorted(res.distances.checkpoint.astype(int).unique()) == [0]
    for bad in ("1", "all"):
        with pytest.raises(LayerfastError, match=r"NaN or Inf.*epoch_001\.pt"):
            layerfast.analyze("fcn3x256", d, checkpoints=bad, out=tmp_path / f"o{bad}", **kw)
        assert not (tmp_path / f"o{bad}").exists()


def test_without_data_the_manifest_names_it_and_without_a_manifest_it_is_required(
        tmp_path, capsys) -> None:
    """`--data` defaulted to `digits`: a model trained on other data whose head fitted was
    analysed on digits, exit 0, without a word. Now the data is the one the checkpoints'
    manifest.json names, said on stderr, and without a manifest `--data` is required."""
    import shutil

    from layerfast.cli import main
    from layerfast.train import train

    spec = "synthetic:cifar:40"
    train("fcn1x8", spec, 1, tmp_path / "ck", device="cpu", progress=False)
    res = layerfast.analyze("fcn1x8", tmp_path / "ck", reset="reinit", device="cpu",
                            out=tmp_path / "o", progress=True, figures=False)
    assert res.run["data"] == spec and res.table["n"].iloc[0] != 360  # not digits' test split
    assert f"evaluating on {spec!r} (test split), the data" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (tmp_path / "ck").glob("*.pt"):
        shutil.copy(f, bare)
    argv = ["analyze", "--arch", "fcn1x8", "--ckpts", str(bare), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data is required" in err
    assert not (tmp_path / "b").exists()
    assert main([*argv, "--data", spec, "--quiet", "--reset", "reinit"]) == 0  # named: it runs


def test_the_manifest_names_its_data_by_absolute_path(tmp_path, monkeypatch) -> None:
    """`train --data x.npz` run in one directory, `analyze` without --data in another: the
    manifest records the spec with its path made absolute, so the data is found."""
    from layerfast.train import train

    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d" / "x.npz", x_train=rng.random((40, 1, 4, 4), dtype=np.float32),
             y_train=rng.integers(0, 3, 40), x_test=rng.random((24, 1, 4, 4), dtype=np.float32),
             y_test=np.arange(24) % 3)  # fmt: skip
    monkeypatch.chdir(tmp_path / "d")
    train("fcn1x8", "x.npz", 1, tmp_path / "ck", device="cpu", progress=False)
    want = str((tmp_path / "d" / "x.npz").resolve())
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["data"] == want
    monkeypatch.chdir(tmp_path)
    res = layerfast.analyze("fcn1x8", tmp_path / "ck", reset="reinit", device="cpu",
                            out=tmp_path / "o", progress=False, figures=False)
    assert res.run["data"] == want and res.table["n"].iloc[0] == 24
    # a hand-written manifest with a relative path: relative to the manifest, not to the cwd
    man = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps({**man, "data": "../d/x.npz"}))
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # where "../d/x.npz" is not a file
    res = layerfast.analyze("fcn1x8", tmp_path / "ck", reset="reinit", device="cpu",
                            out=tmp_path / "o2", progress=False, figures=False)
    assert res.run["data"] == want and res.table["n"].iloc[0] == 24


def test_non_finite_logits_are_an_error_for_the_baseline_and_a_warning_for_a_variant(
        ckpts, tmp_path, capsys) -> None:
    """Huge finite weights passed the NaN/Inf check, and the run exited 0 with an empty loss,
    an error near chance and 'robust' verdicts below the baseline: a NaN logit is never above
    the label's, so such a sample can even count as correct. The baseline is now bad input;
    a variant whose reset overflows is a warning naming it."""
    import shutil

    d = Path(shutil.copytree(ckpts, tmp_path / "ck"))
    kw = dict(reset="reinit", device="cpu", progress=False, figures=False, data="digits")
    final = d / "epoch_003.pt"
    sd = torch.load(final, weights_only=True)
    sd["fc1.weight"].fill_(3e38)
    torch.save(sd, final)
    with pytest.raises(LayerfastError, match=r"final model gives NaN or Inf logits on 'digits'"):
        layerfast.analyze("fcn3x256", d, out=tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()  # found after the pass: its new dir, store, lock go
    (tmp_path / "mine").mkdir()  # an out dir that was there before is left as it was
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(LayerfastError, match=r"NaN or Inf logits"):
        layerfast.analyze("fcn3x256", d, out=tmp_path / "mine", **kw)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # no store, lock
    # --fresh over a finished run: its results, store and lock come back as they were
    done = tmp_path / "done"
    layerfast.analyze("fcn3x256", ckpts, out=done, **{**kw, "figures": True})
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(LayerfastError, match=r"NaN or Inf logits"):
        layerfast.analyze("fcn3x256", d, out=done, fresh=True, **kw)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    assert layerfast.analyze("fcn3x256", ckpts, out=done, **kw).run["engine"]["evaluated"] == 0
    shutil.copy(ckpts / "epoch_003.pt", final)  # a sound final model, an overflowing τ = 1
    sd = torch.load(d / "epoch_001.pt", weights_only=True)
    sd["fc2.weight"].fill_(3e38)
    torch.save(sd, d / "epoch_001.pt")
    res = layerfast.analyze("fcn3x256", d, checkpoints="1", out=tmp_path / "v", **kw)
    warned = json.loads((tmp_path / "v" / "run.json").read_text())["warnings"]
    assert len(warned) == 1 and warned[0].startswith("1 variant gave NaN or Inf logits")
    assert "reinit fc2 @1" in warned[0] and warned[0] in capsys.readouterr().err
    rows = res.table[res.table.kind == "reinit"].set_index("unit")
    assert pd.isna(rows.loc["fc2", "loss"]) and rows.drop("fc2")["loss"].notna().all()


def test_an_arch_other_than_the_manifests_is_a_warning(ckpts, tmp_path, monkeypatch) -> None:
    """Checkpoints trained as one arch and analysed as another whose keys and shapes fit (a
    user factory building the same net) ran without a word."""
    (tmp_path / "samefcn.py").write_text(
        "from layerfast.models import build_model\n"
        "def make(num_classes, in_shape):\n"
        "    return build_model('fcn3x256', num_classes, in_shape)[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = layerfast.analyze("samefcn:make", ckpts, reset="reinit", device="cpu", data="digits",
                            out=tmp_path / "o", progress=False, figures=False)
    assert res.run["warnings"] == [
        f"{ckpts}: manifest.json says the checkpoints are 'fcn3x256'; analysing them as "
        "'samefcn:make'"]


def test_tf32_off_cuda_is_recorded_as_fp32_with_a_warning(ckpts, tmp_path, capsys):
    res = layerfast.analyze("fcn3x256", ckpts, data="digits", reset="reinit", checkpoints="0",
                            precision="tf32", device="cpu", out=tmp_path / "o", progress=False,
                            figures=False)
    msg = ("precision tf32 (TensorFloat-32 matmuls and convolutions) is a CUDA mode: on cpu it "
           "runs, and is recorded, as fp32")
    assert res.run["precision"] == "fp32" and res.run["warnings"] == [msg]
    assert f"layerfast: warning: {msg}" in capsys.readouterr().err


def test_seeds_without_rerandom_are_said_to_do_nothing(ckpts, tmp_path, capsys):
    """`--reset reinit --seeds 5` ran without a word and recorded seeds 1..5 as if they
    mattered. The default (1) is not warned about."""
    kw = dict(data="digits", reset="reinit", checkpoints="0", device="cpu", progress=False,
              figures=False)
    res = layerfast.analyze("fcn3x256", ckpts, seeds=5, out=tmp_path / "a", **kw)
    assert res.run["warnings"] == ["--seeds 1,2,3,4,5 has no effect: only rerandom (and interp "
                                   "with --sigma > 0) draws seeds, and --reset is reinit"]
    res = layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "b", **kw)
    assert res.run["warnings"] == []
    # and they are not part of the run's identity: another count resumes the same run
    res = layerfast.analyze("fcn3x256", ckpts, seeds=3, out=tmp_path / "a", **kw)
    assert res.run["engine"]["evaluated"] == 0 and res.run["seeds"] == [1, 2, 3]
