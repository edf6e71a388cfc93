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


@pytest.mark.parametrize("epochs", ["99999999999", str(2**63), "1000001"])
def test_train_absurd_epochs_are_refused_before_anything_is_written(tmp_path, epochs, capsys):
    """`train --epochs 99999999999` (a typo) was accepted: it wrote epoch_000.pt and trained
    on, a run that never ends; from 2**63 on its final label is one analyze refuses."""
    rc = main(["train", "--arch", "fcn1x4", "--data", "digits", "--epochs", epochs,
               "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "epochs must be at most 1,000,000" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_train_api_absurd_epochs_are_refused():
    from layerfast.train import checkpoint_schedule

    with pytest.raises(LayerfastError, match="epochs must be at most"):
        checkpoint_schedule(99999999999)


def test_train_epochs_at_the_bound_still_plan_a_schedule():
    from layerfast.train import MAX_EPOCHS, checkpoint_schedule

    assert checkpoint_schedule(MAX_EPOCHS)[-3:] == [400_000, 900_000, MAX_EPOCHS]


@pytest.mark.parametrize("text", ["inf", "1e400"])
def test_an_infinite_checkpoint_interval_from_the_environment_is_warned(ckpts, tmp_path, text,
                                                                        monkeypatch, capsys):
    """LAYERFAST_CHECKPOINT_EVERY=inf silently meant "never save mid-pass": a killed run then
    started over. It runs, and says so on stderr and in run.json."""
    import json

    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", text)
    out = tmp_path / "o"
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--reset", "reinit",
                 "--checkpoints", "0", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "LAYERFAST_CHECKPOINT_EVERY" in line]
    assert len(said) == 1 and "saved only when the pass ends" in said[0]
    assert any("LAYERFAST_CHECKPOINT_EVERY" in w
               for w in json.loads((out / "run.json").read_text())["warnings"])


@pytest.mark.parametrize("every", ["x", "5", True])
def test_a_bad_checkpoint_every_argument_is_named_as_the_argument(ckpts, tmp_path, every,
                                                                  monkeypatch):
    """`analyze(checkpoint_every="x")` was blamed on LAYERFAST_CHECKPOINT_EVERY, and True ran
    as one second."""
    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "5")
    with pytest.raises(LayerfastError, match=r"checkpoint interval \(checkpoint_every\) must"):
        layerfast.analyze("fcn3x256", ckpts, checkpoint_every=every, out=tmp_path / "o",
                          progress=False)
    assert not (tmp_path / "o").exists()


def test_a_finite_interval_and_an_explicit_infinite_argument_say_nothing(monkeypatch, capsys):
    import math

    from layerfast.flags import _checkpoint_every

    monkeypatch.setenv("LAYERFAST_CHECKPOINT_EVERY", "30")
    assert _checkpoint_every(None) == 30.0 and _checkpoint_every(math.inf) == math.inf
    assert capsys.readouterr().err == ""


@pytest.mark.ffcv
def test_convert_refuses_to_replace_a_beton_of_the_other_split(tmp_path, capsys):
    """`convert digits --split train --to d.beton` replaced the test split's d.beton (its
    sidecar records the split) without a word; now exit 2, one line, the old files intact.
    The same split again still re-converts."""
    from layerfast.data import convert
    from tests.data.test_data_ffcv import require_ffcv

    require_ffcv()
    to = tmp_path / "d.beton"
    assert main(["convert", "digits", "--to", str(to)]) == 0
    before = to.read_bytes(), (tmp_path / "d.beton.json").read_text()
    capsys.readouterr()
    assert main(["convert", "digits", "--split", "train", "--to", str(to)]) == 2
    err = capsys.readouterr().err
    assert "holds the test split of 'digits'" in err and "remove it first" in err
    assert err.count("\n") == 1
    assert (to.read_bytes(), (tmp_path / "d.beton.json").read_text()) == before
    assert main(["convert", "digits", "--split", "test", "--to", str(to)]) == 0
    with pytest.raises(LayerfastError, match="holds the test split"):
        convert("digits", to, split="train")


def _digits_npz(path):
    """The digits test split as an npz (same shape and classes as `digits`, other scaling)."""
    import numpy as np

    from layerfast.data import open_data

    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in open_data("digits").batches(1000)),
                 strict=True)
    np.savez(path, x=np.concatenate(xs), y=np.concatenate(ys))
    return path


def _data_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "which the checkpoints were trained on" in line]


def test_data_other_than_the_manifests_is_warned_naming_both(ckpts, tmp_path, capsys):
    """`--data other.npz` on checkpoints whose manifest.json names `digits` (shapes that fit)
    ran without a word; now one warning on stderr (and in run.json) names both."""
    import json

    npz = _digits_npz(tmp_path / "other.npz")
    capsys.readouterr()
    rc = main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--data", str(npz),
               "--reset", "reinit", "--checkpoints", "0", "--out", str(tmp_path / "o"),
               "--quiet", "--device", "cpu"])
    said = _data_warnings(capsys.readouterr().err)
    assert rc == 0 and len(said) == 1
    assert str(npz) in said[0] and "'digits'" in said[0] and "manifest.json" in said[0]
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert sum("which the checkpoints were trained on" in w for w in run["warnings"]) == 1


@pytest.mark.parametrize("how", ["same spec", "relative path", "no --data"])
def test_the_manifests_own_data_says_nothing(ckpts, tmp_path, how, monkeypatch, capsys):
    import json
    import shutil

    ck = ckpts
    data: list[str] = ["--data", "digits"] if how == "same spec" else []
    if how == "relative path":  # the manifest names x.npz beside it; --data spells it otherwise
        ck = tmp_path / "ck"
        shutil.copytree(ckpts, ck)
        _digits_npz(ck / "x.npz")
        man = json.loads((ck / "manifest.json").read_text())
        (ck / "manifest.json").write_text(json.dumps({**man, "data": "x.npz"}))
        monkeypatch.chdir(tmp_path)
        data = ["--data", "ck/../ck/x.npz"]
    capsys.readouterr()
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), *data, "--reset",
                 "reinit", "--checkpoints", "0", "--out", str(tmp_path / "o"), "--quiet",
                 "--device", "cpu"]) == 0
    assert _data_warnings(capsys.readouterr().err) == []


@pytest.mark.ffcv
def test_a_beton_converted_from_the_manifests_data_says_nothing(ckpts, tmp_path, capsys):
    from layerfast.data import convert
    from tests.data.test_data_ffcv import require_ffcv

    require_ffcv()
    to = convert("digits", tmp_path / "d.beton")
    capsys.readouterr()
    res = layerfast.analyze("fcn3x256", ckpts, data=str(to), reset="reinit", checkpoints="0",
                            out=tmp_path / "o", progress=False, device="cpu", figures=False)
    assert _data_warnings(capsys.readouterr().err) == []
    assert not any("trained on" in w for w in res.run.get("warnings", []))
