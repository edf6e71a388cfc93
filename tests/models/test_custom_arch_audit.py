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
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast
from layerfast.checkpoints import CheckpointDir
from layerfast.engine import Evaluator
from layerfast.engine.fanout import fan_plan
from layerfast.engine.graph import Program
from layerfast.errors import LayerfastError
from layerfast.units import make_units
from layerfast.variants import make_variants


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


class Recorder(nn.Module):
    """Records (batch size, autocast on) of every call of its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 8), nn.Linear(8, 5)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x):
        if isinstance(x, torch.Tensor):  # not while fx traces it
            self.calls.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        return self.l2(torch.relu(self.l1(x.flatten(1))))


def test_the_trace_check_runs_in_fp32_on_a_slice_of_the_first_batch():
    """The check ran the whole first batch in the pass's precision: in bf16 a one-ulp kernel
    difference on a GPU would fail it and silently cost the pass its prefix sharing and
    fan-out. It runs once, in fp32, on the first VERIFY_SAMPLES samples."""
    from layerfast.engine.evaluator import VERIFY_SAMPLES

    torch.manual_seed(0)
    model = Recorder()
    variants = [{}, {"l2.weight": torch.randn(5, 8)}]
    batches = _data(200, (1, 1, 12), 5, 100)
    res = Evaluator(model, variants, device="cpu", precision="bf16").run(batches)
    assert "untraced" not in res.plan or not res.plan["untraced"], res.plan
    assert model.calls == [(min(100, VERIFY_SAMPLES), False)], model.calls


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


# ---- the sweep: architectures the registry does not know, every row against the naive loop ---

BYO_ARCH = '''
import math
import torch
import torch.nn.functional as F
from torch import nn


class Transformer(nn.Module):
    def __init__(self, num_classes=5, in_shape=(1, 1, 12)):
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.pos = nn.Parameter(torch.randn(1, in_shape[-1], 16) * 0.1)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        tok = (x.flatten(1) * 4 + 8).long().clamp(0, 15)
        return self.head(self.enc(self.emb(tok) + self.pos).mean(1))


class ViT(nn.Module):
    def __init__(self, num_classes=5, in_shape=(3, 8, 8)):
        super().__init__()
        self.patch = nn.Conv2d(in_shape[0], 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, 16) * 0.1)
        self.ln0 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ln1 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        y = self.ln0(h)
        a, _ = self.attn(y, y, y, need_weights=False)
        h = h + a
        h = h + self.mlp(self.ln1(h))
        return self.head(h[:, 0])


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(self.pool(x)))))


class NormConv(nn.Module):
    """GroupNorm, depthwise-separable, InstanceNorm, SE gating, Dropout, DenseNet concat,
    LayerNorm, a U-Net skip with torch.cat, ConvTranspose2d, AdaptiveAvgPool."""

    def __init__(self, num_classes=5, in_shape=(3, 8, 8)):
        super().__init__()
        c, hh, ww = in_shape
        self.stem = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.se = SE(8)
        self.drop = nn.Dropout(0.3)
        self.dense = nn.Conv2d(16, 8, 3, padding=1)
        self.ln = nn.LayerNorm([8, hh, ww])
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.fuse = nn.Conv2d(16, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.stem(x)
        h2 = self.drop(self.se(F.gelu(self.inorm(self.pw(self.dw(h))))))
        h3 = self.ln(self.dense(torch.cat([h, h2], 1)))
        u = self.up(F.relu(self.down(h3)))
        return self.fc(torch.flatten(self.pool(self.fuse(torch.cat([h3, u], dim=1))), 1))


class Functional(nn.Module):
    """F.linear on the root's own parameters, view(size(0), -1), in-place ReLU and +=, a
    buffer that is not a BN statistic."""

    def __init__(self, num_classes=5, in_shape=(3, 8, 8)):
        super().__init__()
        d = math.prod(in_shape)
        self.weight = nn.Parameter(torch.randn(32, d) / math.sqrt(d))
        self.bias = nn.Parameter(torch.zeros(32))
        self.l2 = nn.Linear(32, 32)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(32, num_classes)
        self.register_buffer("gain", torch.ones(32) * 1.5)

    def forward(self, x):
        h = self.act(F.linear(x.view(x.size(0), -1), self.weight, self.bias))
        y = self.l2(h)
        y += h
        return self.out(self.act(y) * self.gain)


class Tied(nn.Module):
    def __init__(self, num_classes=16, in_shape=(1, 1, 6)):
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.mix = nn.Linear(12, 12)
        self.dec = nn.Linear(12, 16)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        tok = (x.flatten(1) * 4 + 8).long().clamp(0, 15)
        return self.dec(torch.tanh(self.mix(self.emb(tok).mean(1))))


class Shared(nn.Module):
    """A conv called twice, ModuleDict and ModuleList iteration."""

    def __init__(self, num_classes=5, in_shape=(3, 8, 8)):
        super().__init__()
        self.stem = nn.Conv2d(in_shape[0], 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = F.relu(self.block(F.relu(self.block(F.relu(self.stem(x))))))
        v = h.mean((2, 3))
        v = sum(head(v) for head in self.heads.values())
        for layer in self.layers:
            v = F.relu(layer(v))
        return self.fc(v)


def mlp(num_classes=5, in_shape=(1, 1, 10)):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1], 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes))


class RNN(nn.Module):
    def __init__(self, num_classes=5, in_shape=(1, 1, 12), kind="lstm"):
        super().__init__()
        self.proj = nn.Linear(1, 8)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](8, 16, batch_first=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out, _ = self.rnn(self.proj(x.flatten(1).unsqueeze(-1)))
        return self.fc(out[:, -1])


def gru(num_classes=5, in_shape=(1, 1, 12)):
    return RNN(num_classes, in_shape, "gru")


class DataDependent(nn.Module):
    def __init__(self, num_classes=5, in_shape=(3, 8, 8)):
        super().__init__()
        self.c1 = nn.Conv2d(in_shape[0], 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h)) if h.mean() > 0 else -h
        return self.fc(h.mean((2, 3)))
'''

IMG, TAB = (3, 8, 8), (1, 1, 12)
# factory -> (sample shape, classes, unit configs, root parameters: no re-randomization)
SWEEP = {
    "Transformer": (TAB, 5, [{"granularity": "layer"}], True),
    "ViT": (IMG, 5, [{"granularity": "layer"}, {"granularity": "block"}], True),
    "NormConv": (
        IMG,
        5,
        [{"granularity": "layer"}, {"granularity": "stage", "bn": "separate"}],
        False,
    ),
    "Functional": (IMG, 5, [{"granularity": "block"}], True),
    "Tied": ((1, 1, 6), 16, [{"granularity": "layer"}], False),
    "Shared": (IMG, 5, [{"patterns": ["layers.*", "heads.a", "re:heads", "block"]}], False),
    "mlp": ((1, 1, 10), 5, [{"granularity": "layer", "bn": "keep"}], False),
    "RNN": (TAB, 5, [{"granularity": "layer"}], False),
    "gru": (TAB, 5, [{"granularity": "block"}], False),
    "DataDependent": (IMG, 5, [{"granularity": "layer"}], False),
}


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """The architectures as a user's module `byo_arch` on sys.path, as `--arch byo_arch:F`."""
    import importlib
    import sys

    d = tmp_path_factory.mktemp("byo")
    (d / "byo_arch.py").write_text(BYO_ARCH)
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("byo_arch"), d
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("byo_arch", None)


def _checkpoints(model: nn.Module, d, seed: int = 0) -> CheckpointDir:
    """τ = 0, 1, 2 as epoch_00τ.pt: the model's state dicts, weights perturbed between τ."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    for t in range(3):
        torch.save(m.state_dict(), d / f"epoch_{t:03d}.pt")
        with torch.no_grad():
            for k, v in list(m.named_parameters()) + list(m.named_buffers()):
                if v.is_floating_point():
                    v.add_(0.3 * torch.randn(v.shape, generator=g) * (v.std().nan_to_num(0) + 0.1))
                    if k.endswith("running_var"):
                        v.abs_().add_(0.1)
    return CheckpointDir(d)


def _sweep(byo, name: str, tmp_path) -> None:
    from layerfast.models import get_arch

    mod, _ = byo
    shape, classes, configs, root = SWEEP[name]
    spec = get_arch(f"byo_arch:{name}")
    torch.manual_seed(0)
    model = spec.build(classes, shape)
    ck = _checkpoints(model, tmp_path / name)
    model.load_state_dict(ck.tensors(ck.final), strict=False)
    batches = _data(24, shape, classes, 10)
    resets = ("reinit", "fullmodel") if root else ("reinit", "rerandom", "fullmodel")
    for cfg in configs:
        units = make_units(model, arch=spec, **cfg)
        variants = [v.overrides() for v in make_variants(model, units, ck, spec, reset=resets)]
        for fanout in (False, True):
            assert_matches(model, variants, batches, fanout, f"{name} {cfg}")


@pytest.mark.parametrize("name", list(SWEEP))
def test_custom_arch_matches_naive(byo, name, tmp_path):
    _sweep(byo, name, tmp_path)


def test_analyze_byo_arch_rows_match_naive(byo, tmp_path):
    """`layerfast.analyze(arch='byo_arch:NormConv', data='x.npz')`: every row of the table
    (error, top-5, loss, agreement) is the naive loop's."""
    from layerfast.models import get_arch

    mod, _ = byo
    torch.manual_seed(0)
    spec = get_arch("byo_arch:NormConv")
    model = spec.build(5, IMG)
    ck = _checkpoints(model, tmp_path / "ck")
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "x.npz",
        x=g.standard_normal((30, *IMG)).astype(np.float32),
        y=g.integers(0, 5, 30),
    )
    res = layerfast.analyze(
        "byo_arch:NormConv",
        tmp_path / "ck",
        data=str(tmp_path / "x.npz"),
        out=tmp_path / "out",
        device="cpu",
        precision="fp32",
        progress=False,
        figures=False,
        batch_size=16,
    )
    model.load_state_dict(ck.tensors(ck.final), strict=False)
    units = make_units(model, arch=spec)
    variants = make_variants(model, units, ck, spec)
    assert len(variants) == len(res.table)
    data = np.load(tmp_path / "x.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    counts, _ = naive(
        model, [v.overrides() for v in variants], [(x[:16], y[:16]), (x[16:], y[16:])]
    )
    n = len(y)
    t = res.table
    assert list(t["unit"]) == [v.unit for v in variants]
    np.testing.assert_array_equal(t["error"].to_numpy(), 1 - counts[:, 0].numpy() / n)
    np.testing.assert_array_equal(t["top5_error"].to_numpy(), 1 - counts[:, 1].numpy() / n)
    np.testing.assert_array_equal(t["agreement"].to_numpy(), counts[:, 3].numpy() / n)
    np.testing.assert_allclose(t["loss"].to_numpy(), counts[:, 2].numpy() / n, rtol=1e-6)


def test_rerandom_of_a_root_owned_parameter_is_refused_before_the_pass(byo, tmp_path):
    """A ViT's class token and position embedding belong to the model itself, which has no
    reset_parameters(): the default resets failed only when the pass first drew that unit,
    after the out dir and its resume store were made. Now refused by make_variants, up front;
    without rerandom the same analysis runs."""
    from layerfast.errors import LayerfastError
    from layerfast.models import get_arch

    torch.manual_seed(0)
    model = get_arch("byo_arch:ViT").build(5, IMG)
    _checkpoints(model, tmp_path / "ck")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=g.standard_normal((12, *IMG)).astype(np.float32),
             y=g.integers(0, 5, 12))  # fmt: skip
    args = {"data": str(tmp_path / "x.npz"), "device": "cpu", "progress": False,
            "figures": False}  # fmt: skip
    with pytest.raises(LayerfastError, match=r"cannot re-randomize module \(root\).*--reset"):
        layerfast.analyze("byo_arch:ViT", tmp_path / "ck", out=tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    res = layerfast.analyze("byo_arch:ViT", tmp_path / "ck", out=tmp_path / "ok",
                            reset="reinit,fullmodel", **args)  # fmt: skip
    assert len(res.table) > 1


MISFIT = """
import torch
from torch import nn


def F64(num_classes=5, in_shape=None):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, num_classes)).double()


def Wide(num_classes=5, in_shape=None):
    return nn.Sequential(nn.Flatten(), nn.Linear(99, num_classes))


class Picky(nn.Module):
    def __init__(self, num_classes=5, in_shape=None):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        if x.shape[0] == 4:
            raise ValueError("batch of 4 not supported")
        return self.l2(self.l1(x.flatten(1)).relu())


class Branchy(nn.Module):
    def __init__(self, num_classes=5, in_shape=None):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 8), nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.l1(x.flatten(1))
        if h.sum() > 1e9:  # data-dependent: fx cannot trace it
            h = h * 0
        return self.l2(h.relu())
"""


def _misfit(tmp_path, monkeypatch, factory: str, ck: str = "ck") -> dict:
    """`misfit:<factory>` importable, its checkpoints in tmp_path/ck and 12 random samples in
    x.npz; returns analyze()'s keywords for them."""
    from layerfast.models import get_arch

    if not (tmp_path / "misfit.py").exists():
        (tmp_path / "misfit.py").write_text(MISFIT)
        monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    _checkpoints(get_arch(f"misfit:{factory}").build(5, (1, 1, 12)), tmp_path / ck)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=g.standard_normal((12, 12)).astype(np.float32),
             y=g.integers(0, 5, 12))  # fmt: skip
    return {"data": str(tmp_path / "x.npz"), "device": "cpu", "progress": False,
            "figures": False, "reset": "reinit,fullmodel"}  # fmt: skip


def test_analyze_float64_model_and_a_model_that_does_not_fit_the_data(tmp_path, monkeypatch):
    """analyze() asked the model for its width with a float32 zero sample: a float64 model
    failed there with a RuntimeError (exit 1). A model that cannot take the data's samples at
    all is bad input: one LayerfastError, nothing written."""
    from layerfast.errors import LayerfastError

    args = _misfit(tmp_path, monkeypatch, "F64")
    res = layerfast.analyze("misfit:F64", tmp_path / "ck", out=tmp_path / "o", **args)
    assert len(res.table) == 1 + 2 * 3 + 3 and res.table["error"].notna().all()
    _misfit(tmp_path, monkeypatch, "Wide", ck="ck-wide")
    with pytest.raises(LayerfastError, match=r"does not run on this data's samples \(shape"):
        layerfast.analyze("misfit:Wide", tmp_path / "ck-wide", out=tmp_path / "w", **args)
    assert not (tmp_path / "w").exists()


def test_a_model_that_fails_on_a_later_batch_is_bad_input(tmp_path, monkeypatch):
    """A model that raised on the last (partial) batch was a traceback, exit 1, and left its
    store and lock in the out dir; it is bad input, as when it fails on the first batch."""
    from layerfast.cli import main

    args = _misfit(tmp_path, monkeypatch, "Picky")
    with pytest.raises(LayerfastError, match=r"the model fails on samples 8\.\.11 of the data "
                                             r"\(a batch of 4\): ValueError: batch of 4 not"):
        layerfast.analyze("misfit:Picky", tmp_path / "ck", out=tmp_path / "o", batch_size=8,
                          **args)
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()
    argv = ["analyze", "--arch", "misfit:Picky", "--ckpts", str(tmp_path / "ck"), "--data",
            args["data"], "--device", "cpu", "--batch-size", "8", "--out", str(tmp_path / "mine"),
            "--quiet"]
    assert main(argv) == 2
    assert list((tmp_path / "mine").iterdir()) == []
    res = layerfast.analyze("misfit:Picky", tmp_path / "ck", out=tmp_path / "p", batch_size=6,
                            **args)  # batches of 6 run
    assert res.table["n"].iloc[0] == 12


def test_a_model_that_fails_only_with_a_variants_tensors_is_bad_input() -> None:
    """A user's check in forward (finite activations, a weight range) that only a variant
    trips was a traceback, exit 1: the model's own forward ran with the baseline's tensors."""

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(self.lin.bias.sum()) > 100:
                raise ValueError("bias out of range")
            return self.lin(x)

    m = Guarded()
    bias = m.lin.bias.detach().clone()
    batches = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(LayerfastError, match=r"the model fails on samples 0\.\.3 of the data \(a "
                                             r"batch of 4\) with the tensors of variant 2: "
                                             r"ValueError: bias out of range"):
        Evaluator(m, [{}, {"lin.weight": torch.zeros(3, 4)}, {"lin.bias": torch.full((3,), 50.0)}],
                  device="cpu", precision="fp32").run(batches)
    assert torch.equal(m.lin.bias, bias)  # tried with the variant's tensors, then put back


def test_a_variants_failure_after_an_out_of_memory_back_off_is_still_bad_input() -> None:
    """After the pass backed off to pieces of 2 samples, the model's own forward on the whole
    batch runs out of memory too: the check that names the model's failure must try the pieces
    the pass could run, or a user's check that a variant trips is reported as our own error."""

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("simulated")
            if float(self.lin.bias.sum()) > 100:
                raise ValueError("bias out of range")
            return self.lin(x)

    batches = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    ev = Evaluator(Guarded(), [{}, {"lin.bias": torch.full((3,), 50.0)}], device="cpu",
                   precision="fp32")
    with pytest.raises(LayerfastError, match=r"samples 0\.\.3 of the data \(a batch of 4\) "
                                             r"with the tensors of variant 1: ValueError"):
        ev.run(batches)
    assert ev._rows == 2


@pytest.mark.parametrize("error", [torch.AcceleratorError, RuntimeError])
def test_a_device_error_in_the_pass_is_not_blamed_on_the_model(error) -> None:
    """A device left broken (a CUDA assert) fails any forward, the model's own check too: that
    is not the model's failure on that batch, and it stays an internal error. Older torch (and
    some kernels) raise it as a plain RuntimeError naming a "CUDA error"."""

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 2:
                raise error("CUDA error: device-side assert triggered")
            return self.lin(x)

    batches = [(torch.randn(n, 4), torch.zeros(n, dtype=torch.long)) for n in (4, 2)]
    with pytest.raises(error, match="CUDA error") as info:
        Evaluator(Broken(), [{}], device="cpu", precision="fp32").run(batches)
    assert not isinstance(info.value, LayerfastError)


def test_an_untraced_model_is_a_warning_kept_in_run_json(tmp_path, monkeypatch, capsys):
    """A model fx cannot trace runs as one opaque step: the results are exact but the pass
    is as slow as the naive loop. That was visible only deep in run.json's engine.plan; it is
    a warning now, on stderr and in run.json's "warnings"."""
    args = _misfit(tmp_path, monkeypatch, "Branchy")
    res = layerfast.analyze("misfit:Branchy", tmp_path / "ck", out=tmp_path / "o", **args)
    warned = json.loads((tmp_path / "o" / "run.json").read_text())["warnings"]
    assert res.run["engine"]["plan"]["untraced"]
    mine = [w for w in warned if w.startswith("the model ran untraced (")]
    assert len(mine) == 1 and "as slow as the naive loop" in mine[0]
    assert mine[0] in capsys.readouterr().err
    assert warned[1:] == mine  # after the chance note (random data: the model is at chance)
