"""Review of the Python API as research code embeds it: what `Evaluator` and `analyze` leave
behind in the process (global torch settings, the caller's model) and what they accept. Each
test failed on a5955c0 but those marked as guards of a fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

NEW_FP32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _run_py(code: str) -> str:
    """`code` in a fresh interpreter (the precision settings are process-global and a mixed
    legacy/new state cannot be undone reliably); its last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


_EVAL = """
import torch
from torch import nn
import layerfast
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
def run(precision="fp32"):
    return layerfast.Evaluator(m, [{}, {"2.bias": torch.zeros(3)}], device="cpu",
                               precision=precision).run([(x, y)])
"""


@pytest.mark.skipif(not NEW_FP32_API, reason="torch without the per-backend fp32_precision API")
def test_evaluator_runs_for_a_caller_of_torchs_new_fp32_precision_api():
    # torch 2.9+ recommends `torch.backends.cuda.matmul.fp32_precision = "tf32"`; once it is
    # used, reading the legacy `allow_tf32` raises, and precision_context read it on every pass:
    # the Evaluator (and analyze, train) failed with torch's "mix of the legacy and new APIs".
    out = _run_py(_EVAL + """
torch.backends.cuda.matmul.fp32_precision = "tf32"
torch.backends.cudnn.conv.fp32_precision = "ieee"
res = run()
print(res.n, torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
""")
    assert out == "16 tf32 ieee"


def test_evaluator_keeps_a_callers_medium_float32_matmul_precision():
    # Restoring `allow_tf32 = True` made "medium" "high" (torch < 2.9) or a mixed legacy/new
    # state in which torch.get_float32_matmul_precision() itself raised (2.9+).
    out = _run_py(_EVAL + """
torch.set_float32_matmul_precision("medium")
run("fp32"); run("bf16")
print(torch.get_float32_matmul_precision())
""")
    assert out == "medium"


@pytest.mark.skipif(not NEW_FP32_API, reason="torch without the per-backend fp32_precision API")
def test_evaluator_leaves_the_default_fp32_precision_settings_as_they_were():
    # Restoring through the legacy setter wrote "ieee" over the default "none" (inherit).
    out = _run_py(_EVAL + """
b = torch.backends
def state():
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
            b.cudnn.rnn.fp32_precision, b.mkldnn.matmul.fp32_precision,
            torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
before = state()
run("fp32"); run("bf16")
print(state() == before, before)
""")
    assert out.startswith("True"), out


def test_legacy_flags_stay_readable_inside_the_pass():
    # (a guard of the fix above, which passed before it)
    # Code that reads the legacy flags while the model runs (torch.compile's inductor does)
    # must still be able to, for a caller who never touched the new API.
    out = _run_py(_EVAL + """
seen = []
m[0].register_forward_hook(lambda *a: seen.append(
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
torch.backends.cuda.matmul.allow_tf32 = True
run("fp32")
print(set(seen), torch.backends.cuda.matmul.allow_tf32)
""")
    assert out == "{(False, False)} True"


# ---- Evaluator: variants that cannot be a model's weights ---------------------------------


def _tiny():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return m, [(x, y)]


@pytest.mark.parametrize("bad", [
    torch.ones(3, 4, dtype=torch.int64),
    torch.ones(3, 4, dtype=torch.bool),
    torch.ones(3, 4, dtype=torch.complex64),
    torch.ones(3, 4, device="meta"),
], ids=["int64", "bool", "complex64", "meta"])
def test_variant_tensor_of_a_kind_a_weight_cannot_hold_is_a_clear_error(bad):
    # Cast silently before (complex with torch's warning; meta: NotImplementedError from copy_),
    # though a checkpoint's integer/bool/complex tensor for a float weight is refused.
    from layerfast import Evaluator
    from layerfast.errors import LayerfastError

    m, data = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LayerfastError, match=r"variant 0 does not fit the model: .*0\.weight"):
        Evaluator(m, [{"0.weight": bad}], device="cpu").run(data)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_variant_float_dtypes_and_integer_buffers_are_still_accepted():
    # (a guard of the fix above, which passed before it): float64/float16 weights are cast, as
    # load_state_dict does, and a non-floating buffer (num_batches_tracked) takes any dtype.
    from layerfast import Evaluator

    m, data = _tiny()
    w = torch.randn(3, 4, dtype=torch.float64)
    res = Evaluator(m, [{"0.weight": w}, {"0.weight": w.half()},
                        {"1.num_batches_tracked": torch.tensor(2.0)}], device="cpu").run(data)
    assert res.n == 8


# ---- two threads --------------------------------------------------------------------------


def _flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_num_threads())


def _in_threads(*jobs) -> list:
    import threading

    errors: list = []

    def run(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_evaluators_in_two_threads_leave_the_tf32_flags_as_they_were():
    # The docs do not forbid threads. Each pass set the flags and restored what it had saved,
    # which in two threads was the other thread's setting: an fp32 and a bf16 pass left cuDNN's
    # TF32 off (or both on). They now run one after the other, with the same results.
    from layerfast import Evaluator

    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(100)]
    variants = [{}, {"2.bias": torch.zeros(3)}]
    alone = Evaluator(m1, variants, device="cpu", precision="fp32").run(data).counts
    before = _flags()
    got: dict = {}
    try:
        for _ in range(3):
            errors = _in_threads(
                lambda: got.update(a=Evaluator(m1, variants, device="cpu",
                                               precision="fp32").run(data).counts),
                lambda: Evaluator(m2, variants, device="cpu", precision="bf16").run(data))
            assert not errors
            assert _flags() == before
            assert torch.equal(got["a"], alone)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]



def test_evaluator_refuses_a_model_with_uninitialized_lazy_modules():
    # The pass materialised nn.LazyLinear's weight and the restore then put the empty
    # pre-materialisation tensor back into it: the model came back with a weight of shape [0]
    # (no longer lazy) and its next forward failed ("mat2 must be a matrix").
    from layerfast import Evaluator
    from layerfast.errors import LayerfastError

    m = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(LayerfastError, match=r"uninitialized lazy .*0\.weight.*run one forward"):
        Evaluator(m, [{}], device="cpu").run([(x, y)])
    assert m(x).shape == (8, 3)  # still lazy: its first forward gives it its shapes
    res = Evaluator(m, [{}], device="cpu").run([(x, y)])  # and then it can be evaluated
    assert res.n == 8 and m(x).shape == (8, 3)


# ---- Analysis.plot --------------------------------------------------------------------------


def tiny_result():
    """A three-row Analysis (baseline, one reinit, one rerandom) with distances, to plot."""
    import pandas as pd

    from layerfast.analysis import Analysis

    table = pd.DataFrame({
        "unit": ["*", "fc1", "fc1"], "kind": ["baseline", "reinit", "rerandom"],
        "checkpoint": pd.array([None, 0, None], dtype="Int64"),
        "seed": pd.array([None, None, 1], dtype="Int64"),
        "error": [0.1, 0.2, 0.9], "error_lo": [0.05, 0.1, 0.8], "error_hi": [0.2, 0.3, 0.95],
        "top5_error": [0.0, 0.0, 0.5], "loss": [0.3, 0.5, 2.3], "agreement": [1.0, 0.9, 0.1],
        "n": [100, 100, 100], "delta_error": [0.0, 0.1, 0.8],
        "verdict": ["", "critical", "critical"]})
    dist = pd.DataFrame({"unit": ["fc1", "fc1"], "checkpoint": ["1", "rerandom"],
                         "l2": [1.0, 2.0], "l2_rel": [0.1, 0.2], "linf": [0.5, 0.6]})
    return Analysis(table, dist, {"threshold": 0.05})


@pytest.mark.parametrize("kind", ["heatmap", "distances"])
def test_plot_writes_the_format_its_path_names(tmp_path, kind):
    # Always PNG before: res.plot("fig.pdf") wrote PNG bytes into a .pdf no reader opens.
    res = tiny_result()
    heads = {"pdf": b"%PDF", "svg": b"<?xml", "png": b"\x89PNG"}
    for suffix, head in heads.items():
        path = res.plot(tmp_path / f"fig.{suffix}", kind=kind)
        assert path.read_bytes()[:len(head)] == head, suffix
    assert res.plot(tmp_path / "fig", kind=kind).read_bytes()[:4] == b"\x89PNG"  # no suffix


def test_a_dict_batch_is_named_as_such():
    # A dict of two entries ({"image": x, "label": y}, as Hugging Face loaders give) unpacked
    # into its keys: "got (str, str) (numpy arrays: torch.from_numpy)", which misleads.
    from layerfast import Evaluator
    from layerfast.errors import LayerfastError

    m, data = _tiny()
    batches = [{"image": x, "label": y} for x, y in data]
    with pytest.raises(LayerfastError, match=r"got a dict \(keys 'image', 'label'\)"):
        Evaluator(m, [{}], device="cpu").run(batches)
