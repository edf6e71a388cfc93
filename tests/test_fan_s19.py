"""Fan-out refusals say why (session 19).

A group the proof (`fanout.prove_fan`) refuses carries a one-line reason naming the step, in
the plan summary (`fanout_refused`, beside `fanout_fallbacks`: run.json's engine.plan,
`layerfast bench --json`, scripts/bench_table.py): a slow run now says which group ran on the
swap path and why. Before, only groups whose fanned run raised were listed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import fan_plan, prove_fan
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate


def _variants(model: nn.Module, mods: list[str], n: int = 3, seed: int = 1) -> list[dict]:
    """`n` fresh draws (std 2× the live weights') of each module in `mods`, one unit each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for mod in mods:
        m = model.get_submodule(mod)
        for _ in range(n):
            ov = {}
            for k, t in m.named_parameters():
                ov[f"{mod}.{k}"] = torch.randn(t.shape, generator=g) * (t.std() * 2 + 0.1)
            out.append(ov)
    return out


# ---- what must still be refused, and with a reason -----------------------------------------


class Mixer(nn.Module):
    """conv -> `how` -> head; every `how` here moves or mixes the batch dim."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.how == "permute-batch":  # batch moved to dim 1
            h = h.permute(1, 0, 2, 3).permute(1, 0, 2, 3)
        elif self.how == "transpose-0":
            h = torch.transpose(h, 0, 1).transpose(0, 1)
        elif self.how == "t-method":  # [B, C] -> [C, B] -> [B, C]: not proven
            return self.fc(h.mean([2, 3]).t().t())
        elif self.how == "view-constant":  # the batch entry is a number: K·B rows meet
            b = 6
            h = h.view(b, -1).view(b, 4, 8, 8)
        elif self.how == "size0-arith":  # the batch size in arithmetic (K·B there)
            batchsize, c, hh, ww = h.size()
            h = h * (1.0 / batchsize)
        return self.fc(h.mean([2, 3]))


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("permute-batch", "permute"),
        ("transpose-0", "transpose"),
        ("t-method", ".t()"),
        ("view-constant", "view"),
        ("size0-arith", "size"),
    ],
)
def test_mixing_patterns_are_refused_with_a_reason(how: str, words: str) -> None:
    torch.manual_seed(0)
    model = Mixer(how).eval()
    prog = Program(model)
    keys = {"conv.weight", "conv.bias"}
    start = prog.start_cut(keys)
    why = prove_fan(prog, start, keys)
    assert isinstance(why, str) and words in why, why
    assert fan_plan(prog, start, keys) is None
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    variants = _variants(model, ["conv"])
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run([(x, y)])
    assert res.plan["fanned_variants"] == 0, res.plan
    (reason,) = res.plan["fanout_refused"].values()
    assert "conv" in reason and words in reason, reason
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])


def test_refusal_reason_in_run_json_engine_plan_and_bench_table(tmp_path) -> None:
    """The reason travels where `fanout_fallbacks` does: the plan summary (run.json's
    engine.plan, `bench --json`'s layerfast_plan) and scripts/bench_table.py's lines."""
    import importlib.util
    from pathlib import Path

    torch.manual_seed(0)
    model = Mixer("permute-batch").eval()
    variants = _variants(model, ["conv"])
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    ev = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True)
    plan = ev.run([(x, y)]).plan
    assert plan["fanout_refused"] and ev.last_plan.summary()["fanout_refused"] == plan[
        "fanout_refused"]
    spec = importlib.util.spec_from_file_location(
        "bench_table", Path(__file__).parents[1] / "scripts" / "bench_table.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    d = {"seconds": {"naive": 1.0, "layerfast": 0.5}, "variants": 3,
         "speedup_vs_naive": {"layerfast": 2.0}, "floor": {"seconds_measured_rate": 0.1},
         "times_floor": {"layerfast": 5.0}, "layerfast_plan": {**plan, "batch_size": 6}}
    lines = "\n".join(bt.rows(d, "case"))
    assert "FAN-OUT REFUSED" in lines and "permute" in lines, lines


def test_fanout_off_records_no_refusals() -> None:
    torch.manual_seed(0)
    model = Mixer("permute-batch").eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    res = Evaluator(model, _variants(model, ["conv"]), device="cpu", precision="fp32",
                    fanout=False).run([(x, y)])
    assert res.plan["fanout_refused"] == {}
