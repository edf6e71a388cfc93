"""Review of the first-batch cut/mixing check, definition_id and the train probe (s15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.errors import LayerfastError
from tests.engine.test_engine_batch_dim_zoo import BatchStats, SwappedHalves, _oom_once, _variants


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models."""


def _naive_or_error(model, batches, **kw) -> None:
    """Either the naive loop's counts or a LayerfastError; never other counts."""
    variants = _variants(model)
    want = naive_evaluate(model, variants, lambda: batches)
    try:
        got = Evaluator(model, variants, device="cpu", precision="fp32", **kw).run(batches).counts
    except LayerfastError:
        return
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]]), (got - want)[:, [0, 1, 3]]
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [1, 2, 4])
def test_a_batch_statistics_model_whose_first_batch_divides_four(monkeypatch, first) -> None:
    """The check repeats a first batch of n < 8 samples to 8 (`arange(8) % n`) and compares the
    first 4: when n divides 4 the 4 rows are the same multiset as the 8, the batch mean is the
    same, and the mixing goes unseen. A later out-of-memory back-off then cuts a 16-sample batch
    and silently returns other counts than the naive loop."""
    torch.manual_seed(0)
    model = BatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:first], y[:first]), (x[first:first + 16], y[first:first + 16])]
    fired = _oom_once(monkeypatch, lambda start, rows, keep: keep is not None and rows == 16)
    _naive_or_error(model, batches, fanout=False)
    assert fired["n"] == 1


def test_a_swapped_halves_cut_behind_a_two_sample_first_batch(monkeypatch) -> None:
    """Same blind spot for the permuted-rows cut: [0,1,0,1,0,1,0,1] with its halves swapped
    is itself, so the cut after `cat([q, p])` is kept; the swap path's back-off then scores
    one half's rows against the other half's labels."""
    torch.manual_seed(0)
    model = SwappedHalves().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    batches = [(x[:2], y[:2]), (x[2:18], y[2:18])]
    # (on 3 rows the model's halves are uneven and its output rows are permuted: found mixing,
    # every cut is dropped and variants start at the input, where the out-of-memory fires)
    fired = _oom_once(monkeypatch, lambda start, rows, keep: keep is None and rows == 16)
    _naive_or_error(model, batches, fanout=False)
    assert fired["n"] == 1


# ---- train._probe -------------------------------------------------------------------------


def _train_hash(tmp_path, name, arch, **kw) -> str:
    import hashlib

    from layerfast.train import train

    out = tmp_path / name
    args = dict(batch_size=32, progress=False, max_samples=256, device="cpu")
    train(arch, "digits", 1, out, **{**args, **kw})
    h = hashlib.sha256()
    for f in sorted(out.glob("epoch_*.pt")):
        sd = torch.load(f)
        for k in sorted(sd):
            h.update(k.encode() + sd[k].cpu().numpy().tobytes())
    return h.hexdigest()


class _Warm(nn.Module):
    """A warm-up counted in a non-persistent buffer (not in the state dict)."""

    def __init__(self, num_classes: int = 10, in_shape=(1, 8, 8)) -> None:
        super().__init__()
        n = int(torch.tensor(in_shape).prod())
        self.m = nn.Sequential(nn.Flatten(), nn.Linear(n, 32), nn.ReLU(), nn.Linear(32, num_classes))
        self.register_buffer("step", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.step += 1
        return self.m(x) * torch.clamp(self.step / 3, max=1.0)


class _Calls(_Warm):
    """The same counted in a plain attribute."""

    def __init__(self, num_classes: int = 10, in_shape=(1, 8, 8)) -> None:
        super().__init__(num_classes, in_shape)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.m(x) * min(1.0, self.calls / 3)


@pytest.mark.parametrize("factory", ["_Warm", "_Calls"])
def test_the_probe_leaves_state_outside_the_state_dict_as_it_was(tmp_path, monkeypatch,
                                                                  factory) -> None:
    """`_probe` puts back the state dict, the modes and torch's RNG, but a forward may also
    change a non-persistent buffer or a plain attribute: the seeded run then trains another
    model than the code before the probe (5b0b804) did."""
    import layerfast.train as T

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "probe_arch_s15.py").write_text(
        "from tests.engine.test_engine_identity_review import _Warm, _Calls\n")
    arch = f"probe_arch_s15:{factory}"
    with_probe = _train_hash(tmp_path, "a", arch)
    monkeypatch.setattr(T, "_probe", lambda *a, **k: None)
    without = _train_hash(tmp_path, "b", arch)
    assert with_probe == without


def test_a_batchnorm_model_whose_data_leaves_one_sample_over_trains(tmp_path) -> None:
    """257 samples in batches of 32: the training loop drops the lone last sample
    (`steps.pop()`), so no batch of one is ever trained on; the probe still tried one and
    refused the model ('cannot train on a batch of 1 sample'). 5b0b804 trained it."""
    (tmp_path / "bn_arch_s15.py").write_text(
        "import torch.nn as nn\n"
        "def bn(num_classes=10, in_shape=(1, 8, 8)):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32),\n"
        "                         nn.ReLU(), nn.Linear(32, num_classes))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        _train_hash(tmp_path, "o", "bn_arch_s15:bn", max_samples=257)
    finally:
        sys.path.remove(str(tmp_path))


def test_an_evaluator_reused_after_a_failed_first_run_keeps_its_cuts() -> None:
    """The first run's first batch did not fit the model (bad input: a LayerfastError, as it
    should be). `_settle_cuts` had found no size that runs, dropped every cut and still marked
    the check done (`_batch_dim = True`), so the same Evaluator, run again on good data, has
    no prefix sharing for good and never learns that the model mixes samples."""
    torch.manual_seed(0)
    model = BatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    good = [(x[:16], y[:16]), (x[16:], y[16:])]
    fresh = Evaluator(model, _variants(model), device="cpu", precision="fp32")
    fresh.run(good)
    ev = Evaluator(model, _variants(model), device="cpu", precision="fp32")
    with pytest.raises(LayerfastError, match="the model fails"):
        ev.run([(torch.randn(16, 13), y[:16])])
    ev.run(good)
    assert ev.last_plan.cuts == fresh.last_plan.cuts
    assert ev._mixes_samples == fresh._mixes_samples


# ---- models.identity.definition_id ------------------------------------------------------


def _id_of(tmp_path, name: str, files: dict[str, str]) -> str:
    """definition_id of `name.net` after writing `files` into a fresh package dir."""
    import importlib
    import sys

    from layerfast.models.identity import definition_id

    root = tmp_path / name
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sys.path.insert(0, str(root))
    try:
        for k in [k for k in sys.modules if k == "s15pkg" or k.startswith("s15pkg.")]:
            del sys.modules[k]
        mod = importlib.import_module("s15pkg.net")
        return definition_id(mod.net(), mod.net)
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "s15pkg" or k.startswith("s15pkg.")]:
            del sys.modules[k]


_NET = """
import torch, torch.nn as nn
from s15pkg import ops
MEAN = torch.tensor([{mean}])
CFG = {{"fn": torch.tanh, "scale": {scale}}}
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(ops.act(x.flatten(1) - MEAN)) * CFG["scale"]
def net(num_classes=3, in_shape=(4,)):
    return Net()
"""


@pytest.mark.parametrize("edit", ["helper-module", "global-tensor", "mixed-dict"])
def test_an_edit_the_forward_reads_through_a_module_or_a_tensor_is_another_model(
        tmp_path, edit) -> None:
    """The docstring's own example (ReLU to Sigmoid), in a helper module the forward calls as
    `ops.act(x)` (a module global is 'named only'), and normalisation constants in a global
    tensor (torch's own type: 'named only'), and a number in a global dict that also holds a
    function (not plain, so not read): the edited model got the same id, and a rerun resumed
    (`layerfast analyze` twice: 'all restored from progress.sqlite' after the scale went from
    2.0 to 300.0)."""
    ops = "import torch\ndef act(x):\n    return torch.{f}(x)\n"
    a = _id_of(tmp_path, "a", {"s15pkg/__init__.py": "", "s15pkg/ops.py": ops.format(f="relu"),
                               "s15pkg/net.py": _NET.format(mean="0.5", scale="2.0")})
    b = _id_of(tmp_path, "b", {
        "s15pkg/__init__.py": "",
        "s15pkg/ops.py": ops.format(f="sigmoid" if edit == "helper-module" else "relu"),
        "s15pkg/net.py": _NET.format(mean="0.25" if edit == "global-tensor" else "0.5",
                                     scale="3.0" if edit == "mixed-dict" else "2.0")})
    assert a != b


def test_a_large_web_of_helper_functions_does_not_crash_the_fingerprint(tmp_path) -> None:
    """`_Digest` follows references depth-first by recursion: 1000 helpers that refer to a few
    others each (a vendored library) raise RecursionError out of `analyze`."""
    import random

    rng = random.Random(0)
    n = 1000
    lines = ["import torch.nn as nn"]
    for i in range(n):
        refs = " if x is None else ".join(f"g{j}" for j in rng.sample(range(n), 3))
        lines.append(f"def g{i}(x):\n    return ({refs})")
    lines.append("def net(num_classes=3, in_shape=(4,)):\n    g0\n    return nn.Linear(4, 3)\n")
    _id_of(tmp_path, "w", {"s15pkg/__init__.py": "", "s15pkg/net.py": "\n".join(lines)})


class _Train4(nn.Module):
    """Its training forward needs 4 or more samples (in-batch hard negatives, say)."""

    def __init__(self, num_classes: int = 10, in_shape=(1, 8, 8)) -> None:
        super().__init__()
        n = int(torch.tensor(in_shape).prod())
        self.m = nn.Sequential(nn.Flatten(), nn.Linear(n, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.m(x)
        if self.training:
            torch.topk(out.sum(1), 4)
        return out


def test_the_probe_trains_on_the_smallest_batch_training_gives(tmp_path, monkeypatch) -> None:
    """256 samples in batches of 32: every training batch has 32 samples, but the probe ran
    the training forward on 2 and refused the model ('cannot train on a batch of 2 samples');
    5b0b804 trained it. The docstring says 'the smallest batch training will give it'."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "t4_arch_s15.py").write_text("from tests.engine.test_engine_identity_review import _Train4\n")
    _train_hash(tmp_path, "o", "t4_arch_s15:_Train4")
