"""Adversarial models against the fan-out proof (session 19): each one was accepted by
`fanout.prove_fan` (or ran fanned without a check) and gave other numbers than the naive
loop. Every model here must now give the naive loop's counts, its loss to rounding, by being
refused by the proof or sent to the swap path at run time.

1. Broadcasting across ranks: an elementwise op between a batch value and a value of lower rank
   (a fanned `h.sum(1)`, a shared `x.mean(0)`) or of higher rank (a [2, 1, C] parameter) lines
   the K·B batch dim up with another dim, so K variants' rows meet.
2. Advanced indexing: `h[:, [0, 1], :, [0, 1]]` puts the index dims first (the batch dim moves
   to dim 1), and an index tensor of the batch is tiled K times with the batch.
3. A module (or attribute) named `size`: `self.size(h)[:1]` was taken for `h.size()[...]`.
4. `ZeroPad2d` / `ConstantPad2d` / `AdaptiveAvgPool2d` on a rank-2 value act on the batch dim.
5. An in-place write into a fanned value that is a view of a shared one (`u[:, :h.size(1)]`,
   `u.to(h)`): eager mode writes into `u`, which later steps read; fanned, the write went into
   a K-fold copy and was lost.
6. A float64 model's overridden BatchNorm on the fanned batch ran with float32 scale and shift.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.naive import naive_evaluate


def _variants(model: nn.Module, mod: str, n: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    m = model.get_submodule(mod)
    for _ in range(n):
        out.append({
            f"{mod}.{k}": (torch.randn(t.shape, generator=g, dtype=torch.float64)
                           * (t.abs().mean().item() * 2 + 0.1)).to(t.dtype)
            for k, t in m.named_parameters(recurse=False)
        })
    return out


def _data(n: int = 6, shape: tuple = (8,), seed: int = 3, dtype=torch.float32) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)
    return [(x, torch.randint(0, 10, (n,), generator=g))]


def _same_as_naive(model: nn.Module, mod: str, batches: list, n: int = 3, **kw) -> dict:
    """Fanned (fanout=True on the CPU, fp32) counts equal the naive loop's, the loss sum too
    (to rounding); returns the plan summary."""
    model.eval()
    variants = _variants(model, mod, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True,
                        **kw).run(batches)
        want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4), (res.counts, want)
    return res.plan


def _not_fanned(plan: dict, words: str) -> None:
    """The group ran on the swap path, refused by the proof or at run time, saying why."""
    assert plan["fanned_variants"] == 0, plan
    why = " ".join([*plan["fanout_refused"].values(), *plan["fanout_fallbacks"].values()])
    assert words in why, plan


# ---- 1. broadcasting across ranks ------------------------------------------------------------


class RankBroadcast(nn.Module):
    """`how`: the batch value of lower or higher rank that an elementwise op broadcasts."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 1 if how == "fanned-lower" else 10)
        self.p = nn.Parameter(torch.randn(2, 1, 10))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "fanned-lower":  # [B, 1] * [B] -> [B, B] (K·B × K·B fanned)
            return self.fc(x) * (h * h.sum(1)).sum(1)[:, None]
        if self.how == "pool-to-1":  # [B, 10] -> [1, 1]: the mean of every row (K·B fanned)
            return self.fc(x) * F.adaptive_avg_pool2d(h, 1)
        # "param-higher": [B, 10] + [2, 1, 10] -> [2, B, 10]: the batch dim is dim 1 now
        z = (h + self.p).mean(1)  # a mean over the batch (over K·B rows fanned)
        return self.fc(x) + (h[:, None] * z).mean(1)


class SharedMean0(nn.Module):
    """A shared `x.mean(0)` ([1, 8, 8]) against a fanned [B, 1, 8, 8]: tiled K times it
    broadcast into [K·B, K, 8, 8], and `.sum(1)` then counted it K times."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.conv(x) + x.mean(0)).sum(1)
        return self.fc(z.mean(1))


@pytest.mark.parametrize("how", ["fanned-lower", "pool-to-1", "param-higher"])
def test_broadcast_across_ranks_is_not_fanned(how: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(RankBroadcast(how), "lin", _data())
    # an adaptive pool of a rank-2 value is refused before it broadcasts (pools the batch dim)
    _not_fanned(plan, "batch dim" if how == "pool-to-1" else "broadcast")


@pytest.mark.parametrize("glue", ["fused", "fold", "unfolded"])
def test_a_shared_batch_mean_broadcast_into_a_conv_output_is_not_fanned(glue: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(SharedMean0(), "conv", _data(shape=(1, 8, 8)), glue=glue)
    _not_fanned(plan, "broadcast")


def test_same_rank_broadcasts_still_fan() -> None:
    """An SE-style [B, C, 1, 1] gate, a [C, 1, 1] parameter and a [B, 1] shared value keep
    the batch dim in dim 0: still fanned, still the naive loop's counts."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.p = nn.Parameter(torch.randn(4, 1, 1))
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            h = h * torch.sigmoid(h.mean([2, 3], keepdim=True)) + self.p
            return self.fc(h.mean([2, 3]) * x.mean([1, 2, 3])[:, None])

    torch.manual_seed(0)
    plan = _same_as_naive(Gate(), "conv", _data(shape=(1, 8, 8)))
    assert plan["fanned_variants"] == 3 and not plan["fanout_fallbacks"], plan


# ---- 2. advanced indexing --------------------------------------------------------------------


class AdvancedIndex(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [B, 4, 8, 8]
        if self.how == "two-lists":
            m = h[:, [0, 1], :, [0, 1]].mean(1)  # [2, B, 8] -> a mean over the batch: [2, 8]
            return self.fc((h[:, :2, :, 0] + m).flatten(1))
        idx = x.flatten(1).argmax(1) % 4  # a shared index of the batch, [B]
        z = h.mean([2, 3])[:, idx].sum(1)  # [B, B] -> [B]
        return self.fc(h.mean(3).flatten(1)[:, :16]) * z[:, None]


@pytest.mark.parametrize("how", ["two-lists", "batch-index"])
def test_advanced_indexing_that_moves_or_tiles_the_batch_is_refused(how: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(AdvancedIndex(how), "conv", _data(shape=(1, 8, 8)))
    _not_fanned(plan, "index")
def test_a_module_named_size_is_not_a_size() -> None:
    class SizeNamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 10)
            self.size = nn.Identity()
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.size(self.lin(x))[:1]  # sample 0's row for every sample

    torch.manual_seed(0)
    plan = _same_as_naive(SizeNamed(), "lin", _data())
    _not_fanned(plan, "index")




# ---- 4. pads and adaptive pools on a rank-2 value -------------------------------------------


class LowRankPad(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(8, 2)
        self.op = nn.ZeroPad2d(1) if how == "zeropad" else nn.ConstantPad2d(1, 0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # [B, 2]
        p = self.op(h)  # pads the batch dim too: [B+2, 4]
        z = p.view(h.size(0), -1).mean(1)
        return self.fc(x) * z[:, None]


@pytest.mark.parametrize("how", ["zeropad", "constpad"])
def test_pads_of_a_rank_2_value_are_not_fanned(how: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(LowRankPad(how), "lin", _data(n=2), n=2)
    _not_fanned(plan, "batch dim")


# ---- 5. in-place writes through a view of a shared value ------------------------------------


class ViewWrite(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(8, 8)
        self.lin = nn.Linear(8, 4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x)  # shared by the K variants
        h = self.lin(x)
        if self.how == "slice":
            u[:, : h.size(1)].mul_(3)  # a view of u, fanned only by its bound
        else:
            u.to(h).mul_(3)  # `to` returns u itself
        return self.fc(u) * h.mean(1, keepdim=True)


@pytest.mark.parametrize("how", ["slice", "to"])
def test_in_place_write_into_a_view_of_a_shared_value_is_refused(how: str) -> None:
    torch.manual_seed(0)
    plan = _same_as_naive(ViewWrite(how), "lin", _data())
    _not_fanned(plan, "in place")


# ---- 6. float64 ------------------------------------------------------------------------------


def test_float64_overridden_batchnorm_is_computed_in_float64() -> None:
    """Linear -> BatchNorm1d -> head in float64; the BN's variants run fanned on the Linear's
    K·B batch. With float32 scale and shift the logits were off by ~1e-7 (a float32 rounding,
    enough to flip a near-tie the naive float64 loop tells apart); in float64 they are the
    naive loop's to float64 rounding, so the float32 logits that are scored are equal."""
    torch.manual_seed(0)
    lin, bn, fc = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)
    model = nn.Sequential(lin, bn, fc).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
    batches = _data(n=6, dtype=torch.float64)
    variants = _variants(model, "1", n=3)
    for glue in ("fused", "fold", "unfolded"):
        got: dict = {}
        res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True,
                        glue=glue).run(batches, on_logits=lambda i, t, got=got: got.update({tuple(i): t}))
        assert res.plan["fanned_variants"] == 3, res.plan
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        want = []
        with torch.no_grad():
            for ov in variants:
                model.load_state_dict(ov, strict=False)
                want.append(model(batches[0][0]).float())
                model.load_state_dict(saved)
        fanned = got[(0, 1, 2)]
        assert torch.equal(fanned, torch.stack(want)), (fanned - torch.stack(want)).abs().max()
