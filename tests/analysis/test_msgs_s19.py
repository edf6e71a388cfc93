"""What run.json and the error messages say about precision and stored dtypes (review s19).

- run.json records the dtype each read checkpoint stores its floating weights in (float16 and
  bfloat16 weights are analysed as stored, i.e. rounded), with a warning when it is narrower
  than the model's;
- a model built in float16/bfloat16 (a `module:factory` returning `.half()`) runs its own
  forward: bf16/TF32 are float32 modes, so bf16 there is recorded as what ran (fp32, as for a
  float64 model) instead of failing inside BatchNorm with "mixed dtype", and run.json's
  `model_dtype` says what an fp32 pass computed in;
- a final model whose float32 weights bf16 rounds to Inf is refused naming bf16's range.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from layerfast import analyze
from layerfast.errors import LayerfastError

pytestmark = pytest.mark.usefixtures("one_thread")

_FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def net(num_classes=10, in_shape=(1, 8, 8)):
        c, h, w = in_shape
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * h * w, num_classes))

    def half(num_classes=10, in_shape=(1, 8, 8)):
        return net(num_classes, in_shape).half()

    class Probit(nn.Module):  # torch.special.ndtri has no bfloat16 kernel on the CPU
        def forward(self, x):
            return torch.special.ndtri(torch.sigmoid(x))

    def probit(num_classes=10, in_shape=(1, 8, 8)):
        c, h, w = in_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), Probit(),
                             nn.Linear(16, num_classes))

    def mlp(num_classes=10, in_shape=(1, 8, 8)):
        c, h, w = in_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(),
                             nn.Linear(16, num_classes))
""")


def _save(m: nn.Module, path, dtype: torch.dtype = torch.float32) -> None:
    torch.save({k: v.to(dtype) if v.is_floating_point() else v
                for k, v in m.state_dict().items()}, path)


@pytest.fixture
def msgs19(tmp_path, monkeypatch):
    """An importable `msgs19` module with the factories above, and a checkpoint builder."""
    (tmp_path / "msgs19.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("msgs19", None)
    mod = importlib.import_module("msgs19")
    yield mod
    sys.modules.pop("msgs19", None)


def _ckpts(model: nn.Module, path, dtype: torch.dtype = torch.float32):
    """epoch_000 = `model`, epoch_001 = `model` nudged, both stored in `dtype`."""
    path.mkdir()
    torch.manual_seed(1)
    _save(model, path / "epoch_000.pt", dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _save(model, path / "epoch_001.pt", dtype)
    return path


_KW = {"data": "digits", "device": "cpu", "progress": False, "figures": False,
       "max_samples": 48, "reset": "reinit"}


def test_run_json_records_the_checkpoints_stored_dtype(tmp_path, msgs19):
    """float16 checkpoints were analysed as stored (rounded), cast to the float32 model, and
    nothing in run.json said so."""
    torch.manual_seed(0)
    ck = _ckpts(msgs19.net(), tmp_path / "ck", torch.float16)
    res = analyze("msgs19:net", ck, out=tmp_path / "out", **_KW)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["checkpoint_dtypes"] == {"0": "float16", "1": "float16"}
    assert res.run["checkpoint_dtypes"] == run["checkpoint_dtypes"]
    said = [w for w in run["warnings"] if "float16" in w]
    assert len(said) == 1 and "epoch_000.pt" in said[0] and "float32" in said[0], run["warnings"]


def test_float32_checkpoints_are_recorded_without_a_warning(tmp_path, msgs19):
    torch.manual_seed(0)
    ck = _ckpts(msgs19.net(), tmp_path / "ck")
    analyze("msgs19:net", ck, out=tmp_path / "out", **_KW)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["checkpoint_dtypes"] == {"0": "float32", "1": "float32"}
    assert run["model_dtype"] == "float32"
    assert not [w for w in run["warnings"] if "float16" in w or "dtype" in w], run["warnings"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_float16_model_runs_its_own_forward_and_says_so(tmp_path, msgs19, precision):
    """bf16 on a model built in float16 failed inside BatchNorm ("mixed dtype (CPU): expect
    parameter to have scalar type of Float"), blaming the model; fp32 computed in float16 and
    run.json said only `fp32`."""
    torch.manual_seed(0)
    ck = _ckpts(msgs19.net(), tmp_path / "ck")
    res = analyze("msgs19:half", ck, out=tmp_path / "out", precision=precision, **_KW)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["precision"] == "fp32"
    assert run["model_dtype"] == "float16"
    said = [w for w in run["warnings"] if "float16" in w and "forward" in w]
    assert len(said) == 1, run["warnings"]
    if precision == "bf16":
        assert "bf16" in said[0]
    # the same numbers as the fp32 pass of the same float16 model
    ref = analyze("msgs19:half", ck, out=tmp_path / "ref", precision="fp32", **_KW)
    assert res.table["error"].tolist() == ref.table["error"].tolist()


def test_the_summary_line_names_a_float16_models_dtype(tmp_path, msgs19, capsys):
    """The CLI's last line said "(cpu, fp32)" for a pass that computed in float16."""
    from layerfast.cli import main

    torch.manual_seed(0)
    ck = _ckpts(msgs19.net(), tmp_path / "ck")
    args = ["analyze", "--ckpts", str(ck), "--data", "digits", "--device", "cpu", "--quiet",
            "--max-samples", "48", "--reset", "reinit", "--precision", "fp32"]
    assert main([*args, "--arch", "msgs19:half", "--out", str(tmp_path / "h")]) == 0
    assert "(cpu, fp32 on a float16 model)" in capsys.readouterr().out
    assert main([*args, "--arch", "msgs19:net", "--out", str(tmp_path / "f")]) == 0
    assert "(cpu, fp32)" in capsys.readouterr().out


def test_bf16_overflowing_weights_are_blamed_on_bf16s_range(tmp_path, msgs19):
    """A float32 weight of 3.4e38 is finite (fp32 evaluates the model) but bf16 rounds it to
    Inf: the refusal blamed the checkpoint ("a diverged or corrupted checkpoint")."""
    torch.manual_seed(0)
    m = msgs19.mlp()
    _save(m, (tmp_path / "ck").mkdir() or tmp_path / "ck" / "epoch_000.pt")
    with torch.no_grad():
        m[1].weight[0].zero_()
        m[1].bias[0] = 1.0
        m[3].weight[0, 0] = 3.4e38
    _save(m, tmp_path / "ck" / "epoch_001.pt")
    analyze("msgs19:mlp", tmp_path / "ck", out=tmp_path / "fp32", precision="fp32", **_KW)
    with pytest.raises(LayerfastError) as exc:
        analyze("msgs19:mlp", tmp_path / "ck", out=tmp_path / "bf16", precision="bf16", **_KW)
    msg = str(exc.value)
    assert "bfloat16" in msg and "range" in msg and "--precision fp32" in msg, msg
    assert "3.weight" in msg, msg
    assert "corrupted checkpoint" not in msg, msg
    assert not (tmp_path / "bf16").exists()  # nothing half-written


def test_a_model_failing_only_under_bf16_autocast_is_told_to_use_fp32(tmp_path, msgs19):
    """An op with no bfloat16 kernel failed the bf16 pass with "the model fails on samples
    ...", naming neither the precision nor the mode that runs the model."""
    torch.manual_seed(0)
    ck = _ckpts(msgs19.probit(), tmp_path / "ck")
    analyze("msgs19:probit", ck, out=tmp_path / "fp32", precision="fp32", **_KW)
    with pytest.raises(LayerfastError) as exc:
        analyze("msgs19:probit", ck, out=tmp_path / "bf16", precision="bf16", **_KW)
    msg = str(exc.value)
    assert "the model fails on" in msg and "--precision bf16" in msg, msg
    assert msg.endswith("--precision fp32)"), msg
