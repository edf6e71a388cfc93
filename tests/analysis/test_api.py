"""The Python API as a notebook uses it: side effects on global state, values a notebook holds
(numpy integers, one label), errors that must be `LayerfastError` (docs/internals.md:
"everything a user can get wrong raises LayerfastError") rather than a TypeError/AttributeError
from deep inside, and a rerun after the model's code was edited."""

from __future__ import annotations

import pytest
import torch

import layerfast
from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.models import get_arch
from layerfast.units import make_units
from layerfast.variants import make_variants


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """fcn1x16 for digits: θ⁰ and a perturbed τ=1 (no training needed for these checks)."""
    out = tmp_path_factory.mktemp("ckpts_s15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_arch("fcn1x16").build(10, (1, 8, 8))
        sd0 = {k: v.clone() for k, v in model.state_dict().items()}
        sd1 = {k: v + 0.1 * torch.randn_like(v) for k, v in sd0.items()}
    torch.save(sd0, out / "epoch_000.pt")
    torch.save(sd1, out / "epoch_001.pt")
    return out


def _analyze(ckpts, out, **kw):
    kw = {"data": "digits", "out": out, "progress": False, "figures": False, "device": "cpu",
          "max_samples": 64, **kw}
    return layerfast.analyze("fcn1x16", ckpts, **kw)


def test_analyze_leaves_global_rng_unchanged(small_ckpts, tmp_path):
    """analyze() builds the model from its factory, which draws an initialization from torch's
    global RNG: a notebook's `torch.manual_seed(0); analyze(...); torch.randn(3)` then differs
    from the same cell without analyze. train() already forks the RNG; analyze must too."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _analyze(small_ckpts, tmp_path / "a", reset="reinit")
    assert torch.equal(before, torch.get_rng_state())


def test_analyze_checkpoints_int_is_one_label(small_ckpts, tmp_path):
    """`checkpoints=1` (one label) raised TypeError: 'int' object is not iterable; 2.5 in a
    list was read as 2."""
    res = _analyze(small_ckpts, tmp_path / "b", reset="reinit", checkpoints=1)
    assert sorted(res.table["checkpoint"].dropna().unique().tolist()) == [1]
    with pytest.raises(LayerfastError, match=r"checkpoints must be integers; got 2\.5"):
        _analyze(small_ckpts, tmp_path / "b2", reset="reinit", checkpoints=[0, 2.5])


def test_analyze_float_seeds_is_a_layerfast_error(small_ckpts, tmp_path):
    """`seeds=2.5` raised TypeError: 'float' object is not iterable."""
    with pytest.raises(LayerfastError, match="seeds"):
        _analyze(small_ckpts, tmp_path / "c", seeds=2.5)
    with pytest.raises(LayerfastError, match=r"seeds must be integers; got 1\.5"):
        _analyze(small_ckpts, tmp_path / "c", seeds=[1, 1.5])  # was read as seed 1
    assert not (tmp_path / "c").exists()


def test_analyze_ckpts_list_is_a_layerfast_error(small_ckpts, tmp_path):
    """A notebook's dict of state dicts as `ckpts` raised TypeError from pathlib ("expected
    str, bytes or os.PathLike object, not dict"); it should say what ckpts must be. A dict
    {τ: state_dict} is accepted since session 19 (tests/analysis/test_inmem_s19.py); a list is not."""
    sd = CheckpointDir(small_ckpts).tensors(0)
    with pytest.raises(LayerfastError, match="ckpts must be the path of a checkpoint directory "
                                             r"or a mapping \{τ: state_dict\}; got a list"):
        _analyze([sd, sd], tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_analyze_threshold_string_message_is_not_misleading(small_ckpts, tmp_path):
    """`threshold="0.1"` said "--threshold must lie in [0, 1]; got 0.1": 0.1 does lie there.
    The message must say a number is needed."""
    with pytest.raises(LayerfastError) as info:
        _analyze(small_ckpts, tmp_path / "e", threshold="0.1")
    assert "number" in str(info.value)


def test_make_variants_seeds_count_like_analyze(small_ckpts):
    """analyze(seeds=3) means seeds 1..3; make_variants(seeds=3) raised TypeError."""
    ck = CheckpointDir(small_ckpts)
    model = get_arch("fcn1x16").build(10, (1, 8, 8))
    units = make_units(model)
    got = make_variants(model, units, ck, reset=("rerandom",), seeds=3)
    want = make_variants(model, units, ck, reset=("rerandom",), seeds=[1, 2, 3])
    assert [v.label for v in got] == [v.label for v in want]


def test_make_variants_dict_ckpts_is_a_layerfast_error(small_ckpts):
    """A dict of state dicts as `ckpts` raised AttributeError: 'dict' object has no attribute
    'labels'."""
    model = get_arch("fcn1x16").build(10, (1, 8, 8))
    sd = CheckpointDir(small_ckpts).tensors(0)
    with pytest.raises(LayerfastError, match="ckpts must be a CheckpointDir"):
        make_variants(model, make_units(model), {0: sd, 1: sd}, reset=("reinit",))


def test_evaluator_numpy_override_is_a_layerfast_error():
    """A numpy array in a variant raised TypeError from Tensor.copy_ in the middle of run()."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    ev = layerfast.Evaluator(model, [{"1.bias": torch.zeros(3).numpy()}], device="cpu")
    with pytest.raises(LayerfastError, match=r"variant 0 gives 1\.bias a ndarray, not a "
                                             r"torch\.Tensor \(numpy arrays: torch\.from_numpy\)"):
        ev.run([(x, y)])


def test_analysis_summary_takes_a_threshold(small_ckpts, tmp_path):
    """The CLI's `layerfast report OUT --threshold T` re-judges the printed summary;
    `report.summary(out, threshold=)` does, but `Analysis.summary()` takes no threshold."""
    res = _analyze(small_ckpts, tmp_path / "f", reset="reinit")
    assert "threshold 5 points" in res.summary() or "0.05" in res.summary()
    text = res.summary(threshold=0.5)
    assert "0.5" in text and text != res.summary()
    with pytest.raises(LayerfastError, match=r"--threshold must lie in \[0, 1\]; got 2"):
        res.summary(threshold=2)


_EDIT_KW = {"data": "digits", "progress": False, "figures": False, "device": "cpu",
            "reset": "reinit"}


def _write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    """(Re)write the importable module `name`, as a user editing their model file: the next
    import reads it anew (no stale bytecode, no cached module)."""
    import importlib
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{name}.py").write_text(source)
    sys.modules.pop(name, None)
    importlib.invalidate_caches()


def test_rerun_into_same_out_refuses_a_changed_model_definition(small_ckpts, tmp_path,
                                                                 monkeypatch):
    """The resume fingerprint holds the arch *name*, the checkpoint files and the data, not the
    model's definition. Edit the factory (ReLU -> Sigmoid: same state-dict keys) and rerun the
    same analyze into the same out: the finished run's counts came back as the new model's
    results ("evaluated": 0) — wrong numbers, silently; a half-finished run would have summed
    both models' counts. Expected: refused (a different model is a different command) or
    evaluated again."""

    def write(act: str) -> None:
        _write_module(tmp_path, monkeypatch, "edited_s15",
                      "from collections import OrderedDict\n"
                      "import torch.nn as nn\n"
                      "def net(num_classes=10, in_shape=(1, 8, 8)):\n"
                      "    return nn.Sequential(OrderedDict(flatten=nn.Flatten(),\n"
                      "        fc1=nn.Linear(64, 16), act=nn.{act}(),\n"
                      "        fc2=nn.Linear(16, num_classes)))\n".replace("{act}", act))

    kw = _EDIT_KW | {"out": tmp_path / "out"}
    write("ReLU")
    first = layerfast.analyze("edited_s15:net", small_ckpts, **kw)
    write("Sigmoid")
    fresh = layerfast.analyze("edited_s15:net", small_ckpts, **{**kw, "out": tmp_path / "o2"})
    assert not first.table["loss"].equals(fresh.table["loss"])  # the edit changes the results
    with pytest.raises(LayerfastError, match="a run of the same arch whose definition"):
        layerfast.analyze("edited_s15:net", small_ckpts, **kw)
    again = layerfast.analyze("edited_s15:net", small_ckpts, **{**kw, "fresh": True})
    assert again.table["loss"].tolist() == fresh.table["loss"].tolist()


def test_rerun_refuses_a_model_whose_forward_was_edited(small_ckpts, tmp_path, monkeypatch):
    """An edit only in a user class's forward (the module tree, so repr, stays the same) is
    another model too: the code of the model's own classes is part of its definition."""

    def write(act: str) -> None:
        _write_module(tmp_path, monkeypatch, "edited_fwd",
                      "import torch\n"
                      "import torch.nn as nn\n"
                      "class Net(nn.Module):\n"
                      "    def __init__(self, num_classes=10, in_shape=(1, 8, 8)):\n"
                      "        super().__init__()\n"
                      "        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, num_classes)\n"
                      "    def forward(self, x):\n"
                      f"        return self.fc2(torch.{act}(self.fc1(x.flatten(1))))\n")

    kw = _EDIT_KW | {"out": tmp_path / "out"}
    write("relu")
    layerfast.analyze("edited_fwd:Net", small_ckpts, **kw)
    assert layerfast.analyze("edited_fwd:Net", small_ckpts, **kw).run["engine"]["evaluated"] == 0
    write("sigmoid")
    with pytest.raises(LayerfastError, match="a run of the same arch whose definition"):
        layerfast.analyze("edited_fwd:Net", small_ckpts, **kw)


def test_a_class_without_a_file_is_known_by_its_code() -> None:
    """A class defined in a notebook cell has no source file: the code of its functions stands
    in for it (a module inspect cannot find, as a cell's)."""
    from torch import nn

    from layerfast.models.identity import definition_id

    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class B(A):
        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    class A2(A):
        def forward(self, x):
            return torch.relu(self.fc(x))

    for cls in (A, B, A2):
        cls.__module__, cls.__qualname__, cls.__name__ = "notebook_cell", "Cell", "Cell"
    assert definition_id(A()) != definition_id(B())  # the same repr, another forward
    assert definition_id(B()) != definition_id(A2())
    b, b2 = B(), B()
    assert definition_id(b) == definition_id(b2)
    b.fc = nn.Linear(3, 4)
    assert definition_id(b) != definition_id(b2)  # the structure (repr)


@pytest.mark.parametrize("option", ["batch_size", "max_samples", "seeds"])
def test_analyze_accepts_numpy_integers(small_ckpts, tmp_path, option):
    """Notebook values are often numpy scalars (`np.arange`, a DataFrame cell). `batch_size=
    np.int64(64)` was refused with "--batch-size must be a positive integer; got
    np.int64(64)" (it is one), `max_samples` likewise, and `seeds=np.int64(2)` raised
    TypeError: 'numpy.int64' object is not iterable."""
    np = pytest.importorskip("numpy")
    res = _analyze(small_ckpts, tmp_path / option, reset="reinit,rerandom",
                   **{option: np.int64(2 if option == "seeds" else 64)})
    assert len(res.table) > 1


def test_bench_run_leaves_global_rng_unchanged():
    """`layerfast.bench.run` (the only way to bench from Python: it takes an argparse
    Namespace) calls torch.manual_seed(0) and leaves the caller's RNG reseeded."""
    from layerfast import bench, cli

    ns = cli.parser().parse_args(["bench", "--arch", "fcn1x16", "--max-samples", "32",
                                  "--checkpoints", "2", "--seeds", "1", "--no-prefix-only",
                                  "--device", "cpu"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    bench.run(ns)
    assert torch.equal(before, torch.get_rng_state())


def test_a_failing_user_model_keeps_its_traceback():
    """A bug in the user's own forward becomes `LayerfastError("the model fails on ...: ValueError:
    boom")` raised `from None`: in a notebook the traceback into the user's forward (the line
    that failed) is gone, and the message is cut at 300 characters. The CLI prints only the
    message either way, so chaining (`from exc`) costs it nothing."""

    class Buggy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[0] == 3:  # a bug that the two-sample probe does not hit
                raise ValueError("boom")
            return self.fc(x.flatten(1))

    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    ev = layerfast.Evaluator(Buggy(), [{}], device="cpu", batch_size=2)
    with pytest.raises(LayerfastError) as info:
        ev.run([(x[:2], y[:2]), (x[2:], y[2:])])
    err = info.value
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    assert isinstance(cause, ValueError)


def test_list_units_takes_the_data_the_checkpoints_name(ckpts, small_ckpts):
    """`--list-units --ckpts DIR` read the manifest's data spec through a private helper in the
    CLI; `list_units(..., ckpts=)` does it for a Python caller too."""
    from layerfast.analysis import list_units

    got = list_units("fcn3x256", data=None, ckpts=ckpts)  # its manifest names digits
    assert [u.name for u in got] == [u.name for u in list_units("fcn3x256", "digits")]
    with pytest.raises(LayerfastError, match="manifest"):
        list_units("fcn1x16", data=None, ckpts=small_ckpts)  # no manifest, no data


def test_an_analysis_repr_is_one_short_line(small_ckpts, tmp_path):
    """`repr(Analysis)` was the dataclass's: all of run.json (4.7k characters for 3 layers)."""
    res = _analyze(small_ckpts, tmp_path / "r", reset="reinit")
    text = repr(res)
    assert text.startswith("Analysis(arch='fcn1x16', out=") and "rows=" in text
    assert len(text) < 200 and "\n" not in text


def test_integer_arrays_and_tensors_are_whole_numbers():
    """A 0-d integer array or tensor (what indexing a tensor gives) is a whole number; a
    one-element tensor of seeds is a list of one seed, not a count; floats and bools are not."""
    import numpy as np

    from layerfast.flags import _parse_checkpoints, _seed_list

    assert _seed_list(np.array(3)) == [1, 2, 3] and _seed_list(torch.tensor(2)) == [1, 2]
    assert _seed_list(torch.tensor([5])) == [5]
    assert _parse_checkpoints(torch.tensor([0, 1])) == [0, 1]
    for bad in (torch.tensor([0.5]), torch.tensor([True]), [np.float64(1.0)]):
        with pytest.raises(LayerfastError, match="must be integers"):
            _parse_checkpoints(bad)
