"""Fan-out allow-list additions (session 20): common per-sample forms that sent their groups
to the swap path, each proven to fan and to equal the naive loop in every glue mode (and
channels_last where 4-D), with the adversarial edges of each (a negative dim reaching the
batch dim of a low-rank value, an operand that broadcasts across the batch, an in-place write
into a shared value) refused with a reason or matching the naive loop.

0. A 0-d value shared by the K variants (`h * x.sum()`, `h / x.norm()`): the same number for
   every variant, a per-call constant. Tiling it K times raised `IndexError` in
   `layout.expand`, so the group fell back to the swap path with an unclear reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.fanrun import GLUE_MODES
from tests.fanout.test_fanatk_s19 import _data, _not_fanned, _same_as_naive


def _fans(plan: dict) -> None:
    assert plan["fanned_variants"] > 0 and not plan["fanout_fallbacks"], plan
    assert not plan["fanout_refused"], plan


# ---- 0. a 0-d shared value -----------------------------------------------------------------


class ZeroDim(nn.Module):
    """`how`: a 0-d value computed from the shared input, combined with the fanned `h`."""

    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how, self.conv = how, conv
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "mul-sum":
            h = h * x.sum()
        elif self.how == "div-norm":
            h = h / x.norm()
        elif self.how == "radd-mean":
            h = x.mean() + h
        elif self.how == "method":
            h = h.mul(x.abs().max())
        elif self.how == "inplace":  # into the variants' own value: fine
            h += x.sum()
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["mul-sum", "div-norm", "radd-mean", "method", "inplace"])
def test_a_zero_dim_shared_value_fans_as_a_constant(how: str, glue: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ZeroDim(how), "lin", _data(), glue=glue)
    _fans(plan)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["mul-sum", "radd-mean", "inplace"])
def test_a_zero_dim_shared_value_fans_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ZeroDim(how, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class ZeroDimEdges(nn.Module):
    """A 0-d value fanned through a `.to(h)` template (not shared: taken as a batch value, so
    the broadcast check sends it to the swap path), and a shared 0-d value written in place
    between two uses (each use reads the value it has then, as in eager mode)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        z = x.sum()
        if self.how == "to":
            return self.fc(h * z.to(h))
        h = h * z
        z.add_(1.0)
        return self.fc(h * z)


def test_a_zero_dim_value_fanned_through_a_template_matches_naive() -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(ZeroDimEdges("to"), "lin", _data()), "broadcasts a ()")


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_a_shared_zero_dim_value_written_between_uses_matches_naive(glue: str) -> None:
    torch.manual_seed(0)
    _same_as_naive(ZeroDimEdges("write"), "lin", _data(), glue=glue)


# ---- 1. unary elementwise: exp, abs, softplus, torch.relu_ ---------------------------------

_UNARY = {
    "exp": lambda h: torch.exp(h * 0.1),
    "exp-method": lambda h: (h * 0.1).exp(),
    "abs": torch.abs,
    "abs-method": lambda h: h.abs(),
    "softplus": lambda h: F.softplus(h, beta=2.0, threshold=5.0),
    "relu_": lambda h: torch.relu_(h),
}


class Unary(nn.Module):
    """`op` applied to the fanned value: a Linear's [B, 8] or a conv's [B, 4, 4, 4]."""

    def __init__(self, op: str, conv: bool = False) -> None:
        super().__init__()
        self.op = op
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_UNARY[self.op](self.lin(x)).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("op", sorted(_UNARY))
def test_unary_elementwise_ops_fan(op: str, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(Unary(op), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("op", sorted(_UNARY))
def test_unary_elementwise_ops_fan_on_a_conv_output(op: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(Unary(op, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class ReluInplaceShared(nn.Module):
    """torch.relu_ into a value the K variants share, fanned through a `.to(h)` template
    (eager mode writes into `u`, which the last step reads; fanned, into a K-fold copy): refused.
    Into a shared value only its writer reads (`x * 2`): fans."""

    def __init__(self, read_again: bool) -> None:
        super().__init__()
        self.read_again = read_again
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x - 0.5  # shared
        h = self.lin(x)
        if self.read_again:
            h = h * torch.relu_(u.to(h))
            return self.fc(h + u)
        return self.fc(h * torch.relu_(x * 2))


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_relu_inplace_into_a_shared_value_read_again_is_refused(glue: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ReluInplaceShared(True), "lin", _data(), glue=glue)
    _not_fanned(plan, "in place")


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_relu_inplace_into_a_private_shared_value_fans(glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(ReluInplaceShared(False), "lin", _data(), glue=glue))


# ---- 2. torch.softmax / torch.log_softmax (function forms) ---------------------------------


class TorchSoftmax(nn.Module):
    """`torch.softmax`/`torch.log_softmax(h, dim)` on a Linear's [B, 8] or a conv's
    [B, 4, 4, 4]: per sample unless `dim` is (or resolves to) the batch dim."""

    def __init__(self, fn: str, dim: int, conv: bool = False, kw: bool = False) -> None:
        super().__init__()
        self.fn, self.dim, self.kw = getattr(torch, fn), dim, kw
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = self.fn(h, dim=self.dim) if self.kw else self.fn(h, self.dim)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize(("dim", "kw"), [(1, False), (-1, True)])
def test_torch_softmax_over_a_sample_dim_fans(fn: str, dim: int, kw: bool, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(TorchSoftmax(fn, dim, kw=kw), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize(("fn", "dim"), [("softmax", 1), ("log_softmax", -3), ("softmax", -1)])
def test_torch_softmax_fans_on_a_conv_output(fn: str, dim: int, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(TorchSoftmax(fn, dim, conv=True), "lin", _data(shape=(1, 4, 4)),
                          glue=glue, layout=layout)
    _fans(plan)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_torch_softmax_over_the_batch_dim_is_not_fanned(fn: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(TorchSoftmax(fn, 0), "lin", _data()), "batch dim")
    # -2 of a rank-2 value is its batch dim, known when it runs: the swap path
    _not_fanned(_same_as_naive(TorchSoftmax(fn, -2, kw=True), "lin", _data()), "batch dim")
    _not_fanned(_same_as_naive(TorchSoftmax(fn, -4, conv=True), "lin",
                               _data(shape=(1, 4, 4))), "batch dim")


# ---- 3. pow / ** ---------------------------------------------------------------------------

_POW = {
    "square": lambda m, h, x: h**2,
    "method": lambda m, h, x: h.pow(3),
    "torch.pow": lambda m, h, x: torch.pow(h, 2),
    "base": lambda m, h, x: 2 ** (h * 0.1),
    "torch.pow-base": lambda m, h, x: torch.pow(2.0, h * 0.1),
    "param": lambda m, h, x: h.abs() ** m.p,  # [8] / [4, 1, 1]: broadcasts within a sample
    "shared": lambda m, h, x: h.abs() ** (x.abs() * 0.1 + 0.5),  # a variant's shape
    "keepdim": lambda m, h, x: h.abs() ** x.abs().mean(1, keepdim=True),  # [B, 1]: per sample
    "zero-dim": lambda m, h, x: h.abs() ** x.abs().mean(),
}


class Pow(nn.Module):
    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.p = nn.Parameter(torch.rand(4, 1, 1) + 0.5 if conv else torch.rand(8) + 0.5)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_POW[self.how](self, self.lin(x), x).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_POW))
def test_pow_fans(how: str, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(Pow(how), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["square", "method", "base", "param", "zero-dim"])
def test_pow_fans_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(Pow(how, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class PowAcross(nn.Module):
    """An exponent that lines the batch dim up with another dim: a batch value of lower rank
    ([B] against [B, 8], B = 8) or a parameter of higher rank ([2, 1, 8])."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.p = nn.Parameter(torch.rand(2, 1, 8) + 0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).abs()
        if self.how == "lower":
            return self.fc(h ** x.abs().mean(1))
        if self.how == "lower-method":
            return self.fc(h.pow(h.mean(1)))
        z = (h**self.p).mean(1)  # [2, B, 8]: a mean over the batch (over K·B rows fanned)
        return self.fc(h + (h[:, None] * z).mean(1))


@pytest.mark.parametrize("how", ["lower", "lower-method", "higher"])
def test_pow_broadcasting_across_the_batch_dim_is_not_fanned(how: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(PowAcross(how), "lin", _data(n=8)), "broadcast")


# ---- 4. .sub_ ------------------------------------------------------------------------------


class SubInplace(nn.Module):
    """`.sub_` into the variants' own value (fans), into a shared value another step reads,
    and into a shared value a fanned `.to(h)` viewed (both refused: eager mode changes what the
    other step reads), and with an operand that broadcasts across the batch (swap path)."""

    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how, self.conv = how, conv
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(4, 1, 1) if conv else torch.randn(8))
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        u = x * 2  # shared
        if self.how == "own":
            h.sub_(self.p)
            h.sub_(x.mean())
            if not self.conv:
                h = h.sub_(u)
        elif self.how == "shared-read":
            h = h + u.sub_(h)  # eager: u becomes each variant's own
            h = h * u
        elif self.how == "viewed":
            h = h * u.to(h).sub_(1.0)
            h = h + u
        else:  # "across": [B, 8] - [B] with B = 8
            h.sub_(h.mean(1))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_sub_inplace_into_the_variants_value_fans(glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(SubInplace("own"), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
def test_sub_inplace_fans_on_a_conv_output(glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(SubInplace("own", conv=True), "lin", _data(shape=(1, 4, 4)),
                          glue=glue, layout=layout)
    _fans(plan)


@pytest.mark.parametrize(("how", "words"), [
    ("shared-read", "in place"), ("viewed", "in place"), ("across", "broadcast")])
def test_sub_inplace_edges_are_not_fanned(how: str, words: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(SubInplace(how), "lin", _data(n=8)), words)


# ---- 5. clamp / clip -----------------------------------------------------------------------

_CLAMP = {
    "both": lambda m, h, x: torch.clamp(h, -0.3, 0.4),
    "min-kw": lambda m, h, x: h.clamp(min=-0.2),
    "max-kw": lambda m, h, x: torch.clip(h, max=0.1),
    "clip-method": lambda m, h, x: h.clip(-0.5, 0.5),
    "param": lambda m, h, x: h.clamp(min=m.lo),  # [8] / [4, 1, 1]: within a sample
    "zero-dim": lambda m, h, x: torch.clamp(h, max=x.mean()),
    "shared": lambda m, h, x: torch.clamp(h, min=x * 0.1),  # a variant's shape
}


class Clamp(nn.Module):
    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.lo = nn.Parameter(torch.randn(4, 1, 1) * 0.2 if conv else torch.randn(8) * 0.2)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_CLAMP[self.how](self, self.lin(x), x).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_CLAMP))
def test_clamp_fans(how: str, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(Clamp(how), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["both", "min-kw", "clip-method", "param", "zero-dim"])
def test_clamp_fans_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(Clamp(how, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class ClampAcross(nn.Module):
    """A tensor bound that lines the batch dim up with another dim ([B] against [B, 8] with
    B = 8, or a [2, 1, 8] parameter): swap path."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(2, 1, 8) * 0.2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "lower":
            return self.fc(torch.clamp(h, max=x.mean(1)))
        if self.how == "lower-fanned":
            return self.fc(h.clip(h.mean(1), None))
        z = torch.clamp(h, min=self.p).mean(1)  # [2, B, 8]: a mean over the batch
        return self.fc(h + (h[:, None] * z).mean(1))


@pytest.mark.parametrize("how", ["lower", "lower-fanned", "higher"])
def test_clamp_with_a_bound_across_the_batch_dim_is_not_fanned(how: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(ClampAcross(how), "lin", _data(n=8)), "broadcast")


# ---- 6. reductions: mean/sum over several negative dims, amax / amin -------------------------

_REDUCE = {
    "mean-neg2": lambda h: h.mean((-2, -1)),
    "sum-neg2-kw": lambda h: torch.sum(h, dim=[-1, -2], keepdim=True).flatten(1),
    "mean-mixed": lambda h: h.mean((2, -1)),
    "amax": lambda h: h.amax((2, 3)),
    "amax-neg": lambda h: torch.amax(h, dim=-1).flatten(1),
    "amin-keepdim": lambda h: h.amin(dim=(-2, -1), keepdim=True).flatten(1),
    "amax-channel": lambda h: torch.amax(h, 1).flatten(1),
}


class Reduce(nn.Module):
    """A reduction over a conv output's [B, 4, 4, 4] non-batch dims."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_REDUCE[self.how](self.lin(x)))


def _reduce_model(how: str) -> nn.Module:
    m = Reduce(how)
    m(_data(shape=(1, 4, 4))[0][0])  # materialise the lazy fc
    return m


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_REDUCE))
def test_reductions_over_sample_dims_fan(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(_reduce_model(how), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class ReduceLow(nn.Module):
    """A reduction of a Linear's [B, 8] (rank 2) whose dims reach the batch dim: -2 of a rank-2
    value (alone or beside -1: the swap path), 0 or the whole tensor (refused)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "mean-neg2":
            z = h.mean((-2, -1))
        elif self.how == "amax-neg2":
            z = torch.amax(h, dim=(-1, -2), keepdim=True)
        elif self.how == "amin-0":
            z = h.amin((0, 1))
        elif self.how == "amax-all":
            z = torch.amax(h)
        else:  # "amax-empty": dim=() is every dim
            z = h.amax(())
        return self.fc(h * z)


@pytest.mark.parametrize(("how", "words"), [
    ("mean-neg2", "batch dim"), ("amax-neg2", "batch dim"), ("amin-0", "batch dim"),
    ("amax-all", "batch dim"), ("amax-empty", "batch dim")])
def test_reductions_reaching_the_batch_dim_are_not_fanned(how: str, words: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(ReduceLow(how), "lin", _data()), words)


# ---- 7. unsqueeze / squeeze ----------------------------------------------------------------

_UNSQ = {
    "unsqueeze-1": lambda h: h.unsqueeze(1).mean(1),
    "unsqueeze-last": lambda h: torch.unsqueeze(h, -1).mean(-1),
    "unsqueeze-neg2": lambda h: h.unsqueeze(-2).sum(-2),  # [B, 1, ...]: per sample
    "squeeze": lambda h: h[:, :1].squeeze(1)[:, None] + h,
    "squeeze-neg": lambda h: torch.squeeze(h.unsqueeze(-1), -1),
    "squeeze-tuple": lambda h: h.unsqueeze(1).unsqueeze(-1).squeeze((1, -1)),
}


class Unsqueeze(nn.Module):
    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how, self.conv = how, conv
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_UNSQ[self.how](self.lin(x)).flatten(1))


def _unsq_model(how: str, conv: bool, data: list) -> nn.Module:
    m = Unsqueeze(how, conv)
    m(data[0][0])
    return m


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_UNSQ))
def test_unsqueeze_squeeze_fan(how: str, glue: str) -> None:
    torch.manual_seed(0)
    data = _data()
    _fans(_same_as_naive(_unsq_model(how, False, data), "lin", data, glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_UNSQ))
def test_unsqueeze_squeeze_fan_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    data = _data(shape=(1, 4, 4))
    plan = _same_as_naive(_unsq_model(how, True, data), "lin", data, glue=glue, layout=layout)
    _fans(plan)


class UnsqueezeLow(nn.Module):
    """Forms that reach the batch dim of a [B] value (a Linear's one output, squeezed): a new
    dim before it (`unsqueeze(-2)`, `unsqueeze(0)`), `squeeze(-1)` of [B], `squeeze()` (the
    batch dim too when B = 1)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).squeeze(1)  # [B]
        if self.how == "unsqueeze-neg2":
            z = h.unsqueeze(-2).mean(1, keepdim=True)  # [1, B] -> mean over B
        elif self.how == "unsqueeze-0":
            z = torch.unsqueeze(h, 0).mean(1, keepdim=True).squeeze(1)
        elif self.how == "squeeze-neg1":
            z = h.unsqueeze(1).squeeze(-1).squeeze(-1)[:, None]
        else:  # "squeeze-none"
            z = h.unsqueeze(1).squeeze().reshape(-1, 1)
        return self.fc(x) * z


@pytest.mark.parametrize(("how", "n", "words"), [
    ("unsqueeze-neg2", 6, "(unsqueeze): dim -1 is the batch dim of a rank-1"),
    ("unsqueeze-0", 6, "(torch.unsqueeze): dim 0 goes before the batch dim"),
    ("squeeze-neg1", 6, "(squeeze): dim -1 is the batch dim of a rank-1"),
    ("squeeze-none", 6, "squeezes every size-1 dim"),
    ("squeeze-none", 1, "squeezes every size-1 dim")])
def test_unsqueeze_squeeze_reaching_the_batch_dim_are_not_fanned(
        how: str, n: int, words: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(UnsqueezeLow(how), "lin", _data(n=n)), words)


# ---- 8. F.normalize --------------------------------------------------------------------------


class Normalize(nn.Module):
    """`F.normalize(h, dim=...)` on a Linear's [B, 8] or a conv's [B, 4, 4, 4]: per sample
    unless `dim` is (or resolves to) the batch dim."""

    def __init__(self, dim: int | None, conv: bool = False, p: float = 2.0) -> None:
        super().__init__()
        self.dim, self.p = dim, p
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = F.normalize(h) if self.dim is None else F.normalize(h, self.p, self.dim)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize(("dim", "p"), [(None, 2.0), (1, 1.0), (-1, 2.0)])
def test_normalize_over_a_sample_dim_fans(dim: int | None, p: float, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(Normalize(dim, p=p), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("dim", [None, 1, -1, -3])
def test_normalize_fans_on_a_conv_output(dim: int | None, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(Normalize(dim, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


@pytest.mark.parametrize("dim", [0, -2])
def test_normalize_over_the_batch_dim_is_not_fanned(dim: int) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(Normalize(dim), "lin", _data()), "batch dim")
    if dim:
        _not_fanned(_same_as_naive(Normalize(-4, conv=True), "lin", _data(shape=(1, 4, 4))),
                    "batch dim")


class OutWrite(nn.Module):
    """`torch.mul(h, 2, out=u)` into a shared `u` another step reads: still an in-place write
    (only `out=None`, which fx records for F.normalize, is none)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x * 1.0
        h = self.lin(x)
        torch.mul(h, 2.0, out=u)
        return self.fc(h + u)


def test_a_real_out_tensor_is_still_a_write() -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(OutWrite(), "lin", _data()), "in place")


def test_out_none_is_not_a_write() -> None:
    """fx records `out=None` where a function's signature has it (`F.normalize`): no write, so
    the step is not taken for an in-place one (it was, and refused every group it was in)."""
    from layerfast.engine.graph import Program

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x, dim=1) + torch.mul(x, 2.0, out=torch.empty(0))

    prog = Program(M())
    norm, mul = ([s for s in prog.steps if s.target is t][0] for t in (F.normalize, torch.mul))
    assert norm.kwargs.get("out", 0) is None and not prog.is_inplace(norm)
    assert prog.is_inplace(mul)


# ---- 9. F.adaptive_max_pool2d ----------------------------------------------------------------


class AdaptiveMax(nn.Module):
    """`F.adaptive_max_pool2d` of a conv's [B, 4, 4, 4] (`out` 1 or 2), of a Linear's output
    as [B, 1, 8] (rank 3, read as one unbatched [C, H, W] sample whose channels are the batch:
    still each sample pooled alone), or with indices (refused)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8) if how == "rank3" else nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "rank3":
            return self.fc(F.adaptive_max_pool2d(h.unsqueeze(1), (1, 4)).flatten(1))
        if self.how == "indices":
            return self.fc(F.adaptive_max_pool2d(h, 2, return_indices=True)[0].flatten(1))
        return self.fc(F.adaptive_max_pool2d(h, 1 if self.how == "1" else (2, None)).flatten(1))


def _amax_model(how: str, data: list) -> nn.Module:
    m = AdaptiveMax(how)
    m(data[0][0])
    return m


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["1", "2", "rank3"])
def test_adaptive_max_pool2d_fans(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    data = _data() if how == "rank3" else _data(shape=(1, 4, 4))
    plan = _same_as_naive(_amax_model(how, data), "lin", data, glue=glue, layout=layout)
    _fans(plan)


def test_adaptive_max_pool2d_with_indices_is_not_fanned() -> None:
    torch.manual_seed(0)
    data = _data(shape=(1, 4, 4))
    _not_fanned(_same_as_naive(_amax_model("indices", data), "lin", data), "indices")


# ---- 10. nn.Unflatten / unflatten --------------------------------------------------------------


class Unflatten(nn.Module):
    """Split a non-batch dim of a conv's [B, 4, 4, 4] (or a Linear's [B, 8]) and read it
    back; `dim` 0 or -2 of [B, 8] splits the batch dim."""

    def __init__(self, how: str, dim: int, conv: bool = True) -> None:
        super().__init__()
        self.how, self.dim, self.conv = how, dim, conv
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.unf = nn.Unflatten(dim, (2, -1))
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "module":
            h = self.unf(h)
        elif self.how == "method":
            h = h.unflatten(self.dim, (2, -1))
        else:
            h = torch.unflatten(h, self.dim, (-1, 2))
        if not self.conv:  # [B, 8] split on its batch dim: reduced to one number
            return self.fc(x) + h.amax(-1).sum(-1).sum(-1)
        return self.fc(h.flatten(1))


def _unf_model(how: str, dim: int, conv: bool, data: list) -> nn.Module:
    m = Unflatten(how, dim, conv)
    m(data[0][0])
    return m


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["module", "method", "torch"])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_unflatten_of_a_sample_dim_fans(how: str, dim: int, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    data = _data(shape=(1, 4, 4))
    plan = _same_as_naive(_unf_model(how, dim, True, data), "lin", data, glue=glue,
                          layout=layout)
    _fans(plan)


@pytest.mark.parametrize("how", ["module", "method", "torch"])
@pytest.mark.parametrize("dim", [0, -2])
def test_unflatten_of_the_batch_dim_is_not_fanned(how: str, dim: int) -> None:
    torch.manual_seed(0)
    data = _data()
    plan = _same_as_naive(_unf_model(how, dim, False, data), "lin", data)
    _not_fanned(plan, "batch dim")
    _not_fanned(plan, "unf")  # refused at the unflatten step, not a later one


# ---- 11. expand_as ---------------------------------------------------------------------------

_EXPAND = {
    "param": lambda m, h, x: h + m.p.expand_as(h),  # [8] / [4, 1, 1]: within a sample
    "keepdim": lambda m, h, x: h * h.mean(1, keepdim=True).expand_as(h),  # [B, 1, ...]
    "shared": lambda m, h, x: h * x.mean(1, keepdim=True).expand_as(h),  # tiled with the batch
    "zero-dim": lambda m, h, x: h - x.sum().expand_as(h),
}


class ExpandAs(nn.Module):
    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(4, 1, 1) if conv else torch.randn(8))
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_EXPAND[self.how](self, self.lin(x), x).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_EXPAND))
def test_expand_as_fans(how: str, glue: str) -> None:
    torch.manual_seed(0)
    _fans(_same_as_naive(ExpandAs(how), "lin", _data(), glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", sorted(_EXPAND))
def test_expand_as_fans_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ExpandAs(how, conv=True), "lin", _data(shape=(1, 4, 4)), glue=glue,
                          layout=layout)
    _fans(plan)


class ExpandAcross(nn.Module):
    """expand_as that lines the batch dim up with another dim: a [B] value expanded as a
    [B, 8] one (B = 8), a [B, 8] one as a [2, B, 8] one; and a write into a shared value a
    fanned expand_as viewed."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "lower":
            return self.fc(h * h.mean(1).expand_as(h))
        if self.how == "higher":
            z = h.expand_as(torch.stack([x, x])).mean(1)  # [2, 8]: a mean over the batch
            return self.fc(h + (h[:, None] * z).mean(1))
        u = x * 2  # "write": shared, viewed by the fanned expand_as, then written
        g = u.expand_as(h)
        u.mul_(-1.0)
        return self.fc(h + g)


@pytest.mark.parametrize(("how", "words"), [
    ("lower", "broadcast"), ("higher", "broadcast"), ("write", "in place")])
def test_expand_as_edges_are_not_fanned(how: str, words: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(ExpandAcross(how), "lin", _data(n=8)), words)


# ---- 12. v.shape[-1] / v.size()[-2] ------------------------------------------------------------


class ShapeNeg(nn.Module):
    """A negative item of a fanned value's size: a sample's size (fans) unless the value has
    that rank, where it is the batch size (K·B fanned): then the swap path."""

    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "scale":  # LayerNorm-ish / attention-ish: divide by the last size
            return self.fc((h / h.shape[-1] ** 0.5).flatten(1))
        if self.how == "view":
            return self.fc(h.reshape(h.shape[0], h.size()[-1], -1).mean(-1))
        if self.how == "batch":  # -2 of a [B, 8] value is the batch size
            return self.fc(h * (4.0 / h.shape[-2]))
        return self.fc(h * (4.0 / h.mean(1).shape[-1]))  # "batch1": -1 of a [B] value


def _shape_model(how: str, conv: bool, data: list) -> nn.Module:
    m = ShapeNeg(how, conv)
    m(data[0][0])
    return m


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["scale", "view"])
@pytest.mark.parametrize("conv", [False, True])
def test_a_negative_item_of_a_sample_size_fans(how: str, conv: bool, glue: str) -> None:
    torch.manual_seed(0)
    data = _data(shape=(1, 4, 4)) if conv else _data()
    plan = _same_as_naive(_shape_model(how, conv, data), "lin", data, glue=glue)
    _fans(plan)


@pytest.mark.parametrize("how", ["batch", "batch1"])
def test_a_negative_item_that_is_the_batch_size_is_not_fanned(how: str) -> None:
    torch.manual_seed(0)
    data = _data()
    _not_fanned(_same_as_naive(_shape_model(how, False, data), "lin", data), "batch dim")


# ---- 13. max / min over a dim, and elementwise ---------------------------------------------------

_MAX = {
    "getitem": lambda m, h, x: h.max(1)[0],
    "values": lambda m, h, x: torch.max(h, dim=-1).values,
    "keepdim": lambda m, h, x: h * h.min(1, keepdim=True)[0],
    "indices": lambda m, h, x: h.max(1)[1].float().unsqueeze(1) + h,
    "indices-attr": lambda m, h, x: torch.min(h, 1).indices.float().unsqueeze(1) * h,
    "elementwise-param": lambda m, h, x: torch.max(h, m.p),
    "elementwise-method": lambda m, h, x: h.min(m.p),
}


class MaxDim(nn.Module):
    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.p = nn.Parameter(torch.randn(4, 1, 1) if conv else torch.randn(8))
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MAX[self.how](self, self.lin(x), x) if self.how != "elementwise-shared" else (
            torch.max(self.lin(x), x * 0.5))
        return self.fc(out.reshape(out.size(0), -1))


def _max_model(how: str, conv: bool, data: list) -> nn.Module:
    m = MaxDim(how, conv)
    m(data[0][0])
    return m


@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", [*sorted(_MAX), "elementwise-shared"])
def test_max_min_fan(how: str, glue: str) -> None:
    torch.manual_seed(0)
    data = _data()
    _fans(_same_as_naive(_max_model(how, False, data), "lin", data, glue=glue))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["getitem", "values", "keepdim", "elementwise-param"])
def test_max_min_fan_on_a_conv_output(how: str, glue: str, layout: str) -> None:
    torch.manual_seed(0)
    data = _data(shape=(1, 4, 4))
    plan = _same_as_naive(_max_model(how, True, data), "lin", data, glue=glue, layout=layout)
    _fans(plan)


class MaxLow(nn.Module):
    """max/min that reach the batch dim of a Linear's [B, 8] (B = 8)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "dim0":
            return self.fc(h * h.max(0)[0])
        if self.how == "whole":
            return self.fc(h * torch.max(h))
        if self.how == "neg2":
            return self.fc(h * torch.min(h, -2, True).values)
        return self.fc(torch.max(h, h.mean(1)))  # "across": [B, 8] vs [B]


@pytest.mark.parametrize(("how", "words"), [
    ("dim0", "batch dim"), ("whole", "whole tensor"), ("neg2", "batch dim"),
    ("across", "broadcast")])
def test_max_min_reaching_the_batch_dim_are_not_fanned(how: str, words: str) -> None:
    torch.manual_seed(0)
    _not_fanned(_same_as_naive(MaxLow(how), "lin", _data(n=8)), words)
