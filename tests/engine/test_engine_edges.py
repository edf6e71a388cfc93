"""Edge cases where the engine's program, cuts or fan-out once differed from the model's own
forward (audit C). Each model here is small; every test compares the Evaluator with the naive
loop: per variant, a deepcopy of the model, `load_state_dict(overrides, strict=False)`, eval,
full forward on the same batches.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from layerfast.engine import Evaluator
from layerfast.engine.fanout import fan_plan
from layerfast.engine.graph import Program, no_inplace_modules
from layerfast.errors import LayerfastError

N, BS = 21, 8  # a partial last batch


def _data(shape: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, *shape, generator=g), torch.randint(0, 10, (N,), generator=g)


def _naive(model: nn.Module, variants: list[dict], x: torch.Tensor) -> torch.Tensor:
    """[V, N, C]: each variant loaded into a fresh copy (or, where a model cannot be deep-copied
    — old-style weight_norm — into the model itself and restored), full forward per batch."""
    out = []
    for ov in variants:
        try:
            m, restore = copy.deepcopy(model).eval(), None
        except RuntimeError:
            m = model.eval()
            restore = {k: t.clone() for k, t in m.state_dict().items() if k in ov}
        m.load_state_dict(ov, strict=False)
        with torch.no_grad():
            out.append(torch.cat([m(x[i:i + BS]) for i in range(0, N, BS)]))
        if restore is not None:
            m.load_state_dict(restore, strict=False)
    return torch.stack(out)


def _engine(model: nn.Module, variants: list[dict], x: torch.Tensor, y: torch.Tensor, **kw):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    kw = {"device": "cpu", "precision": "fp32", "batch_size": BS, "layout": "contiguous", **kw}
    batches = [(x[i:i + BS], y[i:i + BS]) for i in range(0, N, BS)]
    res = Evaluator(model, variants, **kw).run(batches, on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))])


def _check(model: nn.Module, variants: list[dict], shape: tuple[int, ...], exact: bool = False,
           **kw):
    """Engine logits equal the naive loop's (bit for bit with `exact`, else to fp32 rounding)."""
    x, y = _data(shape)
    ref = _naive(model, variants, x)
    res, got = _engine(model, variants, x, y, **kw)
    if exact:
        assert torch.equal(got, ref), (got - ref).abs().max()
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    return res


def _draws(model: nn.Module, keys: list[str], K: int, scale: float = 0.5, seed: int = 0) -> list[dict]:
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    return [{k: sd[k] + torch.randn(sd[k].shape, generator=g) * scale for k in keys}
            for _ in range(K)]


# ---- 1. tied parameters ----------------------------------------------------------------------


class Tied(nn.Module):
    """`b.weight = a.weight`; `reverse`: b (named second) reads the shared weight first."""

    def __init__(self, reverse: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(16, 10)
        self.reverse = reverse

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        first, second = (self.b, self.a) if self.reverse else (self.a, self.b)
        h = torch.tanh(second(torch.tanh(first(h))))
        return self.fc(h)


@pytest.mark.parametrize("reverse", [True, False], ids=["b_first", "a_first"])
@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fanout"])
def test_tied_weight_variant_reaches_both_modules(reverse, fanout):
    torch.manual_seed(0)
    model = Tied(reverse).eval()
    variants = _draws(model, ["a.weight"], 3) + _draws(model, ["a.bias"], 2, seed=1)
    res = _check(model, variants, (12,), exact=not fanout, fanout=fanout)
    assert not res.plan["fanout_fallbacks"]


def test_tied_weight_keys_are_canonical_and_never_fanned():
    model = Tied(True).eval()
    prog = Program(model)
    assert prog.canonical_key("b.weight") == "a.weight"
    assert prog.canonical_key("a.weight") == "a.weight" and prog.tied("b.weight")
    assert not prog.tied("b.bias")
    # both modules read the shared weight; b runs first, so the variant starts before it
    readers = {s.target for s in prog.steps if "a.weight" in s.keys}
    assert readers == {"a", "b"}
    first_b = next(s.index for s in prog.steps if s.target == "b")
    assert prog.start_cut({"a.weight"}) < first_b
    assert prog.start_cut({"b.weight"}) == prog.start_cut({"a.weight"})
    assert fan_plan(prog, prog.start_cut({"a.weight"}), {"a.weight"}) is None


def test_tied_weight_alias_key_is_accepted():
    torch.manual_seed(0)
    model = Tied(True).eval()
    variants = [{"b.weight": v["a.weight"]} for v in _draws(model, ["a.weight"], 2)]
    _check(model, variants, (12,), exact=True, fanout=False)
    both = [{"a.weight": v["a.weight"], "b.weight": v["a.weight"]} for v in _draws(model, ["a.weight"], 2)]
    _check(model, both, (12,), exact=True, fanout=True)
    clash = {"a.weight": both[0]["a.weight"], "b.weight": both[1]["a.weight"]}
    with pytest.raises(LayerfastError, match=r"^variant 0 gives a.weight and b.weight, one tied "
                       r"tensor in the model, two different values: was the checkpoint saved"):
        Evaluator(model, [clash], device="cpu").run([(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))])


def test_a_checkpoint_untying_a_tied_weight_names_the_files(tmp_path):
    """A checkpoint whose two names of one tied tensor differ (saved untied): refused when the
    variants are made, before any evaluation (session 20: `CheckpointDir._check_ties`; a
    reinit-only run used to go through), naming each file and the two names. The Evaluator's
    own check, for variants given directly, is the test above."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.units import make_units
    from layerfast.variants import make_variants

    torch.manual_seed(0)
    model = Tied(False).eval()
    for tau in (0, 1):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["b.weight"] = torch.randn(16, 16)  # b's own weight, as an untied model would save
        torch.save(sd, tmp_path / f"epoch_{tau}.pt")
    for reset in ("fullmodel", "reinit"):
        with pytest.raises(LayerfastError, match=r"^checkpoints hold two different values for "
                           r"one tied tensor of the model: epoch_0.pt: a.weight and b.weight \| "
                           r"epoch_1.pt: a.weight and b.weight"):
            make_variants(model, make_units(model), CheckpointDir(tmp_path), reset=reset)


# ---- 2. fused BN -> add -> ReLU with an in-place write between --------------------------------


class InplaceSkip(nn.Module):
    """The add's other operand changes in place after the BN, before the add."""

    def __init__(self, fanned_skip: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        self.fanned_skip = fanned_skip

    def forward(self, x):
        x = self.stem(x)
        s = self.side(x) if self.fanned_skip else x
        a = self.bn(self.conv(x))
        if self.fanned_skip:
            s.mul_(-1.0)
        else:
            s.relu_()
        y = F.relu(a + s)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("glue", ["fused", "fold", "unfolded"])
@pytest.mark.parametrize("fanned_skip", [False, True], ids=["shared_skip", "fanned_skip"])
def test_fused_glue_sees_inplace_write_to_skip(glue, fanned_skip):
    torch.manual_seed(0)
    model = InplaceSkip(fanned_skip).eval()
    keys = ["conv.weight"] + (["side.weight"] if fanned_skip else [])
    _check(model, _draws(model, keys, 3, scale=0.3), (3, 8, 8), fanout=True, glue=glue)


# ---- 5. in-place torch functions -------------------------------------------------------------


class InplaceFn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.fn = fn

    def forward(self, x):
        h = self.c1(x)  # a cut: h is the only live value
        g = self.fn(h)  # writes into h
        out = self.c2(g) + h
        return self.fc(out.mean((2, 3)))


def _setitem(h):
    h[:, :2] = 0.0
    return h


@pytest.mark.parametrize("fn", [torch.sigmoid_, torch.tanh_, F.relu_, lambda h: F.relu(h, True),
                                lambda h: F.leaky_relu(h, 0.1, True),
                                lambda h: torch.clamp_(h, min=0.1), _setitem],
                         ids=["sigmoid_", "tanh_", "F.relu_", "relu_positional",
                              "leaky_relu_positional", "clamp_", "setitem"])
def test_inplace_functions_do_not_corrupt_the_cached_cut(fn):
    torch.manual_seed(0)
    model = InplaceFn(fn).eval()
    prog = Program(model)
    assert prog.traced and prog.has_inplace
    _check(model, _draws(model, ["c2.bias"], 2) + _draws(model, ["fc.weight"], 1), (3, 8, 8),
           exact=True, fanout=False)


# ---- 9. tuple-valued steps are never a cut's carrier -----------------------------------------


class ChunkNet(nn.Module):
    def __init__(self, method: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 10)
        self.method = method

    def forward(self, x):
        h = self.c1(x)
        a, b = h.split(4, dim=1) if self.method else torch.chunk(h, 2, dim=1)
        x = torch.cat((F.relu(a), torch.sigmoid(self.c2(b))), 1)
        return self.fc(x.amax((2, 3)))


@pytest.mark.parametrize("method", [False, True], ids=["torch.chunk", "Tensor.split"])
def test_tuple_values_are_not_cut_carriers(method):
    torch.manual_seed(0)
    model = ChunkNet(method).eval()
    prog = Program(model)
    saved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        prog.run(torch.randn(2, 3, 8, 8), 0, keep=set(prog.cuts), saved=saved)
    assert saved and all(isinstance(v, torch.Tensor) for v in saved.values())
    for fanout in (False, True):
        _check(model, _draws(model, ["c2.bias"], 2) + _draws(model, ["c1.weight"], 2), (3, 8, 8),
               exact=not fanout, fanout=fanout)


# ---- 10. `x += y` with an alias of x ---------------------------------------------------------


class IaddAlias(nn.Module):
    def __init__(self, sub: bool = False) -> None:
        super().__init__()
        self.sub = sub
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.f = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        z = x  # an alias: eager mode's `x +=` below changes z too
        if self.sub:
            x -= self.bn(self.f(x))
        else:
            x += self.bn(self.f(x))
        x = F.relu(x) + z
        x = x + self.g(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_augmented_assignment_is_traced_in_place():
    prog = Program(IaddAlias().eval())
    assert any(s.target is operator.iadd for s in prog.steps)
    assert prog.has_inplace  # it writes into a value that is read again


@pytest.mark.parametrize("sub", [False, True], ids=["+=", "-="])
@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fanout"])
def test_augmented_assignment_on_an_alias_equals_eager(fanout, sub):
    torch.manual_seed(0)
    model = IaddAlias(sub).eval()
    variants = _draws(model, ["f.bias"], 2) + _draws(model, ["f.weight"], 2, scale=0.2) + \
        _draws(model, ["g.weight"], 2, scale=0.2)
    _check(model, variants, (3, 8, 8), exact=not fanout, fanout=fanout)


class InplaceReluAlias(nn.Module):
    """`ReLU(inplace=True)` whose input is read again: eager mode adds relu(h) to itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.c(self.stem(x))
        y = self.act(h)
        return self.fc((y + h).mean((2, 3)))


@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fanout"])
def test_inplace_module_whose_input_is_read_again_stays_in_place(fanout):
    torch.manual_seed(0)
    model = InplaceReluAlias().eval()
    _check(model, _draws(model, ["c.weight"], 2, scale=0.3) + _draws(model, ["stem.bias"], 2),
           (3, 8, 8), exact=not fanout, fanout=fanout)
    assert model.act.inplace is True


def test_resnet_keeps_no_inplace_and_out_of_place_relus():
    """torchvision's `out += identity` writes into a value only the add reads, and its ReLUs'
    inputs are read once: no clone of the cached cuts is needed, and the ReLUs run out of place."""
    from layerfast.models import build_model

    model, _ = build_model("resnet18", 10, (3, 16, 16))
    model.eval()
    with no_inplace_modules(model):
        prog = Program(model)
    assert any(s.target is operator.iadd for s in prog.steps)
    assert not prog.has_inplace and not prog.keep_inplace


# ---- 11. negative dims that are the batch dim ------------------------------------------------


class NegDim(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.dim = dim

    def forward(self, x):
        x = self.fc(F.relu(self.c1(x)).mean((2, 3)))
        return F.log_softmax(x, dim=self.dim) + x


@pytest.mark.parametrize("dim", [-2, -1])
def test_negative_dim_is_resolved_by_rank(dim):
    torch.manual_seed(0)
    model = NegDim(dim).eval()
    res = _check(model, _draws(model, ["fc.weight"], 3), (3, 8, 8), fanout=True)
    if dim == -1:  # the class dim: still fanned
        assert res.plan["fanned_variants"] == 3 and not res.plan["fanout_fallbacks"]
    else:  # the batch dim: mixing the K variants' samples, so the swap path runs them
        assert res.plan["fanned_variants"] == 0


# ---- 7. modules that fan-out would not call --------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


def _hooked(kind: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    m = _net()
    if kind == "parametrization":
        weight_norm(m[2])
        assert parametrize.is_parametrized(m[2])
        return m, [k for k in m.state_dict() if k.startswith("2.parametrizations")]
    if kind == "old_weight_norm":
        torch.nn.utils.weight_norm(m[2])
        return m, ["2.weight_g", "2.weight_v"]
    if kind == "forward_hook":
        m[2].register_forward_hook(lambda mod, inp, out: out * 3.0)
    elif kind == "forward_pre_hook":
        m[2].register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,))
    elif kind == "shared_bn_hook":
        m[3].register_forward_hook(lambda mod, inp, out: out - 1.0)
    return m, ["2.weight"]


@pytest.mark.parametrize("kind", ["parametrization", "old_weight_norm", "forward_hook",
                                  "forward_pre_hook", "shared_bn_hook"])
def test_hooked_or_parametrized_modules_are_not_fanned(kind):
    model, keys = _hooked(kind)
    res = _check(model, _draws(model, keys, 3, scale=0.3), (3, 8, 8), fanout=True)
    assert res.plan["fanned_variants"] == 0


def test_global_forward_hook_disables_fanout():
    model, keys = _hooked("none")
    handle = _module.register_module_forward_hook(
        lambda mod, inp, out: out * 2.0 if isinstance(mod, nn.Conv2d) else None)
    try:
        res = _check(model, _draws(model, keys, 3, scale=0.3), (3, 8, 8), fanout=True)
    finally:
        handle.remove()
    assert res.plan["fanned_variants"] == 0
    res = _check(model, _draws(model, keys, 3, scale=0.3), (3, 8, 8), fanout=True)
    assert res.plan["fanned_variants"] == 3  # and fanned again once it is gone


# ---- a Sequential that fx cannot trace, with a module registered twice -----------------------


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2.0 if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it


def test_untraceable_sequential_calls_a_repeated_module_each_time():
    torch.manual_seed(0)
    lin = nn.Linear(10, 10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), _Branchy(), lin, nn.Tanh(), lin).eval()
    prog = Program(model)
    assert not prog.traced
    assert [s.target for s in prog.steps if s.op == "call_module"] == ["0", "1", "2", "3", "4", "5"]
    _check(model, _draws(model, ["3.weight"], 2) + _draws(model, ["1.bias"], 1), (12,),
           exact=True, fanout=False)


# ---- the baseline shortcut -----------------------------------------------------------------
def test_only_variants_equal_to_the_live_tensors_are_scored_as_the_baseline():
    """A variant whose tensors equal the live ones is scored from the baseline's logits, not
    computed (reinit to the final τ; analyze's bit-for-bit invariant rests on it). Any other
    variant, however close, must be computed: one weight one ulp away, a BN buffer alone, a
    float64 copy of a weight (equal values: the shortcut is right there). Every row equals the
    naive loop's, which runs each variant's full forward."""
    from layerfast.engine import naive_evaluate

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    ulp = live["4.weight"].clone()
    ulp.view(-1)[7] = torch.nextafter(ulp.view(-1)[7], torch.tensor(1.0))
    variants = [
        {"4.weight": live["4.weight"].clone()},  # 0: equal -> the baseline
        {"0.weight": live["0.weight"].double()},  # 1: equal values in float64 -> the baseline
        {"4.weight": ulp},  # 2: one ulp off -> computed
        {"1.running_var": live["1.running_var"] * 4},  # 3: a buffer alone -> computed
        {"0.weight": live["0.weight"], "0.bias": live["0.bias"] + 1},  # 4: one of two -> computed
    ]
    x = torch.randn(40, 3, 6, 6)
    y = torch.randint(0, 10, (40,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)]
    ref = naive_evaluate(model, variants, lambda: batches)
    for fanout in (False, True):
        ev = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=16,
                       fanout=fanout)
        res = ev.run(batches)
        assert sorted(ev.last_plan.same_as_baseline) == [0, 1]
        assert torch.equal(res.counts[:, [0, 1, 3]], ref[:, [0, 1, 3]]), (fanout, res.counts, ref)
        assert torch.allclose(res.counts[:, 2], ref[:, 2], rtol=1e-6)
    assert res.counts[3, 2] != res.counts[0, 2]  # the buffer variant did change the logits
