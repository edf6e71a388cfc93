"""Fan-out allow-list additions (session 19), and the naive reference's copy of its input.

`h.reshape(h.shape[0], -1)` fans out as `h.reshape(h.size(0), -1)` does:
`v.shape` traces as `getattr(v, "shape")`, which was not on fan-out's allow-list, so the most
common way custom models flatten before their head ran every group on the swap path (exact,
slow). It is now read as `v.size()`: item 0 (K·B when fanned) only as a view/reshape's batch
entry, the other items freely; the shape used whole, item 0 in arithmetic, or a negative item
is refused, with the reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import prove_fan
from layerfast.engine.fanrun import GLUE_MODES
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate


class Flat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.how == "shape0":
            h = h.reshape(h.shape[0], -1)
        elif self.how == "shape-items":  # every item read, item 0 as the batch entry only
            n, c, hh, ww = h.shape
            h = h.view(n, c * hh * ww)
        elif self.how == "shape-arith":  # K·B when fanned: would scale by 1/K
            h = h.reshape(h.shape[0], -1) * (8.0 / h.shape[0])
        elif self.how == "shape-whole":  # the whole shape used
            h = (h + h.new_zeros(h.shape)).reshape(h.size(0), -1)
        elif self.how == "shape-neg":  # item -4 is the batch dim of a rank-4 value
            h = h.reshape(h.shape[-4], -1)
        return self.fc(h)


def _run(how: str) -> dict:
    torch.manual_seed(0)
    model = Flat(how).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    variants = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)} for _ in range(3)]
    x = torch.randn(7, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run(batches)
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    return res.plan


@pytest.mark.parametrize("how", ["shape0", "shape-items"])
def test_shape_item_zero_as_the_batch_entry_fans_and_matches_naive(how: str) -> None:
    plan = _run(how)
    assert plan["fanned_variants"] == 3 and plan["fanout_refused"] == {}, plan
    assert plan["fanout_fallbacks"] == {}, plan


@pytest.mark.parametrize(("how", "words"), [("shape-arith", "batch size"),
                                            ("shape-whole", "whole size"),
                                            # a negative item is checked against the rank
                                            # when it runs; as a batch entry, never proven
                                            ("shape-neg", "batch entry")])
def test_other_uses_of_the_shape_are_refused_with_a_reason(how: str, words: str) -> None:
    prog = Program(Flat(how).eval())
    keys = {"conv.weight"}
    why = prove_fan(prog, prog.start_cut(keys), keys)
    assert isinstance(why, str) and words in why, why
    plan = _run(how)
    assert plan["fanned_variants"] == 0, plan


class Mobile(nn.Module):
    """MobileNet-style functional activations: F.relu6, F.hardsigmoid, F.hardtanh, F.elu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu6(self.bn(self.conv(x)))
        h = h * torch.nn.functional.hardsigmoid(h) + torch.nn.functional.hardtanh(h, -0.5, 0.5)
        return self.fc(torch.nn.functional.elu(h).mean([2, 3]))


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_functional_mobilenet_activations_fan_and_match_naive(glue: str) -> None:
    """`F.relu6(bn(conv(x)))` stopped the group from fanning ("not on the allow-list"),
    though each is elementwise; the `nn.ReLU6` module was allowed."""
    torch.manual_seed(0)
    model = Mobile().eval()
    g = torch.Generator().manual_seed(1)
    variants = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)} for _ in range(3)]
    x = torch.randn(7, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True,
                    glue=glue).run([(x, y)])
    assert res.plan["fanned_variants"] == 3 and res.plan["fanout_refused"] == {}, res.plan
    assert res.plan["fanout_fallbacks"] == {}, res.plan
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)


def test_the_naive_reference_does_not_let_a_forward_change_the_batch() -> None:
    """A forward that writes into its input (`x.mul_(2)`) changed the batch that the naive
    loop's next variant read (on the CPU `x.to(device)` is `x` itself): the reference, and
    `layerfast bench`'s comparison, were then wrong while the engine was right."""

    class Doubles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mul_(2))

    torch.manual_seed(0)
    model = Doubles().eval()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    keep = x.clone()
    variants = [{}, {"fc.bias": torch.tensor([0.0, 5.0, 0.0])}, {}]
    got = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(x, keep)
    assert torch.equal(got[0], got[2])  # the same model on the same data: the same counts
    assert torch.equal(got[0, [0, 3]], torch.tensor([got[0, 0].item(), 16.0], dtype=got.dtype))


def test_a_fanned_output_without_k_times_b_rows_falls_back(monkeypatch) -> None:
    """`_run_chunk` reshaped the fanned logits to [K, B, C] after its fallback guard: an
    output of the right size but another layout (no model found today reaches it) would
    have been scored as garbage. It is now a fallback, with the reason, and exact."""
    from layerfast.engine import evaluator

    real = evaluator.run_fanned

    def flat(*a, **k):  # the right number of values, the batch dim gone
        return real(*a, **k).reshape(-1)

    monkeypatch.setattr(evaluator, "run_fanned", flat)
    torch.manual_seed(0)
    model = Flat("shape0").eval()
    g = torch.Generator().manual_seed(1)
    variants = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)} for _ in range(3)]
    x, y = torch.randn(7, 3, 8, 8, generator=g), torch.randint(0, 5, (7,), generator=g)
    res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True).run([(x, y)])
    (why,) = res.plan["fanout_fallbacks"].values()
    assert "NotPerSample" in why and "the fanned output has shape (105,)" in why, why
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])


@pytest.mark.parametrize("bad", ["x", 0, -0.5, 1.5, True, None, float("nan")])
def test_a_bad_memory_fraction_is_refused_up_front(bad) -> None:
    """`memory_fraction="x"` made the planner build a multi-GB string (`total * "x"`) and
    seemed to hang; 0 or a negative fraction silently ran K = 1."""
    from layerfast.errors import LayerfastError

    with pytest.raises(LayerfastError, match=r"memory_fraction must be a number in \(0, 1\]"):
        Evaluator(Flat("shape0"), [{}], device="cpu", memory_fraction=bad)


def test_the_effects_check_does_not_import_dynamo() -> None:
    """A TorchDispatchMode's `__torch_dispatch__` is wrapped by torch in `_disable_dynamo`,
    whose first call imports torch._dynamo: ~0.9 s once per process, which made a small
    `layerfast bench` setup 17x slower (0.06 -> 1.0 s for ResNet-20). The check's mode opts
    out; an evaluation with prefix sharing must not import dynamo at all."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from layerfast.models import build_model\n"
        "from layerfast.engine import Evaluator\n"
        "m, _ = build_model('resnet20', 10, (3, 32, 32)); m.eval()\n"
        "sd = m.state_dict()\n"
        "v = [{'fc.weight': sd['fc.weight'] + 1}, {'layer1.0.conv1.weight': sd['layer1.0.conv1.weight'] * 2}]\n"
        "r = Evaluator(m, v, device='cpu').run([(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))])\n"
        "assert r.plan['cuts_kept'] > 0, r.plan\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
