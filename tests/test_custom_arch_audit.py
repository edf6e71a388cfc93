"""Bring-your-own-architecture audit: models the registry does not know, through `--arch
package.module:factory`, `layerfast.analyze` and `layerfast.Evaluator`, against a naive loop
written here (load the final model, set the unit's tensors, full forward, count).

Each defect this audit found has a test below that failed before its fix; the broad sweep
(`test_custom_arch_matches_naive`) pins the architectures that already agreed: a Transformer
classifier (Embedding, positional Parameter on the root, TransformerEncoderLayer), a ViT-style
patch conv with a class token and MultiheadAttention, a conv net with GroupNorm, InstanceNorm,
LayerNorm, depthwise convs, squeeze-excite, DenseNet and U-Net concatenations, a functional
model (F.linear on root parameters, view(size(0), -1), in-place ReLU and +=), weight tying,
a module called twice, ModuleDict/ModuleList iteration, a tabular MLP, LSTM/GRU, and a model
with data-dependent control flow (not traceable: one opaque step).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanout import fan_plan
from layerfast.engine.graph import Program
from layerfast.errors import LayerfastError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and does not fight the other tests."""


# ---- the naive loop ------------------------------------------------------------------------


def naive(model: nn.Module, variants: list[dict], batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [V, 4] (correct@1, correct@5, summed CE, agreement) and logits [V, N, C] of the
    loop a user would write: a fresh copy of the final model per variant, its tensors set with
    load_state_dict(strict=False), every batch a fresh copy of the data (a forward may write
    into its input), full forward."""
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = [base(x.clone()).argmax(1) for x, _ in batches]
    counts = torch.zeros(len(variants), 4, dtype=torch.float64)
    logits = []
    for i, ov in enumerate(variants):
        m = copy.deepcopy(model).eval()
        m.load_state_dict(ov, strict=False)
        out = []
        with torch.no_grad():
            for j, (x, y) in enumerate(batches):
                lg = m(x.clone()).float()
                out.append(lg)
                p = lg.argmax(1)
                top5 = (lg > lg.gather(1, y[:, None])).sum(1) < 5 if lg.shape[1] >= 5 else p == y
                counts[i, 0] += (p == y).sum().item()
                counts[i, 1] += top5.sum().item()
                counts[i, 2] += F.cross_entropy(lg, y, reduction="sum").double().item()
                counts[i, 3] += (p == ref[j]).sum().item()
        logits.append(torch.cat(out))
    return counts, torch.stack(logits)


def engine(model: nn.Module, variants: list[dict], batches, **kw):
    """The Evaluator's counts and the logits it scored, per variant in data order."""
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, lg):
        for r, v in zip(rows, lg, strict=True):
            got.setdefault(r, []).append(v)

    kw = {
        "device": "cpu",
        "precision": "fp32",
        "layout": "contiguous",
        "batch_size": int(batches[0][0].shape[0]),
        **kw,
    }
    res = Evaluator(model, variants, **kw).run(batches, on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))])


def assert_matches(model, variants, batches, fanout: bool, what: str = "") -> dict:
    """fp32: swap path bit for bit; fanned to rounding (counts equal, loss ~1e-6 relative)."""
    ref, ref_logits = naive(model, variants, batches)
    res, got = engine(model, variants, batches, fanout=fanout)
    what = f"{what} fanout={fanout} plan={res.plan}"
    dl = (got - ref_logits).abs().max().item()
    if fanout:
        assert dl <= 1e-5 * max(ref_logits.abs().max().item(), 1.0), f"{what}: max |dlogit| {dl}"
    else:
        assert dl == 0, f"{what}: max |dlogit| {dl}"
    assert torch.equal(res.counts[:, [0, 1, 3]], ref[:, [0, 1, 3]]), what
    torch.testing.assert_close(res.counts[:, 2], ref[:, 2], rtol=1e-6, atol=1e-5)
    return res.plan


def _data(n: int, shape: tuple[int, ...], classes: int, bs: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


# ---- defect: an Ellipsis index that reaches the batch dim of a fanned value -------------------


class EllipsisPick(nn.Module):
    """`h1[..., 0]` on a 1-D value [B] is sample 0's value: the Ellipsis covers no dim. On a
    fanned K·B value it picked variant 0's sample 0 for every variant."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.c(x.flatten(1))
        return self.fc(h) + h[:, 0][..., 0] + h[..., 1:2]


def test_ellipsis_index_reaching_the_batch_dim_is_not_fanned():
    torch.manual_seed(0)
    model = EllipsisPick()
    variants = [{"c.weight": torch.randn(4, 6) * 3, "c.bias": torch.randn(4) * 3} for _ in range(3)]
    batches = _data(20, (1, 1, 6), 3, 8)
    for fanout in (False, True):
        plan = assert_matches(model, variants, batches, fanout, "ellipsis")
    # refused when it runs (the value's rank is known only then): the swap path, not a wrong sum
    assert plan["fanned_variants"] == 0 and plan["fanout_fallbacks"], plan
    # h[..., 1:2] on a [B, 4] value alone is per-sample and still fans
    prog = Program(model)
    keys = {"c.weight", "c.bias"}
    assert fan_plan(prog, prog.start_cut(keys), keys) is not None


# ---- defect: the baseline's forward wrote into the batch the variants then read -------------


class NormalizeInPlace(nn.Module):
    """Normalizes its input in place, as some research code does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.5))
        self.l1 = nn.Linear(12, 8)
        self.l2 = nn.Linear(8, 5)

    def forward(self, x):
        x.sub_(self.mean).mul_(2.0)
        return self.l2(torch.relu(self.l1(x.flatten(1))))


def test_a_forward_writing_into_its_input_does_not_change_the_batch():
    """Variants that start at the input (here: the buffer `mean`, read by the first step) ran on
    the batch the baseline had already normalized, so they normalized it twice."""
    torch.manual_seed(0)
    model = NormalizeInPlace()
    variants = [
        {"mean": torch.tensor(0.1)},
        {"l1.weight": torch.randn(8, 12)},
        {"mean": torch.tensor(0.2), "l1.bias": torch.randn(8)},
    ]
    batches = _data(16, (1, 1, 12), 5, 8)
    before = [x.clone() for x, _ in batches]
    for fanout in (False, True):
        assert_matches(model, variants, batches, fanout, "normalize in place")
    # and the caller's batches are not written into
    assert all(torch.equal(a, x) for a, (x, _) in zip(before, batches, strict=True))


# ---- defect: an untraceable model ran its in-place modules out of place ------------------------


class UntracedInPlace(nn.Module):
    """Data-dependent control flow (fx cannot trace it: one opaque step), and an in-place ReLU
    whose input is read again: eager mode adds relu(h) to relu(h), not to h."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 8)
        self.act = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(8, 5)

    def forward(self, x):
        h = self.l1(x.flatten(1))
        if h.sum() > -1e9:  # data-dependent
            x.mul_(2.0)  # and a write into the input
        y = self.act(h)
        return self.l2(h + y)


def test_untraceable_model_runs_its_in_place_modules_as_eager_mode_does():
    torch.manual_seed(0)
    model = UntracedInPlace()
    assert not Program(model).traced
    variants = [{"l2.weight": torch.randn(5, 8)}, {"l1.weight": torch.randn(8, 12)}]
    batches = _data(16, (1, 1, 12), 5, 8)
    for fanout in (False, True):
        assert_matches(model, variants, batches, fanout, "untraced in place")
    assert model.act.inplace is True  # handed back as it came


# ---- defect: an untraceable nn.Sequential subclass was run as its children in order ------------


class SequentialWithForward(nn.Sequential):
    """An nn.Sequential whose own forward is not its children in order (and not traceable)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        h = self[0](x)
        if h.mean() > -1e9:  # data-dependent
            h = -h
        return self[2](self[1](h))


def test_untraceable_sequential_subclass_runs_its_own_forward():
    torch.manual_seed(0)
    model = SequentialWithForward()
    variants = [{"2.weight": torch.randn(5, 8)}, {"0.weight": torch.randn(8, 12)}]
    batches = _data(16, (12,), 5, 8)
    for fanout in (False, True):
        assert_matches(model, variants, batches, fanout, "sequential subclass")


# ---- defect: the traced program was trusted to be the forward ---------------------------------


class IsTensorBranch(nn.Module):
    """While tracing `h` is a Proxy, so the traced program takes the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 8)
        self.l2 = nn.Linear(8, 5)
        self.alt = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.l1(x.flatten(1)))
        return self.l2(h) if isinstance(h, torch.Tensor) else self.alt(h)


class TupleUnwrap(nn.Module):
    """`isinstance(out, tuple)` on a GRU's output is False on a Proxy: `out[0]` is not traced,
    and the program then indexes the tuple like a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = self.rnn(self.proj(x.flatten(1).unsqueeze(-1)))
        if isinstance(out, tuple):
            out = out[0]
        return self.fc(out[:, -1])


class LogitsAttr(nn.Module):
    """`hasattr(out, "logits")` is True on a Proxy: the program reads `.logits` of a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 8)
        self.l2 = nn.Linear(8, 5)

    def forward(self, x):
        out = self.l2(torch.relu(self.l1(x.flatten(1))))
        return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("cls", [IsTensorBranch, TupleUnwrap, LogitsAttr])
def test_a_traced_program_that_is_not_the_forward_falls_back(cls):
    """IsTensorBranch gave wrong logits silently; the other two a traceback from the engine's
    interpreter. The traced program is now checked against the forward on the first batch."""
    torch.manual_seed(0)
    model = cls()
    assert Program(model).traced
    sd = model.state_dict()
    g = torch.Generator().manual_seed(2)
    variants = [{k: torch.randn(sd[k].shape, generator=g)} for k in sd if k.endswith("weight")]
    batches = _data(16, (1, 1, 12), 5, 8)
    for fanout in (False, True):
        plan = assert_matches(model, variants, batches, fanout, cls.__name__)
        assert plan["untraced"] and "traced program" in plan["untraced"], plan


# ---- defect: a float64 model failed in the scoring op -----------------------------------------


def test_float64_model_is_scored_like_the_naive_loop(tmp_path):
    """`score_` reads float32/16/bf16 logits: a float64 model raised a RuntimeError from the op
    (Evaluator on plain batches), and a DataSource fed it float32 data it could not take."""
    from layerfast.data import open_data

    torch.manual_seed(0)
    model = EllipsisPick().double()
    variants = [{"c.weight": torch.randn(4, 6, dtype=torch.float64)} for _ in range(2)]
    batches = [(x.double(), y) for x, y in _data(20, (1, 1, 6), 3, 8)]
    for fanout in (False, True):
        assert_matches(model, variants, batches, fanout, "float64")
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=g.standard_normal((20, 6)).astype(np.float32), y=g.integers(0, 3, 20)
    )
    src = open_data(str(tmp_path / "d.npz"))
    res = Evaluator(model, variants, device="cpu").run(src)
    x = torch.from_numpy(np.load(tmp_path / "d.npz")["x"]).double().view(20, 1, 1, 6)
    y = torch.from_numpy(np.load(tmp_path / "d.npz")["y"]).long()
    ref, _ = naive(model, variants, [(x, y)])
    assert torch.equal(res.counts[:, [0, 1, 3]], ref[:, [0, 1, 3]])


# ---- defect: malformed batches failed deep inside the pass ------------------------------------


@pytest.mark.parametrize("what", ["numpy", "triple", "dict", "list_y", "float_y", "y_2d"])
def test_malformed_batches_are_one_clear_error(what):
    torch.manual_seed(0)
    model = EllipsisPick()
    x, y = _data(8, (1, 1, 6), 3, 8)[0]
    batch = {
        "numpy": (x.numpy(), y.numpy()),
        "triple": (x, y, y),
        "dict": {"x": x, "y": y},
        "list_y": (x, y.tolist()),
        "float_y": (x, y.float() + 0.5),
        "y_2d": (x, y[:, None]),
    }[what]
    with pytest.raises(LayerfastError, match="batch|labels"):
        Evaluator(model, [{}], device="cpu").run([batch])
