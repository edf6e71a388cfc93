"""Mutation testing of the session 19-20 safety checks (review round mut3): each test here
fails with one deliberate mutation of the check it names, that the existing tests let pass.

- effects: a higher-order operator's body reading a tensor past the trace (the `blind` flag);
- fan-out proof: a transpose of two negative dims (the lower one is checked), a split along
  the batch dim (its dim is the third argument, not the second), `F.layer_norm` over several
  dims, a floor division that broadcasts across ranks, an overridden module applied to a
  buffer, an in-place write into a shared value another step reads, `mean` over a list
  holding the batch dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.fanout import prove_fan
from layerfast.engine.graph import Program
from tests.engine.test_traceatk_s19 import _matches_naive
from tests.fanout.test_fanatk_s19 import _data, _not_fanned, _same_as_naive

# ---- effects: a torch.cond body reads another module's weight --------------------------------


class _CondBody(nn.Module):
    """Reads `other`'s weight only inside a `torch.cond` branch: the dispatch mode sees the
    higher-order operator, not the ops of its body."""

    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.refs = [other]  # a list, not a submodule: no key of the program's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.refs[0].weight
        h = torch.cond(x.sum() > -1e9, lambda t: t @ w.t(), lambda t: t - 1.0, (x,))
        return h + self.lin(x)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_read_only_inside_a_higher_order_operator_makes_its_step_opaque() -> None:
    """Without the `blind` mark the body ran past the mode, the read went unseen, and b's
    variants started from the cut after the gate, which the final b had computed."""
    torch.manual_seed(0)
    b = nn.Linear(64, 64)
    model = nn.Sequential(_CondBody(b), nn.ReLU(), b, nn.ReLU(), nn.Linear(64, 10)).eval()
    found = Program(model).unseen_effects(torch.randn(4, 64))
    assert found is not None and 1 in found[0] and 1 in found[1], found
    _matches_naive(model, ["0.lin", "2", "4"])


# ---- fan-out proof rules ----------------------------------------------------------------------


class _Mix(nn.Module):
    """lin -> `how` -> a head; each `how` mixes the K·B rows if fanned."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 1 if how == "floordiv" else 8)
        self.a = nn.Linear(8, 8)
        self.register_buffer("tok", torch.randn(1, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "transpose-neg":  # [B, 8] -> [8, B]: softmax over the samples
            h = h.transpose(-1, -2).softmax(-1).transpose(-1, -2)
        elif self.how == "chunk-method":  # the first half of the batch, twice side by side
            a, _ = h.chunk(2, 0)
            h = torch.cat([a, a], 1).view(h.size(0), -1)
        elif self.how == "chunk-function":
            a, _ = torch.chunk(h, 2, 0)
            h = torch.cat([a, a], 1).view(h.size(0), -1)
        elif self.how == "floordiv":  # [B, 1] // [B] -> [B, B]
            s = h.sum(1)
            return self.fc(x) * (h // (s * s + 1.0)).sum(1)[:, None]
        elif self.how == "layer-norm-2d":  # over [B, 8]: the batch too
            h = F.layer_norm(h, (6, 8))
        elif self.how == "unit-on-buffer":  # the unit applied to a [1, 8] buffer
            return self.fc((x[:, None] + self.lin(self.tok))[:, 0]) + self.fc(h)
        elif self.how == "shared-write":  # z is u: eager mode's write reaches z
            u = self.a(x)
            z = u
            u += h
            return self.fc(u) + self.fc(z)
        elif self.how == "mean-batch":  # [B, 8] -> [1, 8]
            h = h - h.mean([0], keepdim=True)
        return self.fc(h)


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("transpose-neg", "batch dim"),
        ("chunk-method", "batch dim"),
        ("chunk-function", "batch dim"),
        ("floordiv", "broadcast"),
        ("layer-norm-2d", "batch dim"),
        ("unit-on-buffer", "applied to a parameter or buffer"),
        ("shared-write", "in place"),
        ("mean-batch", "reduces over the batch dim"),
    ],
)
def test_a_pattern_mixing_the_batch_is_not_fanned_and_says_why(how: str, words: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(_Mix(how), "lin", _data())
    _not_fanned(plan, words)


@pytest.mark.parametrize(("how", "words"), [("chunk-method", "dim 0"), ("chunk-function", "dim 0"),
                                            ("mean-batch", "reduces over the batch dim"),
                                            ("unit-on-buffer", "parameter or buffer")])
def test_the_proof_itself_refuses(how: str, words: str) -> None:
    """Refused up front by the proof, not only at run time by a later shape check."""
    model = _Mix(how).eval()
    prog = Program(model)
    keys = {"lin.weight", "lin.bias"}
    why = prove_fan(prog, prog.start_cut(keys), keys)
    assert isinstance(why, str) and words in why, why


# ---- in-memory inputs: the content address holds the labels -----------------------------------


def test_the_same_state_dicts_under_other_labels_are_another_folder(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """{0: a, 3: b} and {0: a, 5: b} hold the same tensors: without the labels in the sha256
    they shared a folder, and the second run read epoch_0, epoch_3 and epoch_5 (a τ it was
    never given, and a final model it did not name)."""
    import tempfile

    from layerfast import inputs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = {"w": torch.zeros(2, 2)}
    b = {"w": torch.ones(2, 2)}
    xy = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    first, _, _ = inputs.materialise({0: a, 3: b}, xy, "test")
    second, _, _ = inputs.materialise({0: a, 5: b}, xy, "test")
    assert first != second
    assert sorted(p.name for p in second.iterdir()) == ["epoch_0.pt", "epoch_5.pt"]


def test_a_file_another_process_wrote_first_is_kept(tmp_path) -> None:
    """Of two processes writing the same content at once the first's file stays (its mtime is
    the first run's resume fingerprint): the hard link fails, and nothing replaces it."""
    from layerfast.inputs import _write_new

    path = tmp_path / "epoch_0.pt"

    def write(tmp) -> None:  # this process's copy, while another one's lands at `path`
        tmp.write_bytes(b"mine")
        path.write_bytes(b"theirs")

    _write_new(path, write)
    assert path.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0.pt"]  # no temporary left


def test_an_inputs_folder_of_another_user_is_refused(tmp_path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory at this user's content-address root that another user owns could hold
    weights planted at a predictable address: refused, not written into."""
    import os
    import tempfile

    from layerfast import inputs
    from layerfast.errors import LayerfastError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    other = os.getuid() + 1  # the folder made below is owned by the real uid, not this one
    (tmp_path / f"{inputs.ROOT}-{other}").mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: other)
    with pytest.raises(LayerfastError, match="not a directory of this user's"):
        inputs.root()



# ---- resume: the resumed pass's groups as the interrupted run left them -----------------------


def _fanned_fails_once(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> list[int]:
    """The first fanned chunk of the run raises `exc` (an out-of-memory error backs the
    group's K off; another error sends the group to the swap path); the K of every call."""
    import layerfast.engine.evaluator as evm

    real, seen = evm.run_fanned, []

    def run(prog, fan, x, stacks, K, *a, **k):
        seen.append(K)
        if len(seen) == 1:
            raise exc
        return real(prog, fan, x, stacks, K, *a, **k)

    monkeypatch.setattr(evm, "run_fanned", run)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("simulated"),
                                 RuntimeError("simulated failure of the fanned run")],
                         ids=["oom-back-off", "fallback"])
def test_a_resumed_pass_keeps_its_groups_back_off_and_fallback(ckpts, tmp_path,
                                                               monkeypatch, exc) -> None:
    """A group whose K an out-of-memory error lowered, or that fell back to the swap path,
    before the interrupt: the rerun goes on with that K / on the swap path (the saved
    groups), so results.csv and run.json's plan are the uninterrupted run's."""
    import layerfast
    from tests.analysis.test_resume2_s20 import (
        ARGS,
        _chunk_widths,
        _Crash,
        crash_after,
        same_record,
    )

    kw = {**ARGS, "reset": "reinit", "fanout": True}
    with monkeypatch.context() as m:
        _fanned_fails_once(m, exc)
        whole = _chunk_widths(m)
        layerfast.analyze("fcn3x256", ckpts, out=tmp_path / "whole", **kw)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fanned_fails_once(m, exc)
        before = _chunk_widths(m)
        crash_after(m, 3)
        with pytest.raises(_Crash):
            layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    with monkeypatch.context() as m:
        after = _chunk_widths(m)
        layerfast.analyze("fcn3x256", ckpts, out=out, **kw)
    assert before + after == whole, (before, after, whole)
    same_record(out, tmp_path / "whole")
