"""Behaviour of sessions 13-14 that no other test pinned down, found by mutation testing (each
test here fails with one small change to the code it names, and passes on the code as it is)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.graph import Program
from tests.engine.test_engine_hooks import UsesConstant, check, flipped


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


# ---- graph.attributes_kept: every clause of "comes back as it was" ----------------------------


class Fiddly(nn.Module):
    """A forward that changes its plain attributes in each way `attributes_kept` undoes."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 10)
        self.memo: dict = {}  # gains a tensor *key* only
        self.slots = {"a": torch.zeros(16)}  # same value moved to another key
        self.last = {"h": torch.zeros(16)}  # same key, another value
        self.pending: torch.Tensor | None = torch.zeros(16)  # a tensor set to None
        self.cleared = [torch.zeros(16)]  # a list of tensors emptied
        self.grown = [torch.zeros(16)]  # a list of tensors appended to
        self.once = torch.zeros(16)  # a tensor attribute deleted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        self.memo[h] = True
        if "a" in self.slots:
            self.slots["b"] = self.slots.pop("a")
        self.last["h"] = h
        self.pending = None
        self.cleared.clear()
        self.grown.append(h)
        if "once" in vars(self):
            del self.once
        return self.fc(h)


def test_every_change_a_forward_makes_to_its_attributes_is_undone() -> None:
    """Survived mutants of `_tensorish` (keys), `_same` (keys, identity), and the restore
    branches of `attributes_kept` (tensor -> None, emptied list, list refill, deleted attr)."""
    torch.manual_seed(0)
    m = Fiddly()
    before = {k: (v, list(v.items()) if isinstance(v, dict) else list(v)
                  if isinstance(v, list) else None) for k, v in vars(m).items()
              if k in ("memo", "slots", "last", "pending", "cleared", "grown", "once")}

    def unchanged() -> None:
        for k, (obj, items) in before.items():
            now = getattr(m, k, "gone")
            assert now is obj, k
            if isinstance(obj, dict):
                got = list(obj.items())
                assert len(got) == len(items), (k, got)
                assert all(a is c and b is d for (a, b), (c, d) in zip(got, items, strict=True)), k
            elif isinstance(obj, list):
                assert len(obj) == len(items) and all(
                    a is b for a, b in zip(obj, items, strict=True)), k

    Program(m)  # the trace
    unchanged()
    Evaluator(m, [{}, {"fc.bias": flipped(m.fc.bias)}], device="cpu", precision="fp32").run(
        [(torch.randn(8, 16), torch.arange(8))])  # a run
    unchanged()


# ---- graph: hooks, constants ------------------------------------------------------------------


def test_a_global_forward_pre_hook() -> None:
    """`global_hooks` must see pre-hooks too, not only forward hooks."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    calls: list[int] = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, i: calls.append(1))
    try:
        assert not Program(m).traced
    finally:
        handle.remove()
    assert Program(m).traced


def test_a_traced_constant_is_fetched_from_the_program() -> None:
    """The constant fx stored on the model is taken off it; the traced program reads it from
    `Program.constants` (without that it raised, and the run fell back to untraced)."""
    torch.manual_seed(0)
    m = UsesConstant()
    plan = check(m, [{"fc.weight": flipped(m.fc.weight)}])
    assert plan["untraced"] is None


class Encoder(nn.Module):
    """A leaf fx keeps as one call (TransformerEncoderLayer) whose child `linear1` carries a
    hook that gates by a parameter of the model: it runs inside the leaf's call."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        # a callable activation: no fast path, which would not call linear1 (nor run its hook)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                              activation=torch.tanh, batch_first=True)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 32))
        self.fc = nn.Linear(16, 10)
        self.enc.linear1.register_forward_hook(lambda mod, i, o: o * self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.inp(x).unsqueeze(1)).squeeze(1)  # (batch, seq 1, 16)
        return self.fc(h)


def test_a_hook_inside_a_leaf_module_keeps_the_trace_and_reads_every_key() -> None:
    """`_check_hooks_run` counts the children of a called leaf as run (the model stays traced),
    and `_mark_opaque` makes that leaf's step read every key (the gate variant was scored as
    the baseline)."""
    torch.manual_seed(0)
    m = Encoder().eval()
    prog = Program(m)
    assert prog.traced
    enc_step = next(s for s in prog.steps if s.op == "call_module" and s.target == "enc")
    assert prog.is_opaque(enc_step)
    plan = check(m, [{"gate": -torch.linspace(0.5, 2, 32)}, {"fc.bias": flipped(m.fc.bias)}])
    assert plan["untraced"] is None


# ---- store: the resume store's set-aside folder and its refusals -------------------------------


def _store(out: Path, fp: dict, fresh: bool = False):
    from layerfast.store import ResumeStore

    return ResumeStore(out, fp, 3, fresh)


def test_a_resumed_run_deletes_what_an_interrupted_run_set_aside(tmp_path: Path) -> None:
    """A run that takes over the out dir without --fresh drops `.layerfast-previous` (a later
    bad input must not put back a run older than the one it resumed); --fresh keeps it."""
    from layerfast.store import PREVIOUS

    fp = {"arch": "x", "seeds": [1]}
    _store(tmp_path, fp).close()
    aside = tmp_path / PREVIOUS
    aside.mkdir()
    (aside / "results.csv").write_text("old")
    _store(tmp_path, fp, fresh=True).close()
    assert (aside / "results.csv").read_text() == "old"
    _store(tmp_path, fp).close()
    assert not aside.exists()


def test_pass_layout_is_named_only_when_nothing_else_differs(tmp_path: Path) -> None:
    """`pass_layout` follows from the other keys: a refusal names it only when it alone differs,
    and then as the engine's plan, not as the user's arguments."""
    from layerfast.errors import LayerfastError

    _store(tmp_path, {"seeds": [1], "pass_layout": "a"}).close()
    with pytest.raises(LayerfastError) as exc:
        _store(tmp_path, {"seeds": [1, 2], "pass_layout": "b"})
    assert "(differs in: seeds);" in str(exc.value) and "planned" not in str(exc.value)
    with pytest.raises(LayerfastError) as exc:
        _store(tmp_path, {"seeds": [1], "pass_layout": "b"})
    msg = str(exc.value)
    assert "planned differently (differs in: pass_layout" in msg and "different arguments" not in msg


def test_restore_puts_a_set_aside_group_back_whole(tmp_path: Path) -> None:
    """A group set aside replaces what is there now *whole*: a WAL file of the interrupted run
    that existed before this one must not stay beside the restored database (SQLite would
    replay it into another run's store). Files of a group with nothing set aside are deleted
    only when this run created them."""
    from layerfast.store import PREVIOUS, STORE_FILES, restore

    aside = tmp_path / PREVIOUS
    aside.mkdir()
    (aside / "progress.sqlite").write_text("finished run")
    for name in ("progress.sqlite", "progress.sqlite-wal", "results.csv", "run.json"):
        (tmp_path / name).write_text("killed run")
    existed = {"progress.sqlite", "progress.sqlite-wal", "results.csv"}
    restore(tmp_path, (STORE_FILES, ("results.csv", "run.json")), existed)
    assert (tmp_path / "progress.sqlite").read_text() == "finished run"
    assert not (tmp_path / "progress.sqlite-wal").exists()
    assert (tmp_path / "results.csv").read_text() == "killed run"  # existed, nothing aside
    assert not (tmp_path / "run.json").exists()  # this run's
    assert not aside.exists()


def test_bad_input_closes_the_store_before_putting_files_back(tmp_path: Path) -> None:
    """`_removed_on_bad_input` closes the database (SQLite deletes the WAL by its name on close:
    closed after the restore, it would delete the restored run's) and keeps the lock."""
    from layerfast.analysis import _removed_on_bad_input
    from layerfast.errors import LayerfastError

    store = _store(tmp_path, {"seeds": [1]})
    try:
        with pytest.raises(LayerfastError), \
                _removed_on_bad_input(tmp_path, False, {"progress.sqlite"}, store):
            raise LayerfastError("bad input")
        assert store.db is None and store._lock is not None
    finally:
        store.close()


# ---- units: derived weights -------------------------------------------------------------------


def test_a_tensor_attribute_named_like_a_parameter_is_not_derived_without_a_pre_hook() -> None:
    """Only a forward pre-hook derives a weight: `gain` beside the parameter `gain_raw` on a
    module without one is a constant; with one, `gain` is derived from `gain_raw` (named
    `gain_...`), and `b` is not derived from `bias`."""
    from layerfast.units import derived_weights

    m = nn.Linear(4, 4)
    m.gain_raw = nn.Parameter(torch.ones(4))
    m.gain = torch.ones(4)
    m.b = torch.zeros(4)  # a prefix of `bias`, but not `b_...`
    assert derived_weights(m) == {}
    m.register_forward_pre_hook(lambda mod, args: None)
    assert derived_weights(m) == {"gain": ["gain_raw"]}


def test_only_floating_buffers_a_pre_hook_derives_from_join_the_unit() -> None:
    """A bool mask a user's pre-hook derives `weight` from is no state of the unit (units hold
    floating tensors); a float one is (pruning's `weight_mask`)."""
    from torch.nn.utils import prune

    from layerfast.units import make_units

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    prune.l1_unstructured(m[0], "weight", amount=0.3)
    prune.l1_unstructured(m[2], "weight", amount=0.3)
    m[2].weight_mask = m[2].weight_mask.bool()  # the buffer, as a bool tensor
    keys = {u.name: sorted(u.keys) for u in make_units(m)}
    assert keys["0"] == ["0.bias", "0.weight_mask", "0.weight_orig"]
    assert keys["2"] == ["2.bias", "2.weight_orig"]


def test_bad_input_leaves_the_lock_file_as_it_found_it(tmp_path: Path) -> None:
    """The lock file is one of the files a run writes: bad input in an out dir the run did not
    create deletes it when this run made it, and keeps it when it was there before."""
    from layerfast.analysis import _ours, _removed_on_bad_input
    from layerfast.errors import LayerfastError
    from layerfast.store import LOCKNAME

    for had_lock in (False, True):
        out = tmp_path / str(had_lock)
        out.mkdir()
        if had_lock:
            (out / LOCKNAME).write_text("")
        existed = _ours(out)
        store = _store(out, {"seeds": [1]})
        with pytest.raises(LayerfastError), _removed_on_bad_input(out, False, existed, store):
            raise LayerfastError("bad input")
        store.close()
        assert (out / LOCKNAME).exists() == had_lock, had_lock
        assert not (out / "progress.sqlite").exists()


# ---- plan: split_passes -----------------------------------------------------------------------


def test_split_passes_puts_a_group_into_the_first_pass_with_room() -> None:
    """First fit, not the last pass opened: unit c (3 bytes) goes back into pass 0 (6 used of
    10), which the last pass (6 used) would also take."""
    from layerfast.engine.plan import split_passes

    keys = [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})]
    assert split_passes(keys, [6, 6, 3], 10) == [[0, 2], [1]]
    # a group larger than the limit is cut, its pieces filling the first passes with room
    keys = [frozenset({"a"}), frozenset({"b"}), *[frozenset({"c"})] * 3]
    assert split_passes(keys, [6, 6, 4, 4, 4], 10) == [[0, 2], [1, 3], [4]]


# (a "CUDA error" raised as a plain RuntimeError: test_custom_arch_audit.py's device-error test)


# ---- models: input_dtype, _materialize --------------------------------------------------------


def test_input_dtype_reads_buffers_when_there_is_no_parameter() -> None:
    from layerfast.models import input_dtype

    m = nn.Module()
    m.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    assert input_dtype(m) == torch.float64
    assert input_dtype(nn.Module()) == torch.float32


def test_a_model_whose_only_lazy_tensors_are_buffers_is_materialized() -> None:
    """LazyBatchNorm1d(affine=False) has lazy buffers and no parameters; it gets its shapes
    from a forward in eval mode (its statistics untouched), and the model's mode comes back."""
    from torch.nn.parameter import is_lazy

    from layerfast.models import _materialize

    m = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d(affine=False), nn.Linear(8, 3))
    m.train()
    _materialize(m, "lazy", (4,))
    assert not any(is_lazy(b) for b in m.buffers())
    assert m[1].running_mean.shape == (8,) and torch.equal(m[1].running_mean, torch.zeros(8))
    assert m.training and m[1].training
