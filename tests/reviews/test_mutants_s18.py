"""Targeted mutation testing of the code changed in sessions 17-18 (review s18): each test
here fails under one small, realistic mutation of that code that no other test caught (named
in its docstring), and passes on the code as it is. CPU only, fast."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

from layerfast.errors import LayerfastError, collect_warnings

# ----------------------------------------------------------------------------- engine


def test_fanout_off_is_off_on_cuda_too() -> None:
    """Mutant: `"off"` mapped to None (auto). On the CPU auto is off too, so every CPU test
    passed; on CUDA `--fanout off` (the bit-exact swap path) would have fanned."""
    from layerfast.engine.evaluator import resolve_fanout

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert resolve_fanout("off", cuda) is False
    assert resolve_fanout(False, cuda) is False
    assert resolve_fanout("on", torch.device("cpu")) is True
    assert resolve_fanout("auto", cuda) is True and resolve_fanout(None, cuda) is True


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("bf16", True)])
def test_precision_modes_set_tf32_as_documented(precision: str, tf32: bool) -> None:
    """Mutant: bf16 left TF32 off (`tf32_allowed(precision == "tf32")`). bf16 is a CUDA speed
    mode: its float32 matmuls outside autocast run on TF32 tensor cores, and an fp32 pass
    never does (docs/decisions.md, exclusive.py)."""
    from layerfast.engine.precision import precision_context

    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with precision_context(precision, torch.device("cpu")):
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
        assert torch.backends.cudnn.conv.fp32_precision == ("tf32" if tf32 else "ieee")
    assert (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision) == before


def test_a_model_with_float32_weights_and_a_float64_buffer_stays_bf16() -> None:
    """Mutant: `for_model` tested `float64 in dtypes` instead of "all float64": a float32
    model holding one float64 buffer (a step counter, a mask) ran its float32 layers under
    bf16 autocast and was recorded as fp32, with a warning that said so."""
    from layerfast.engine.precision import for_model

    m = nn.Linear(4, 2)
    m.register_buffer("steps", torch.zeros((), dtype=torch.float64))
    with collect_warnings() as said:
        assert for_model("bf16", "bf16", m) == "bf16"
        assert for_model("tf32", "tf32", m) == "tf32"
        assert for_model("bf16", "bf16", m.double()) == "fp32"
    assert len(said) == 1 and "float64" in said[0]


def test_a_forward_that_returns_no_tensor_is_not_the_traced_programs_tensor() -> None:
    """Mutant: `differs` returned None (the same) whenever the forward's output is no tensor,
    also when the traced program's is one: the trace would be trusted for a forward that
    returns something else."""
    from layerfast.engine.verify import differs

    cpu = torch.device("cpu")
    t = torch.zeros(2, 3)
    assert differs(t, (t,), cpu) is not None
    assert differs((t,), (t,), cpu) is None
    assert differs(t, t.clone(), cpu) is None


class _Nudged(nn.Module):
    """A forward whose `isinstance(h, torch.Tensor)` branch fx cannot see (a Proxy while
    tracing): the traced program skips a scaling by 1 + 2^-20, a difference far inside any
    rounding tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if isinstance(h, torch.Tensor):
            h = h * (1 + 2**-20)
        return self.b(torch.relu(h))


def test_a_traced_program_off_by_rounding_is_not_taken_for_the_forward_on_the_cpu() -> None:
    """Mutant: the CPU trace check compared with the rounding tolerance (`_close`) instead of
    bit for bit. A traced program that is another function, off by less than the tolerance,
    was then run as the model: fp32 on the CPU no longer reproduced the naive loop's logits."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    m = _Nudged().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 12, generator=g), torch.randint(0, 5, (40,), generator=g)
    got: list[torch.Tensor] = []
    Evaluator(m, [{}], device="cpu", precision="fp32", fanout=False).run(
        [(x, y)], on_logits=lambda rows, lg: got.append(lg))
    with torch.no_grad():
        ref = m(x)
    assert torch.equal(got[0][0], ref)


class _Registers(nn.Module):
    """A forward that registers a buffer the first time it runs (from its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if "last" not in self._buffers:
            self.register_buffer("last", h.detach().sum())
        return h


def test_tracing_leaves_no_buffer_the_forward_registered_with_a_proxy() -> None:
    """Mutant: `_state_kept` kept what was registered while tracing. The model was left with
    the tracer's Proxy as a buffer (`m.last` a Proxy, in its state_dict)."""
    from layerfast.engine.tracing import trace

    m = _Registers()
    trace(m)
    assert "last" not in m._buffers
    with torch.no_grad():
        m(torch.zeros(1, 3))
    assert isinstance(m.last, torch.Tensor)


def test_tracing_restores_a_reassigned_buffer_of_a_submodule() -> None:
    """Mutant: `_state_kept` saved the top module's slots only. A call counter inside a
    submodule (`self.calls += 1`) kept the tracer's Proxy in its `_buffers`."""
    from layerfast.engine.tracing import trace
    from tests.models.test_fwd_s18 import CallCounter

    m = nn.Sequential(CallCounter())
    calls = m[0].calls
    trace(m)
    assert m[0]._buffers["calls"] is calls


# ----------------------------------------------------------------------------- options


def test_seeds_as_a_one_element_tensor_name_that_seed() -> None:
    """Mutant: `is_int` without its `ndim` check: `seeds=torch.tensor([5])` (a list of one
    seed) was read as the count 5, i.e. seeds 1..5."""
    from layerfast.flags import parse_flags

    assert parse_flags(seeds=torch.tensor([5])).seed_list == [5]
    assert parse_flags(seeds=torch.tensor(3)).seed_list == [1, 2, 3]


@pytest.mark.parametrize("reset", ["", " , ", []])
def test_a_reset_that_names_no_kind_is_refused(reset) -> None:
    """Mutant: the `--reset ''` guard dropped: an empty list of kinds went on, a run of the
    baseline alone with no error."""
    from layerfast.flags import parse_flags

    with pytest.raises(LayerfastError, match="names no kind"):
        parse_flags(reset=reset)


def test_a_refused_path_error_without_a_file_name_stays_an_oserror() -> None:
    """Mutant: `refused_paths_are_input` turned every EACCES into bad input, also one naming
    no file ("cannot access None: ...")."""
    from layerfast.errors import refused_paths_are_input

    @refused_paths_are_input
    def fails(exc: OSError) -> None:
        raise exc

    with pytest.raises(PermissionError):
        fails(PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(LayerfastError, match="cannot access /x/y"):
        fails(PermissionError(errno.EACCES, "Permission denied", "/x/y"))


# ----------------------------------------------------------------------------- train


def test_the_did_not_learn_warning_has_a_five_point_margin() -> None:
    """Mutant: the margin 0.05 -> 0.5. The test that trains checks a run at chance and one at
    3% error, both far from the edge."""
    from layerfast.train import _warn_if_at_chance

    for error, said in ((0.84, False), (0.86, True), (0.44, False), (None, False)):
        with collect_warnings() as w:
            _warn_if_at_chance(error, 10 if error != 0.44 else 2, 0.1)
        assert bool(w) is said, (error, w)
    with collect_warnings() as w:
        _warn_if_at_chance(0.46, 2, 0.1)
    assert w and "50.00% for 2 classes" in w[0]


def test_one_training_sample_is_one_step() -> None:
    """Mutant: the lone-sample drop without `len(steps) > 1`: a training set of one sample
    with batch size > 1 had no step at all (and `_probe`'s `min` over none raised)."""
    from layerfast.train import _batch_sizes

    assert _batch_sizes(1, 4) == [(0, 1)]
    assert _batch_sizes(5, 4) == [(0, 4)]
    assert _batch_sizes(6, 4) == [(0, 4), (4, 6)]


# ----------------------------------------------------------------------------- units


class _TiedLinear(nn.Module):
    """`out` ties both its weight and its bias to `mid`'s."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 10)
        self.mid = nn.Linear(10, 10)
        self.out = nn.Linear(10, 10)
        self.out.weight, self.out.bias = self.mid.weight, self.mid.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x.flatten(1))))))


def tied_net() -> nn.Module:
    """A `--arch tests.reviews.test_mutants_s18:tied_net` factory."""
    return _TiedLinear()


def test_two_units_tied_by_several_tensors_are_named_once() -> None:
    """Mutant: the `said` set dropped: a pair of units tying weight and bias got one
    sentence per tensor, the same warning twice."""
    from layerfast.units import make_units, tied_across_units

    m = _TiedLinear()
    lines = tied_across_units(m, make_units(m))
    assert len(lines) == 1 and "units mid and out share one tensor" in lines[0]


def test_analyze_warns_of_tied_units_in_run_json(tmp_path) -> None:
    """Mutant: analyze no longer called `tied_across_units` (its wiring was untested: only
    the function itself was)."""
    import layerfast

    ck = tmp_path / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    for t in range(2):
        torch.save(tied_net().state_dict(), ck / f"epoch_{t:03d}.pt")
    res = layerfast.analyze("tests.reviews.test_mutants_s18:tied_net", ck, data="digits", device="cpu",
                            reset="reinit", max_samples=16, out=tmp_path / "o", progress=False,
                            figures=False)
    said = [w for w in res.run["warnings"] if "share one tensor" in w]
    assert len(said) == 1 and "units mid and out" in said[0], res.run["warnings"]
    # custom units too: `--units mid,out` on tied embeddings resets the tensor in both rows
    res = layerfast.analyze("tests.reviews.test_mutants_s18:tied_net", ck, data="digits", device="cpu",
                            reset="reinit", max_samples=16, out=tmp_path / "o2", progress=False,
                            figures=False, units="mid,out")
    said = [w for w in res.run["warnings"] if "share one tensor" in w]
    assert len(said) == 1 and "units mid and out" in said[0], res.run["warnings"]


# ----------------------------------------------------------------------------- figures


def test_cut_labels_stay_distinct_and_within_the_limit() -> None:
    """Mutants: the loop that grows the kept parts until cut labels differ stopped at the
    first budget (two names differing only in the middle read the same: two heatmap rows
    with one label); the tail one character longer (91-character labels)."""
    from layerfast.report.tables import MAX_LABEL_CHARS
    from layerfast.report.tables import fit_labels as _fit_labels

    a = "m" * 100 + "A" + "z" * 100
    b = "m" * 100 + "B" + "z" * 100
    long = "x" * 300
    out = _fit_labels([a, b, long, "fc"])
    assert len(set(out)) == 4 and out[3] == "fc"
    assert len(_fit_labels([long, "fc"])[0]) == MAX_LABEL_CHARS
    assert all(len(r) <= MAX_LABEL_CHARS for r in _fit_labels(["y" * 200, "q" * 91]))


# ----------------------------------------------------------------------------- locks


def test_a_reacquired_lock_file_holds_only_this_pid(tmp_path) -> None:
    """Mutant: the lock file not truncated before the pid is written: opened in append mode,
    it grew pid after pid, and the refusal named a pid no process has."""
    from layerfast import store

    for _ in range(2):
        fh = store._acquire_lock(tmp_path)
        assert fh is not None
        assert (tmp_path / store.LOCKNAME).read_text() == str(os.getpid())
        fh.close()


def test_convert_deletes_only_its_own_temporaries(tmp_path) -> None:
    """Mutant: `pattern.search` for `pattern.fullmatch`: a user's file that merely contains a
    temporary's name (`backup.d.beton.abcdefgh.tmp`, `.d.beton.abcdefgh.tmp.keep`) was
    deleted by the next convert of d.beton."""
    from layerfast.data.beton import _lock_target, _unlock_target

    to = tmp_path / "d.beton"
    ours = tmp_path / ".d.beton.abcdefgh.tmp"
    theirs = [tmp_path / "backup.d.beton.abcdefgh.tmp", tmp_path / ".d.beton.abcdefgh.tmp.keep",
              tmp_path / "x.d.beton.abcdefgh.stage"]
    for p in [ours, *theirs]:
        p.write_bytes(b"x")
    lock = _lock_target(to)
    _unlock_target(to, lock)
    assert not ours.exists() and all(p.exists() for p in theirs)
