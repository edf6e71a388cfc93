"""The fanned unit itself (session 20): the forms of conv / linear / BatchNorm a unit takes, run
as K stacked weight sets (`fanrun.apply_fanned`), against the naive loop.

1. A BatchNorm applied to a K·B batch (a `--bn separate` unit on a shared conv output, a BN after
   a fanned Linear, every BN in `glue="unfolded"`) ran its per-variant affine in x's dtype: under
   bf16 autocast (the CUDA default) scale and shift were rounded to bf16 first, and x·scale
   cancelled against shift with bf16 errors, ~17x the error of the model's own BatchNorm, which
   computes in float32. The fanned and the swapped bf16 runs of one model disagreed.
2. A sparse variant tensor failed in `copy_` with a bare RuntimeError (Python API).
3. (coverage, no defect found) the unit forms that fan out and match the naive loop in every glue
   mode, and the ones refused with a reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanrun import GLUE_MODES, apply_fanned, stack_module
from layerfast.engine.naive import naive_evaluate


def _variants(model: nn.Module, mods: str, n: int = 3, seed: int = 1,
              keys: tuple[str, ...] | None = None) -> list[dict]:
    """n variants of the modules `mods` (comma-separated): random parameters, and for a
    BatchNorm random running statistics too; only `keys` of each module when given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = {}
        for mod in mods.split(","):
            m = model.get_submodule(mod)
            items = [*m.named_parameters(recurse=False),
                     *((k, b) for k, b in m.named_buffers(recurse=False)
                       if b.is_floating_point())]
            for k, t in items:
                if keys is not None and k not in keys:
                    continue
                r = torch.randn(t.shape, generator=g, dtype=torch.float64)
                r = r.abs() + 0.1 if k == "running_var" else r * (t.abs().mean().item() * 2 + 0.1)
                v[f"{mod}.{k}"] = r.to(t.dtype)
        out.append(v)
    return out


def _data(n: int, shape: tuple, seed: int = 3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64).float()
    return [(x, torch.randint(0, 10, (n,), generator=g))]


def _same_as_naive(model: nn.Module, variants: list, batches: list, **kw) -> dict:
    """Fanned (fp32, CPU) counts equal the naive loop's, the loss to rounding; the plan."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Evaluator(model, variants, device="cpu", precision="fp32", fanout=True,
                        **kw).run(batches)
        want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]]), (res.counts, want)
    assert torch.allclose(res.counts[:, 2], want[:, 2], rtol=1e-5, atol=1e-4), (res.counts, want)
    return res.plan


# ---- 1. a BatchNorm on a K·B batch, in bf16 ------------------------------------------------


def _offset_bn(C: int) -> nn.BatchNorm2d:
    """An eval BN whose running mean is large against its std: x·scale and shift are both
    large and cancel, as after a ReLU or a biased conv."""
    bn = nn.BatchNorm2d(C).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g) * 3 + 5)
        bn.running_var.copy_(torch.rand(C, generator=g) * 0.5 + 0.05)
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
    return bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_bn_on_a_narrow_batch_is_as_exact_as_the_models_own(dtype: torch.dtype) -> None:
    C, B, K = 32, 16, 3
    bn = _offset_bn(C)
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(B, C, 6, 6, generator=g) * bn.running_var.sqrt()[:, None, None]
    x = (x32 + bn.running_mean[:, None, None]).to(dtype)
    with torch.no_grad():
        st = stack_module(bn, [{} for _ in range(K)])  # K copies of the final BN
        y = apply_fanned(bn, st, x, False, K)
        own = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                           bn.eps)
        exact = bn(x.float())
    assert y.dtype == dtype and y.shape == (K * B, C, 6, 6)
    own_err = (own.float() - exact).abs().mean()
    for k in range(K):
        err = (y[k * B:(k + 1) * B].float() - exact).abs().mean()
        assert err <= 1.5 * own_err, (err, own_err)  # was ~17x (bf16)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x) + 8.0)).flatten(1))


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_a_bn_unit_fanned_in_bf16_gives_the_swapped_runs_numbers(glue: str) -> None:
    """`--bn separate` under bf16 autocast (CPU autocast here, CUDA's default mode): the BN
    unit's group fans out on the shared conv output; its loss must be the swap path's."""
    torch.manual_seed(0)
    m = _BNNet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 10, (64,), generator=g)
    with torch.no_grad():
        h = m.conv(x) + 8.0
        m.bn.running_mean.copy_(h.mean((0, 2, 3)))
        m.bn.running_var.copy_(h.var((0, 2, 3)))
    vs = [{"bn.weight": m.bn.weight.detach() * (1 + 0.1 * k), "bn.bias": m.bn.bias.detach() + 0.1 * k}
          for k in range(1, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fanned = Evaluator(m, vs, device="cpu", precision="bf16", fanout=True,
                           glue=glue).run([(x, y)])
        swapped = Evaluator(m, vs, device="cpu", precision="bf16", fanout=False).run([(x, y)])
    assert fanned.plan["fanned_variants"] == 3, fanned.plan
    # was 0.37 apart (a loss sum over 64 samples)
    assert torch.allclose(fanned.counts[:, 2], swapped.counts[:, 2], rtol=1e-5, atol=1e-3), (
        fanned.counts, swapped.counts)


# ---- 2. a sparse variant tensor ------------------------------------------------------------


@pytest.mark.parametrize("fanout", [True, False])
def test_a_sparse_variant_tensor_is_refused_with_a_clear_error(fanout: bool) -> None:
    """It failed in `copy_` with a bare RuntimeError ("copy_() between dense and sparse Tensors
    is not implemented"); the checkpoint loader already refuses sparse tensors by name."""
    from layerfast.errors import LayerfastError

    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)).eval()
    w = m[2].weight.detach()
    vs = [{"2.weight": w.to_sparse()}, {"2.weight": w * 2}]
    x = torch.randn(4, 8)
    with pytest.raises(LayerfastError, match=r"not dense.*2\.weight: sparse_coo.*to_dense"):
        Evaluator(m, vs, device="cpu", precision="fp32", fanout=fanout).run(
            [(x, torch.zeros(4, dtype=torch.long))])


# ---- 3. the unit's forms: fanned and exact, or refused with a reason -----------------------


class _ConvUnit(nn.Module):
    """pre -> unit -> [bn] -> relu -> head; `unit` is the conv under test."""

    def __init__(self, unit: nn.Module, dim: int, c: int, bn: bool = False) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        self.pre = conv(3, 4, 1)
        self.unit = unit
        self.bn = norm(c) if bn else nn.Identity()
        self.fc = nn.Linear(c, 10)
        self.dims = list(range(2, 2 + dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.unit(torch.relu(self.pre(x)))))
        return self.fc(h.mean(self.dims))


_CONVS = {
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), 2, 4, (3, 8, 8)),
    "groups2-dilated": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2), 2, 6, (3, 9, 9)),
    "stride-nobias": (lambda: nn.Conv2d(4, 5, 3, stride=2, bias=False), 2, 5, (3, 9, 9)),
    "same-even": (lambda: nn.Conv2d(4, 5, 4, padding="same", dilation=2), 2, 5, (3, 8, 8)),
    "conv1d-depthwise-same": (lambda: nn.Conv1d(4, 8, 3, groups=4, padding="same"), 1, 8,
                              (3, 10)),
}


@pytest.mark.parametrize("layout", ["auto", "channels_last"])
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("form", sorted(_CONVS))
def test_conv_unit_forms_fan_out_and_match_the_naive_loop(form: str, glue: str,
                                                          layout: str) -> None:
    make, dim, c, shape = _CONVS[form]
    torch.manual_seed(0)
    m = _ConvUnit(make(), dim, c, bn=True)
    b = _data(6, shape)
    m.train()
    m(b[0][0] * 2 + 1)  # running statistics that are not 0 / 1
    m.eval()
    for mods in ("unit", "bn", "unit,bn"):
        plan = _same_as_naive(m, _variants(m, mods), b, glue=glue, layout=layout)
        assert plan["fanned_variants"] == 3, (mods, plan)


@pytest.mark.parametrize("keys", [("weight",), ("bias",), ("running_mean",), ("running_var",),
                                  ("weight", "running_mean")])
def test_a_bn_unit_given_some_of_its_keys_fans_out_and_matches(keys: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    m = _ConvUnit(nn.Conv2d(4, 4, 3, padding=1), 2, 4, bn=True)
    b = _data(6, (3, 8, 8))
    m.train()
    m(b[0][0] * 2 + 1)
    m.eval()
    for glue in GLUE_MODES:
        plan = _same_as_naive(m, _variants(m, "bn", keys=keys), b, glue=glue)
        assert plan["fanned_variants"] == 3, plan


class _SeqLinear(nn.Module):
    """A Linear unit on [B, T, C] or [B, H, W, C] values, with or without bias."""

    def __init__(self, bias: bool, rank: int) -> None:
        super().__init__()
        self.dims = list(range(1, rank - 1))  # the sequence / spatial dims, averaged
        self.pre = nn.Linear(8, 8)
        self.unit = nn.Linear(8, 6, bias=bias)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.unit(torch.relu(self.pre(x))))
        return self.fc(h.mean(self.dims))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 8)])
def test_a_linear_unit_on_sequences_fans_out_and_matches(shape: tuple, bias: bool) -> None:
    torch.manual_seed(0)
    m = _SeqLinear(bias, 1 + len(shape))
    for glue in GLUE_MODES:
        for mods in ("unit", "unit,fc"):
            plan = _same_as_naive(m, _variants(m, mods), _data(6, shape), glue=glue)
            assert plan["fanned_variants"] == 3, plan


@pytest.mark.parametrize("form,words", [
    ("reflect", "padding_mode 'reflect'"),
    ("conv3d", "Conv3d"),
    ("convtranspose", "ConvTranspose2d"),
])
def test_unit_forms_the_fan_out_refuses_say_why(form: str, words: str) -> None:
    """Refused (the swap path, exact), with the reason in the plan: a speed cost on the GPU."""
    make, dim, c, shape = {
        "reflect": (lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), 2, 5,
                    (3, 8, 8)),
        "conv3d": (lambda: nn.Conv3d(4, 5, 3), 3, 5, (3, 5, 5, 5)),
        "convtranspose": (lambda: nn.ConvTranspose2d(4, 5, 3, stride=2, output_padding=1), 2,
                          5, (3, 5, 5)),
    }[form]
    torch.manual_seed(0)
    m = _ConvUnit(make(), dim, c)
    plan = _same_as_naive(m, _variants(m, "unit"), _data(6, shape))
    assert plan["fanned_variants"] == 0 and words in " ".join(plan["fanout_refused"].values())
