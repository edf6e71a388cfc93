"""Review of session 15's changes: the resume fingerprint's model definition, train's probe, the
Python API's random state, options and `_materialize`. Each test failed on d00c8be."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from layerfast.errors import LayerfastError
from layerfast.models.identity import definition_id

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, cwd: Path, seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{ROOT}{os.pathsep}{cwd}"}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


_NOTEBOOK_NET = '''
import torch
from torch import nn
from layerfast.models.identity import definition_id

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.mode = "relu"

    def forward(self, x):
        if self.mode in {"relu", "gelu", "silu", "tanh"}:
            x = torch.relu(x)
        return self.fc(x)

print(definition_id(Net()))
'''


def test_a_notebook_class_has_the_same_definition_in_every_process(tmp_path):
    """A class with no file (a notebook cell, `python -c`): its code's constants include a
    frozenset (`x in {"a", "b"}`), whose repr order follows the per-process string hash. The
    same notebook rerun in a new kernel was refused as 'definition changed'."""
    ids = {_py(_NOTEBOOK_NET, tmp_path, seed) for seed in ("1", "2", "3")}
    assert len(ids) == 1, ids


def test_a_notebook_helper_the_forward_calls_is_part_of_the_definition():
    """ReLU to Sigmoid in a helper the notebook's class calls (the docstring's own example, in
    a notebook): the class's code and the repr are unchanged, and the old results came back."""
    ns: dict = {"__name__": "__main__"}
    src = textwrap.dedent('''
        import torch
        from torch import nn
        def act(x):
            return torch.relu(x)
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)
            def forward(self, x):
                return self.fc(act(x))
        ''')
    main = sys.modules["__main__"]
    saved = getattr(main, "__file__", None)
    try:  # as in a notebook: __main__ has no file
        if saved is not None:
            del main.__file__
        exec(compile(src, "<cell>", "exec"), ns)
        before = definition_id(ns["Net"]())
        exec(compile("def act(x):\n    return torch.sigmoid(x)\n", "<cell>", "exec"), ns)
        after = definition_id(ns["Net"]())
    finally:
        if saved is not None:
            main.__file__ = saved
    assert before != after


def test_a_model_built_twice_has_one_definition(tmp_path, monkeypatch):
    """A module whose repr names a function (`fn=<function swish at 0x7f...>`): the address
    differs between builds and processes, so every rerun was refused."""
    (tmp_path / "s15_fnrepr.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        class Act(nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn
            def forward(self, x):
                return self.fn(x)
            def extra_repr(self):
                return f"fn={self.fn}"
        def make(num_classes=10, in_shape=None):
            def swish(x):
                return x * torch.sigmoid(x)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Act(swish),
                                 nn.Linear(8, num_classes))
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("s15_fnrepr")
    assert definition_id(mod.make()) == definition_id(mod.make())


def test_an_edit_to_the_factory_file_is_a_new_definition(tmp_path, monkeypatch):
    """`mynet.py:make` builds torch modules and a `Lambda` from a utility module: its own file
    holds none of the model's classes, so Lambda(torch.relu) -> Lambda(torch.sigmoid) there was
    not seen (the same repr, the same utility file)."""
    (tmp_path / "s15_util.py").write_text(textwrap.dedent('''
        from torch import nn
        class Lambda(nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn
            def forward(self, x):
                return self.fn(x)
        '''))
    net = tmp_path / "s15_net.py"
    src = textwrap.dedent('''
        import torch
        from torch import nn
        from s15_util import Lambda
        def make(num_classes=10, in_shape=None):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Lambda(torch.relu),
                                 nn.Linear(8, num_classes))
        ''')
    net.write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    from layerfast.models import build_model

    before = definition_id(build_model("s15_net:make", 10, (1, 8, 8))[0])
    net.write_text(src.replace("torch.relu", "torch.sigmoid"))
    sys.modules.pop("s15_net", None)
    importlib.invalidate_caches()
    after = definition_id(build_model("s15_net:make", 10, (1, 8, 8))[0])
    assert before != after


_SCRIPT = '''
import sys
import torch
from torch import nn
import layerfast

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

def make(num_classes=10, in_shape=None):
    return Net(num_classes)

if __name__ == "__main__":
    a = layerfast.analyze("__main__:make", "ck", data="digits", out="an", progress=False,
                          max_samples=40, threshold=THRESHOLD)
    print("ok")
'''


def test_a_script_rerun_at_another_threshold_re_judges_its_finished_run(tmp_path):
    """A script that defines its model and analyses it (`python script.py`, arch
    `__main__:make`): changing only the threshold in the script is the documented 're-judge a
    finished run without evaluating again'. The whole script file is the definition, so it
    was refused as 'definition changed'."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    for e in (0, 1):
        lin = nn.Linear(64, 10)
        torch.save({"fc.weight": lin.weight.data, "fc.bias": lin.bias.data}, ck / f"epoch_{e}.pt")
    script = tmp_path / "script.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for t in ("0.05", "0.1"):
        script.write_text(_SCRIPT.replace("THRESHOLD", t))
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-600:]


_TRAIN_MODELS = '''
import torch
from torch import nn


class Noisy(nn.Module):
    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


class TrainTuple(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(64, n)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return (y, y) if self.training else y


def noisy(num_classes=10, in_shape=None):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Noisy(), nn.ReLU(),
                         nn.Linear(16, num_classes))


def counter(num_classes=10, in_shape=None):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Counter(), nn.ReLU(),
                         nn.Linear(16, num_classes))


def traintuple(num_classes=10, in_shape=None):
    return TrainTuple(num_classes)
'''


@pytest.fixture
def train_models(tmp_path, monkeypatch):
    (tmp_path / "s15_tm.py").write_text(_TRAIN_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("s15_tm", None)
    return tmp_path


@pytest.mark.parametrize("arch", ["s15_tm:noisy", "s15_tm:counter"])
def test_train_probe_leaves_the_seeded_run_as_it_was(train_models, monkeypatch, arch):
    """The probe's eval forward (`build._num_outputs`) ran outside any fork_rng and without
    putting the state back: a model that draws in eval mode trained on another random stream
    than before the probe existed (same seed, other checkpoints), and one that counts its
    calls in a buffer saved a θ⁰ the probe had changed."""
    import layerfast.train as tr

    kw = dict(epochs=1, seed=3, device="cpu", batch_size=32, max_samples=120, progress=False)
    tr.train(arch, "digits", out=train_models / "a", **kw)
    monkeypatch.setattr(tr, "_probe", lambda *a, **k: None)
    tr.train(arch, "digits", out=train_models / "b", **kw)
    for f in ("epoch_000.pt", "epoch_001.pt"):
        a, b = torch.load(train_models / "a" / f), torch.load(train_models / "b" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_train_refuses_a_training_mode_tuple_before_writing(train_models):
    """A model whose training forward returns a tuple (torchvision's GoogLeNet / Inception v3
    with aux logits do): the probe only looked at the eval forward (and at a training forward
    only for batches of one), so epoch_000.pt and a 'complete: false' manifest were written
    before the error."""
    from layerfast.train import train

    out = train_models / "tt"
    with pytest.raises(LayerfastError, match="tuple"):
        train("s15_tm:traintuple", "digits", 1, out, device="cpu", batch_size=32,
              max_samples=120, progress=False)
    assert not out.exists()


def test_analyze_keeps_the_global_rng_for_a_model_that_draws_in_eval(train_models, tmp_path):
    """decisions.md: 'The Python API leaves torch's global random state as it was'. Only the
    build is forked: a model that draws in its forward (noise in eval mode) moves the caller's
    generator during the evaluation."""
    import layerfast
    from layerfast.train import train

    ck = tmp_path / "ck"
    train("s15_tm:noisy", "digits", 1, ck, device="cpu", max_samples=120, progress=False)
    torch.manual_seed(0)
    ref = torch.randn(3)
    torch.manual_seed(0)
    layerfast.analyze("s15_tm:noisy", ck, out=tmp_path / "an", progress=False, max_samples=40)
    assert torch.equal(torch.randn(3), ref)


@pytest.mark.parametrize("value", [np.array(3), torch.tensor(3)])
def test_a_zero_dim_array_as_seeds_is_a_layerfast_error(value):
    """options.integers: 'anything not iterable is one clear error'. A 0-d array or tensor
    claims to be iterable and raised a bare TypeError."""
    from layerfast.flags import _seed_list

    try:
        seeds = _seed_list(value)
    except LayerfastError:
        return
    assert seeds == [1, 2, 3]


def test_materialize_keeps_a_custom_train_overrides_state(tmp_path, monkeypatch):
    """A lazy model whose `train()` keeps other state in step with the mode: `_materialize` now
    sets the flags back directly, after `model.eval()` ran the override, so the model ends in
    training mode with its eval-mode state (the old `model.train(was)` ran the override)."""
    (tmp_path / "s15_lazy.py").write_text(textwrap.dedent('''
        from torch import nn
        class Net(nn.Module):
            def __init__(self, n=10):
                super().__init__()
                self.fc = nn.LazyLinear(n)
                self.noise_on = True
            def train(self, mode=True):
                super().train(mode)
                self.noise_on = mode
                return self
            def forward(self, x):
                return self.fc(x.flatten(1))
        def make(num_classes=10, in_shape=None):
            return Net(num_classes)
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from layerfast.models import build_model

    m, _ = build_model("s15_lazy:make", 10, (1, 8, 8))
    assert m.training and m.noise_on


def test_list_units_with_ckpts_reads_the_data_their_manifest_names(tmp_path, monkeypatch):
    """`list_units(arch, ckpts=DIR)`: the docstring says the data DIR's manifest.json names is
    used, 'else digits'; but `data` defaults to "digits", so from Python the manifest was never
    read (only the CLI, passing data=None, got it)."""
    import layerfast.data as data_mod
    from layerfast.analysis import list_units
    from layerfast.train import train

    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.random((40, 3, 4, 4), dtype=np.float32),
             y_train=rng.integers(0, 3, 40), x_test=rng.random((20, 3, 4, 4), dtype=np.float32),
             y_test=rng.integers(0, 3, 20))
    ck = tmp_path / "ck"
    train("fcn3x256", str(npz), 1, ck, device="cpu", progress=False)
    opened = []
    real = data_mod.open_data

    def spy(spec, *a, **k):
        opened.append(spec)
        return real(spec, *a, **k)

    monkeypatch.setattr(data_mod, "open_data", spy)
    list_units("fcn3x256", ckpts=ck)
    assert opened and str(npz) in str(opened[-1])


def test_final_as_a_numpy_integer_resumes_with_a_plain_int(tmp_path):
    """Counts take numpy integers now, but `final` went into the fingerprint as np.int64, which
    the JSON store writes as the string "1": the same run with final=1 was refused as 'a run
    with different arguments (differs in: final)'."""
    import layerfast
    from layerfast.train import train

    ck = tmp_path / "ck"
    train("fcn3x256", "digits", 1, ck, device="cpu", max_samples=60, progress=False)
    kw = dict(out=tmp_path / "an", progress=False, max_samples=32)
    layerfast.analyze("fcn3x256", ck, final=np.int64(1), **kw)
    layerfast.analyze("fcn3x256", ck, final=1, **kw)


def test_a_numpy_float32_threshold_is_a_number_in_run_json(tmp_path):
    """`threshold=np.float32(0.1)` passes the check (a numbers.Real) and run.json stored it as
    the string "0.1"."""
    import json

    import layerfast
    from layerfast.train import train

    ck = tmp_path / "ck"
    train("fcn3x256", "digits", 1, ck, device="cpu", max_samples=60, progress=False)
    layerfast.analyze("fcn3x256", ck, out=tmp_path / "an", progress=False, max_samples=32,
                      threshold=np.float32(0.1))
    run = json.loads((tmp_path / "an" / "run.json").read_text())
    assert isinstance(run["threshold"], float)


def test_a_model_whose_repr_fails_is_still_analysed(tmp_path, monkeypatch):
    """A user's `extra_repr` that raises (it reads an attribute set later) never ran before the
    fingerprint held `repr(model)`; now analyze dies with the AttributeError's traceback (exit 1,
    an internal error) where it used to analyse the model."""
    import layerfast

    (tmp_path / "s15_badrepr.py").write_text(textwrap.dedent('''
        from torch import nn
        class L(nn.Linear):
            def extra_repr(self):
                return f"note={self.note}"
        def make(num_classes=10, in_shape=None):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), L(16, 16),
                                 nn.ReLU(), nn.Linear(16, num_classes))
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("s15_badrepr")
    ck = tmp_path / "ck"
    ck.mkdir()
    for e in (0, 1):
        torch.save(mod.make().state_dict(), ck / f"epoch_{e}.pt")
    try:
        layerfast.analyze("s15_badrepr:make", ck, data="digits", out=tmp_path / "an",
                          progress=False, max_samples=32)
    except LayerfastError:
        pass  # a clear refusal would do too; a bare AttributeError is an internal error


def test_train_takes_a_numpy_integer_seed():
    """Counts and epochs take numpy integers; a numpy seed was refused as 'not an integer in
    -2**63..2**63-1, got np.int64(3)', which it is."""
    from layerfast.train import _check_seed

    _check_seed(np.int64(3))


def test_the_definition_is_the_code_that_runs_not_the_file_as_it_is_now(tmp_path, monkeypatch):
    """A notebook imported mynet.py, then the user edits the file (ReLU -> Sigmoid) without a
    reload: the model analysed is still the ReLU one (the cached module), but its fingerprint
    holds the Sigmoid file. After a kernel restart the Sigmoid model then matches that store and
    gets the ReLU model's results back (a resumed half-run sums both): the false acceptance the
    fingerprint was added against. The id must describe the code the model runs."""
    net = tmp_path / "s15_stale.py"
    src = textwrap.dedent('''
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self, n=10):
                super().__init__()
                self.fc = nn.Linear(64, n)
            def forward(self, x):
                return torch.relu(self.fc(x.flatten(1)))
        def make(num_classes=10, in_shape=None):
            return Net(num_classes)
        ''')
    net.write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("s15_stale", None)
    mod = importlib.import_module("s15_stale")
    before = definition_id(mod.make())
    net.write_text(src.replace("torch.relu", "torch.sigmoid"))  # edited, not re-imported
    assert definition_id(mod.make()) == before
