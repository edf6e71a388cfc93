"""`analyze` and `list_units` run in fp32, as run.json says, whatever the caller's global default
dtype: a `torch.set_default_dtype(torch.float64)` earlier in a notebook built the registry model
in float64, so every variant ran in float64 and the rerandom draws were other numbers than the
fp32 run's (a row of fcn3x256 on digits moved from 89.2% to 92.2% error) while run.json still
said `precision: fp32`. The caller's default is put back afterwards."""

from __future__ import annotations

import json

import pandas as pd
import torch

from layerfast.analysis import analyze, list_units


def _under_float64(fn, *args, **kwargs):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = fn(*args, **kwargs)
        assert torch.get_default_dtype() is torch.float64  # the caller's default is put back
        return out
    finally:
        torch.set_default_dtype(before)


def test_analyze_under_a_float64_default_is_the_fp32_run(ckpts, tmp_path, one_thread):
    kw = dict(data="digits", reset="reinit,rerandom", checkpoints=[0, 3], max_samples=200,
              progress=False, figures=False, device="cpu")
    analyze("fcn3x256", ckpts, out=tmp_path / "ref", **kw)
    _under_float64(analyze, "fcn3x256", ckpts, out=tmp_path / "run", **kw)
    ref = pd.read_csv(tmp_path / "ref" / "results.csv")
    got = pd.read_csv(tmp_path / "run" / "results.csv")
    assert (got["kind"] == "rerandom").any()
    pd.testing.assert_frame_equal(got, ref)  # exactly: the same fp32 run
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "fp32"
    assert not any("float64" in w for w in run["warnings"]), run["warnings"]


def test_list_units_under_a_float64_default_builds_the_fp32_model():
    seen: list[torch.dtype] = []

    def net(num_classes: int) -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
        seen.append(m[1].weight.dtype)
        return m

    units = _under_float64(list_units, net, "digits")
    assert [u.name for u in units] == ["1"]
    assert seen == [torch.float32]


def test_bench_under_a_float64_default_builds_the_fp32_model(monkeypatch):
    """`bench` built its model under the caller's default dtype, so a float64 default timed a
    float64 model as fp32 (the naive loop too)."""
    import layerfast.bench as bench
    from tests.cli.test_bench_audit import _args

    seen: list[torch.dtype] = []
    real = bench.naive_pass

    def spy(model, *a, **k):
        seen.append(next(model.parameters()).dtype)
        return real(model, *a, **k)

    monkeypatch.setattr(bench, "naive_pass", spy)
    out = _under_float64(bench.run, _args("--arch", "fcn2x16", "--max-samples", "16"))
    assert seen and set(seen) == {torch.float32}
    assert out["precision"] == "fp32"
