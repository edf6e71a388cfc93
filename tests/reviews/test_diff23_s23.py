"""Review of session 23's changes (helper diff23): one test per defect found.

1. Tracing under a bf16 pass's autocast (ecb8192, to find a forward's own autocast regions) also
   ran the ops a trace evaluates for real, on constants, in bf16: a forward that builds a fixed
   matrix from constants (`mix = q @ q.T`) left a bfloat16 constant in the graph, the fp32
   first-batch check then failed on it ("expected m1 and m2 to have the same dtype"), and the
   pass ran untraced, without its prefix sharing, where it had been traced before. The program
   is now recorded with autocast off; a trace under the pass's autocast still looks for the
   forward's own regions, and for a path it takes only under autocast, which then runs
   untraced (its own forward) as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from tests.analysis.test_inmem_names_s23 import Net as _Net  # the README's notebook model


class ConstantMix(nn.Module):
    """A fixed 64×64 transform built in the forward from constants, then two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        mix = q @ q.T / 64  # traced for real: a constant of the graph
        h = F.relu(self.a(x.flatten(1))) @ mix
        return self.fc(F.relu(self.b(h)))


def _case(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[dict]]:
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 1, 8, 8, generator=g), torch.randint(0, 10, (200,), generator=g)
    variants = [{"b.weight": torch.randn(64, 64, generator=g) * 0.1},
                {"fc.weight": torch.randn(10, 64, generator=g) * 0.1}]
    return model, x, y, variants


def test_bf16_pass_keeps_the_trace_of_a_forward_with_matmul_constants() -> None:
    model, x, y, variants = _case(ConstantMix)
    res = Evaluator(model, variants, device="cpu", precision="bf16").run([(x, y)])
    assert res.precision == "bf16"
    assert res.plan["untraced"] is None, res.plan["untraced"]
    # the model's own forward under the same autocast, variant by variant (each in a region of
    # its own: a region kept across the in-place loads would serve the first variant's weight
    # casts to the next, under no_grad): the same counts (since s24's review the program reads
    # the pass's own bf16 product where the pass runs, tests/engine/test_autocast_attack_s24.py;
    # it read the fp32 one, and counts were off by a near-tie or two)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, v in enumerate(variants):
        model.load_state_dict(v, strict=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            correct = int((model(x).argmax(1) == y).sum())
        model.load_state_dict(state)
        assert float(res.counts[i, 0]) == correct


class AutocastPath(nn.Module):
    """A forward that takes a path of its own under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        if torch.is_autocast_enabled("cpu"):
            h = h * 2
        return self.fc(F.relu(self.b(h)))


def test_bf16_pass_runs_a_forward_with_an_autocast_path_as_its_own() -> None:
    """1b. The program recorded with autocast off must not run where the forward would take
    another path under the pass's autocast: that forward runs untraced, bit for bit its own."""
    model, x, y, variants = _case(AutocastPath)
    got: dict[int, torch.Tensor] = {}
    res = Evaluator(model, variants, device="cpu", precision="bf16").run(
        [(x, y)], on_logits=lambda rows, logits: got.update(zip(rows, logits, strict=True)))
    assert "autocast" in (res.plan["untraced"] or ""), res.plan["untraced"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, v in enumerate(variants):
        model.load_state_dict(v, strict=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # fresh weight cache
            ref = model(x)
        model.load_state_dict(state)
        assert torch.equal(got[i], ref), i


def test_a_bf16_models_floor_reads_the_bf16_datasheet_rate(monkeypatch) -> None:
    """2. The floor of a model built in bfloat16 timed its GEMM in bf16 (966ea8f) but still read
    the datasheet at the recorded precision, fp32: on an H100 a measured bf16 GEMM of several
    hundred TFLOP/s beside a "datasheet" peak of 66.9, and a datasheet floor ~15× the measured
    one. Both rates are now the bf16 ones."""
    import layerfast.engine.flops as flops
    from layerfast.engine.graph import Program
    from layerfast.engine.plan import make_plan

    asked: dict[str, list[str]] = {"gemm": [], "sheet": []}
    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5:
                        asked["gemm"].append(precision) or 5e14)
    monkeypatch.setattr(flops, "datasheet_rate", lambda device, precision:
                        asked["sheet"].append(precision) or 1e15)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    keysets = [{"1.weight"}, {"3.weight"}]
    for dtype, want in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model.to(dtype)
        plan = make_plan(Program(model), keysets, False, 1)
        flops.floor_report(model, plan, (1, 8, 8), 100, torch.device("cpu"), "fp32",
                           keysets=keysets)
        assert asked["gemm"][-1] == asked["sheet"][-1] == want, asked


def test_labels_beyond_the_checkpoints_classes_are_not_told_to_pass_num_classes(
        tmp_path, monkeypatch) -> None:
    """3. In-memory labels that run past the state dicts' classes (1-based labels, 1..10, for a
    10-class head) build an 11-class head; the error added "pass data=(x, y, num_classes) to
    build the head for the state dicts' class count" (b195da8), a fix that cannot work (10
    classes: label 10 is then out of range). The advice is for labels that miss the top class,
    where the head is built smaller than the state dicts'."""
    import tempfile

    import pytest

    import layerfast
    from layerfast.errors import LayerfastError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    states = {0: _Net().state_dict(), 1: _Net().state_dict()}
    x = torch.randn(40, 64)
    args = {"device": "cpu", "progress": False, "figures": False, "quiet": True}
    with pytest.raises(LayerfastError) as info:
        layerfast.analyze(_Net, states, data=(x, torch.arange(40) % 10 + 1), out=tmp_path / "a",
                          **args)
    msg = str(info.value)
    assert "built for 11 classes" in msg and "data (x, y)" in msg, msg
    assert "num_classes" not in msg, msg
    with pytest.raises(LayerfastError) as info:  # labels that miss class 9: the advice stays
        layerfast.analyze(_Net, states, data=(x, torch.arange(40) % 9), out=tmp_path / "b",
                          **args)
    assert "pass data=(x, y, num_classes)" in str(info.value), str(info.value)
