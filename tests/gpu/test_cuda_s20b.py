"""Session 20's later engine changes (e9f438f..128f871), checked on a CUDA GPU (every test here
is `cuda`: skipped without one; `scripts/gpu_session.sh`'s cuda-new-tests step runs them,
after test_cuda_s19.py and test_cuda_s20.py).

Their own tests run on the CPU. The same checks on CUDA, on the model's own device tensors,
in fp32 with TF32 off against the naive loop (counts up to one near-tie flip per variant where
fanned, exact where swapped; the loss sum to rounding) and in bf16 against the swap path:

1. A representative set of the fan-out allow-list's new forms (tests/fanout/test_fanallow_s20.py's
   models: exp, softplus, relu_, pow with a number base and with a parameter exponent,
   clamp with number and 0-d bounds, torch.softmax over a negative dim, mean/amin over
   negative dims, squeeze of a tuple, max over a dim and elementwise, F.normalize (out=None),
   adaptive_max_pool2d, unflatten, expand_as of a shared value, shape[-1], a shared 0-d
   value, .sub_; and a shared 0-d value on the host, `torch.tensor(2.0)` made in the forward or
   `x.sum().cpu()`, which eager CUDA takes as a number) fans in each glue mode (and
   channels_last where 4-D) and counts as the naive loop. In bf16 (layout auto: channels_last on CUDA) the fanned run's counts are within one
   flip of the swapped run's, and its loss sum (64 samples) within 0.1 of it or within the
   swapped run's own distance to fp32, whichever is larger. Why 0.1: both paths run the same
   bf16 ops on the same values; only a matmul's kernel choice by row count (K·B against B)
   may move a logit by a bf16 ulp (<= 2^-7 below 2), which moves a sample's loss by at most
   twice that, and such moves do not line up over 64 samples (0.1 is 6 worst-case samples).
2. A write into a shared value after a fanned step viewed it (test_fanatk4_s20's
   `ViewThenWrite`) is refused ("in place") and counts as the naive loop, with the same
   refusal as on the CPU; the view nobody writes still fans. `view(-1, N)` (`InferredBatch`)
   fans where each row is a sample, and where rows split samples takes the swap path
   (the rows check, at run time: the same fallback as on the CPU).
3. The effects check on CUDA (it runs on the device, on the model's own tensors): a value a
   step keeps in Python state and a later step reads, a side tensor (in a closure's list, an
   accumulator made on the device, a host copy `h.to("cpu", copy=True)`), a Python number
   (`float(t)`, which syncs the device; `torch.equal`; a size `nonzero` sets) or a host copy
   (`.cpu().numpy()`, `np.from_dlpack`) handed out, a buffer written by one step and read by a
   later one: the same steps are made opaque as on the CPU (`Evaluator._unseen`), and the counts
   equal the naive loop's. The storage tracking keys storages by address and forgets an
   address once its tensor is freed (a weak reference); CUDA's caching allocator hands a
   freed block of the same size straight back, so
   `test_a_side_tensor_at_a_freed_values_address_is_still_tracked` makes a step (b) keep a
   side tensor that lands (on CUDA, asserted) at the address of a value the check's run
   dropped just before, and asserts b itself is made opaque: a freed value's address still
   taken for that value's would credit the side tensor to the dropped value's step instead.

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"` and no markers (205 passed in 4.5 s on a busy shared
CPU; the address-reuse assertion is CUDA's alone: glibc reuses the block only sometimes, and
with `StorageWeakRef.expired` patched to always False the CPU copy's address-reuse test failed
in the runs where it did, 4 of 6; with the effects check switched off, every case of 3 fails;
the equal / nonzero / dlpack cases fail with 55fde84 and 9348ce6 reverted).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanrun import GLUE_MODES
from layerfast.engine.graph import Program
from layerfast.engine.naive import naive_evaluate
from layerfast.engine.precision import tf32_allowed
from tests.effects.test_effects3_s20 import _Four, _reads_kept
from tests.effects.test_effects4_s20 import (
    _buffer_channel,
    _buffer_channel_replaced,
    _escaping,
    _side_list,
)
from tests.engine.test_traceatk_s19 import _batches as _batches_64
from tests.fanout.test_fan_s19 import _variants as _per_unit
from tests.fanout.test_fanallow_s20 import (
    AdaptiveMax,
    Clamp,
    ExpandAs,
    MaxDim,
    Normalize,
    Pow,
    Reduce,
    ShapeNeg,
    SubInplace,
    TorchSoftmax,
    Unary,
    Unflatten,
    Unsqueeze,
    ZeroDim,
)
from tests.fanout.test_fanatk4_s20 import InferredBatch, ViewThenWrite
from tests.fanout.test_fanatk_s19 import _data
from tests.fanout.test_fanatk_s19 import _variants as _mod_draws
from tests.gpu.test_cuda_s19 import _close_to_naive
from tests.gpu.test_cuda_s20 import _why

DEVICE = "cuda"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    after = model.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]


def _naive(model: nn.Module, variants: list, batches: list) -> torch.Tensor:
    """The naive loop on DEVICE in full float32 (cuDNN's TF32, on by default, off)."""
    with tf32_allowed(False):
        return naive_evaluate(model, variants, lambda: copy.deepcopy(batches), device=DEVICE)


def _run(model: nn.Module, variants: list, batches: list, device: str = DEVICE,
         **kw) -> tuple[dict, Any, Evaluator]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = Evaluator(model, variants, device=device, **kw)
        res = ev.run(copy.deepcopy(batches))
    return res.plan, res, ev


def _fans_all(plan: dict, n: int, label: str) -> None:
    msg = _why(plan, label)
    assert plan["fanned_variants"] == n and plan["swapped_variants"] == 0, msg
    assert plan["fanout_refused"] == {} and plan["fanout_fallbacks"] == {}, msg


# ---- 1. the allow-list's new forms, in each glue mode -----------------------------------------


class HostZeroDim(nn.Module):
    """A 0-d value the K variants share that lives on the host while the model runs on the
    GPU (`torch.tensor(2.0)` made in the forward, `x.abs().sum().cpu()`): eager mode takes a
    CPU 0-d tensor as a number in a binary op on CUDA values; the fanned run must too (it
    uses a shared 0-d value untiled, as a per-call constant)."""

    def __init__(self, how: str, conv: bool = False) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Linear(8, 8)
        self.fc = nn.Linear(4 * 4 * 4 if conv else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "mul":
            h = h * torch.tensor(2.0)
        elif self.how == "div-of-x":
            h = h / x.abs().sum().cpu()
        elif self.how == "pow":
            h = h.abs() ** torch.tensor(1.5)
        elif self.how == "max":
            h = torch.max(h, torch.tensor(0.1))
        else:  # "sub_"
            h = h.sub_(torch.tensor(0.3))
        return self.fc(h.flatten(1))


def _built(make: Callable[[], nn.Module], conv: bool) -> Callable[[int], tuple]:
    """A builder of (model, variants of its `lin`, batches of n samples): the model made
    under seed 0 and run once on the data (materialising any LazyLinear)."""
    def build(n: int) -> tuple[nn.Module, list, list]:
        torch.manual_seed(0)
        data = _data(n=n, shape=(1, 4, 4)) if conv else _data(n=n)
        m = make()
        m(data[0][0])
        return m.eval(), _mod_draws(m, "lin"), data
    return build


#: name -> (builder, whether the fanned value is 4-D: then channels_last too)
FORMS: dict[str, tuple[Callable[[int], tuple], bool]] = {
    "exp": (_built(lambda: Unary("exp-method"), False), False),
    "softplus-conv": (_built(lambda: Unary("softplus", conv=True), True), True),
    "relu_": (_built(lambda: Unary("relu_"), False), False),
    "pow-base": (_built(lambda: Pow("base"), False), False),
    "pow-param-conv": (_built(lambda: Pow("param", conv=True), True), True),
    "clamp-both-conv": (_built(lambda: Clamp("both", conv=True), True), True),
    "clamp-zero-dim": (_built(lambda: Clamp("zero-dim"), False), False),
    "torch.log_softmax-neg-conv": (
        _built(lambda: TorchSoftmax("log_softmax", -3, conv=True), True), True),
    "mean-neg2-conv": (_built(lambda: Reduce("mean-neg2"), True), True),
    "amin-keepdim-conv": (_built(lambda: Reduce("amin-keepdim"), True), True),
    "squeeze-tuple-conv": (_built(lambda: Unsqueeze("squeeze-tuple", conv=True), True), True),
    "max-values": (_built(lambda: MaxDim("values"), False), False),
    "max-elementwise-conv": (_built(lambda: MaxDim("elementwise-param", conv=True), True), True),
    "normalize-conv": (_built(lambda: Normalize(None, conv=True), True), True),
    "adaptive-max-conv": (_built(lambda: AdaptiveMax("2"), True), True),
    "unflatten-neg-conv": (_built(lambda: Unflatten("method", -1), True), True),
    "expand-as-shared-conv": (_built(lambda: ExpandAs("shared", conv=True), True), True),
    "shape-neg1": (_built(lambda: ShapeNeg("scale"), False), False),
    "zero-dim-norm": (_built(lambda: ZeroDim("div-norm"), False), False),
    "sub_-own-conv": (_built(lambda: SubInplace("own", conv=True), True), True),
    "host-0d-mul": (_built(lambda: HostZeroDim("mul"), False), False),
    "host-0d-div-of-x-conv": (_built(lambda: HostZeroDim("div-of-x", conv=True), True), True),
    "host-0d-pow-conv": (_built(lambda: HostZeroDim("pow", conv=True), True), True),
    "host-0d-max": (_built(lambda: HostZeroDim("max"), False), False),
    "host-0d-sub_-conv": (_built(lambda: HostZeroDim("sub_", conv=True), True), True),
}

_CASES = [(name, glue, layout) for name, (_, conv) in FORMS.items() for glue in GLUE_MODES
          for layout in (("contiguous", "channels_last") if conv else ("contiguous",))]


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "glue", "layout"), _CASES)
def test_new_allow_list_forms_fan_on_cuda_and_count_as_the_naive_loop(
        name: str, glue: str, layout: str) -> None:
    model, variants, batches = FORMS[name][0](6)
    model = model.to(DEVICE)
    before = _state(model)
    want = _naive(model, variants, batches)
    plan, res, _ = _run(model, variants, batches, precision="fp32", fanout=True, glue=glue,
                        layout=layout)
    _fans_all(plan, len(variants), f"{name} {glue} {layout}:")
    _close_to_naive(res.counts, want)
    assert _changed(before, model) == []


_BF16 = ["softplus-conv", "pow-param-conv", "torch.log_softmax-neg-conv", "amin-keepdim-conv",
         "normalize-conv", "adaptive-max-conv", "expand-as-shared-conv", "clamp-zero-dim",
         "shape-neg1"]


@pytest.mark.cuda
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("name", _BF16)
def test_new_allow_list_forms_fanned_in_bf16_on_cuda_give_the_swapped_runs_numbers(
        name: str, glue: str) -> None:
    model, variants, batches = FORMS[name][0](64)
    model = model.to(DEVICE)
    # layout "auto": channels_last under bf16 on CUDA for the 4-D ones, the default path
    fanned, fres, _ = _run(model, variants, batches, precision="bf16", fanout=True, glue=glue)
    swapped, sres, _ = _run(model, variants, batches, precision="bf16", fanout=False)
    _fans_all(fanned, len(variants), f"{name} bf16 {glue}:")
    assert swapped["fanned_variants"] == 0, _why(swapped, f"{name} bf16 swap:")
    flips = (fres.counts[:, [0, 1, 3]] - sres.counts[:, [0, 1, 3]]).abs().max().item()
    assert flips <= 1, (flips, fres.counts, sres.counts)
    fp32 = _naive(model, variants, batches)
    own = (sres.counts[:, 2] - fp32[:, 2]).abs()  # bf16's own distance, per variant
    gap = (fres.counts[:, 2] - sres.counts[:, 2]).abs()
    assert (gap <= own.clamp(min=0.1)).all(), (gap, own, fres.counts, sres.counts)


# ---- 2. a write after a fanned view of a shared value; view(-1, N) ----------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize(("view", "write"), [("view", "relu_"), ("to", "module"),
                                             ("slice", "iadd"), ("view", "view"),
                                             ("to", "none"), ("slice", "none")])
def test_a_write_after_a_fanned_view_of_a_shared_value_on_cuda(view: str, write: str,
                                                               glue: str) -> None:
    torch.manual_seed(0)
    model = ViewThenWrite(view, write).eval()
    variants, batches = _mod_draws(model, "lin"), _data()
    cpu, _, _ = _run(model, variants, batches, device="cpu", precision="fp32", fanout=True,
                     glue=glue)
    model = model.to(DEVICE)
    want = _naive(model, variants, batches)
    plan, res, _ = _run(model, variants, batches, precision="fp32", fanout=True, glue=glue)
    if write == "none":  # nobody writes into x2: the view fans
        _fans_all(plan, 3, f"{view}/{write} {glue}:")
    else:
        assert plan["fanned_variants"] == 0, _why(plan, f"{view}/{write} {glue}:")
        assert "in place" in " ".join(plan["fanout_refused"].values()), _why(plan)
        assert plan["fanout_refused"] == cpu["fanout_refused"], (plan, cpu)
    _close_to_naive(res.counts, want, exact=write != "none")


@pytest.mark.cuda
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("how", ["flatten", "reshape3", "mixed", "split"])
def test_view_minus_one_n_on_cuda_fans_where_rows_are_samples(how: str, glue: str) -> None:
    """`split` views each sample as 2 rows: the rows check sends the group to the swap path
    when it runs (a fallback, as on the CPU), and the counts stay the naive loop's."""
    torch.manual_seed(0)
    model = InferredBatch(how).eval()
    variants, batches = _mod_draws(model, "conv"), _data(shape=(1, 8, 8))
    cpu, _, _ = _run(model, variants, batches, device="cpu", precision="fp32", fanout=True,
                     glue=glue)
    model = model.to(DEVICE)
    want = _naive(model, variants, batches)
    plan, res, _ = _run(model, variants, batches, precision="fp32", fanout=True, glue=glue)
    if how == "split":
        assert plan["fanned_variants"] == 0, _why(plan, f"{how} {glue}:")
        assert plan["fanout_refused"] == cpu["fanout_refused"], (plan, cpu)
        assert plan["fanout_fallbacks"] == cpu["fanout_fallbacks"], (plan, cpu)
    else:
        _fans_all(plan, 3, f"{how} {glue}:")
    _close_to_naive(res.counts, want, exact=how == "split")


@pytest.mark.cuda
def test_view_minus_one_n_in_bf16_on_cuda_runs_contiguous_and_fans() -> None:
    """`h.view(-1, 256)` of a channels_last conv output raises in eager mode: under bf16 the
    layout `auto` (channels_last on CUDA) must fall back to contiguous and still fan."""
    torch.manual_seed(0)
    model = InferredBatch("flatten").eval()
    variants, batches = _mod_draws(model, "conv"), _data(n=64, shape=(1, 8, 8))
    model = model.to(DEVICE)
    fanned, fres, _ = _run(model, variants, batches, precision="bf16", fanout=True)
    swapped, sres, _ = _run(model, variants, batches, precision="bf16", fanout=False)
    _fans_all(fanned, 3, "flatten bf16:")
    flips = (fres.counts[:, [0, 1, 3]] - sres.counts[:, [0, 1, 3]]).abs().max().item()
    assert flips <= 1, (fres.counts, sres.counts)


# ---- 3. the effects check on CUDA -------------------------------------------------------------


def _side_accumulator() -> nn.Module:
    """test_effects4_s20's accumulator, made on its input's device: b makes a zero
    accumulator on the side; c adds its input into it in place, d adds it to its input."""
    torch.manual_seed(0)
    m = _Four()
    box: dict[str, torch.Tensor] = {}
    b, c, d = m.b, m.c, m.d

    def fb(h: torch.Tensor) -> torch.Tensor:
        box["acc"] = torch.zeros(h.shape[0], 64, device=h.device)
        return F.linear(h, b.weight, b.bias)

    def fc(g: torch.Tensor) -> torch.Tensor:
        box["acc"].add_(g)
        return F.linear(g, c.weight, c.bias)

    m.b.forward, m.c.forward = fb, fc
    m.d.forward = lambda g: F.linear(g + box["acc"], d.weight, d.bias)
    return m


#: a float per sample (`float(t)` of a device tensor: `_local_scalar_dense`, a device sync)
_ITEMS = _escaping(lambda h: [float(v) for v in h[:, 0]],
                   lambda g, s: g * torch.tensor(s, device=g.device)[:, None])
#: the values handed to numpy through a host copy (`.cpu()` is a copy only on CUDA)
_NUMPY = _escaping(lambda h: h.cpu().numpy().copy(),
                   lambda g, s: g + torch.from_numpy(s).to(g.device))


class _Reuse(nn.Module):
    """h = a(x) (a cut's carrier, kept by the check); t = act(h), t2 = act2(t) (values inside
    the residual, no cut's carriers: dropped after their last use); b(t2 + h); c; d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 100)  # [B, 100] fp32: 3200 bytes for the check's 8 samples,
        self.act, self.act2 = nn.ReLU(), nn.ReLU()  # a size no other tensor of the run has
        self.b, self.c, self.d = nn.Linear(100, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.d(torch.relu(self.c(torch.relu(self.b(self.act2(self.act(h)) + h)))))


#: a bool from a value-dependent op (`torch.equal`: no `.item()` on the way)
_EQUAL = _escaping(lambda h: torch.equal((h[:, 0] > 0).sum() > h.shape[0] // 2,
                                         torch.tensor(True, device=h.device)),
                   lambda g, s: g * (3.0 if s else -1.0))
#: a Python int a value-dependent size gives (`nonzero`: a device sync, no dispatched item)
_NONZERO = _escaping(lambda h: (h[:, 0] > 0.3).nonzero().shape[0], lambda g, s: g * (1 + s))
#: numpy's view through DLPack of a host copy (numpy cannot take a CUDA tensor's)
_DLPACK = _escaping(lambda h: np.from_dlpack(h.cpu()).copy(),
                    lambda g, s: g + torch.from_numpy(s).to(g.device))

#: a host tensor kept in Python state (a device-to-host copy: storage in another address range)
_HOST = _escaping(lambda h: h.to("cpu", copy=True), lambda g, s: g + s.to(g.device))


def _reused_address() -> tuple[nn.Module, list[bool]]:
    """b keeps `s * 2` (a side tensor, its input's size) in a closure's dict and d adds it to
    its input. By b, act's and act2's values have been dropped and freed (the add was act2's
    last user): CUDA's caching allocator hands an exact-size free block straight back, so
    the add's value and then b's side tensor land where act's and act2's values were. `hits`
    tells, for each forward the effects check's dispatch mode runs, whether the side tensor
    landed at one of their addresses (kept as ints: no reference keeps a value alive).

    Were a freed value's address still taken for that value's (a weak reference not
    checked), the side tensor would be credited to act2 and b would not be made opaque (the
    counts may still be right: act2 is earlier, so c's variants restart before b too, which
    is why the test asserts b itself); were the side tensor forgotten as a dropped value's,
    nothing would be, and c's variants would read a's last variant's side tensor."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    torch.manual_seed(0)
    m = _Reuse()
    ptrs: list[int] = []
    box: dict[str, torch.Tensor] = {}
    hits: list[bool] = []
    b, d = m.b, m.d

    def f1(h: torch.Tensor) -> torch.Tensor:
        t = torch.relu(h)
        ptrs[:] = [t.data_ptr()]
        return t

    def f2(t: torch.Tensor) -> torch.Tensor:
        t2 = t * 3
        ptrs.append(t2.data_ptr())
        return t2

    def fb(s: torch.Tensor) -> torch.Tensor:
        box["s"] = s * 2
        if _get_current_dispatch_mode() is not None:  # the effects check's run
            hits.append(box["s"].data_ptr() in ptrs)
        return F.linear(s, b.weight, b.bias)

    m.act.forward, m.act2.forward, m.b.forward = f1, f2, fb
    m.d.forward = lambda g: F.linear(g + box["s"][:, :64], d.weight, d.bias)
    return m, hits


#: name -> (builder, the units drawn)
EFFECTS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "kept-value-read": (_reads_kept, ["a", "c"]),
    "side-list": (_side_list, ["a", "c"]),
    "side-accumulator": (_side_accumulator, ["a", "c"]),
    "float-escape": (_ITEMS, ["a", "c"]),
    "host-numpy": (_NUMPY, ["a", "c"]),
    "equal-escape": (_EQUAL, ["a", "c"]),
    "nonzero-size": (_NONZERO, ["a", "c"]),
    "host-dlpack": (_DLPACK, ["a", "c"]),
    "host-tensor": (_HOST, ["a", "c"]),
    "buffer-traced": (_buffer_channel, ["a", "c"]),
    "buffer-replaced": (_buffer_channel_replaced, ["a", "c"]),
}


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
@pytest.mark.parametrize("name", list(EFFECTS))
def test_effects_check_models_on_cuda_are_opaque_as_on_the_cpu(name: str, fanout: bool) -> None:
    make, units = EFFECTS[name]
    batches = _batches_64()
    cpu_model = make().eval()
    variants = _per_unit(cpu_model, units, n=3)
    _, _, cpu_ev = _run(cpu_model, variants, batches, device="cpu", precision="fp32",
                        fanout=fanout)
    model = make().eval().to(DEVICE)
    plan, res, ev = _run(model, variants, batches, precision="fp32", fanout=fanout)
    assert ev._unseen, _why(plan, f"{name}: nothing made opaque")
    assert ev._unseen == cpu_ev._unseen, (ev._unseen, cpu_ev._unseen)
    want = _naive(make().eval().to(DEVICE), variants, batches)
    _close_to_naive(res.counts, want, exact=not fanout)


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True], ids=["swap", "fan"])
def test_a_side_tensor_at_a_freed_values_address_is_still_tracked(fanout: bool) -> None:
    batches = _batches_64()
    prog = Program(_reused_address()[0])
    b = next(s.index for s in prog.steps if s.target == "b")
    model, hits = _reused_address()
    variants = _per_unit(model, ["a", "c"], n=3)
    model = model.eval().to(DEVICE)
    plan, res, ev = _run(model, variants, batches, precision="fp32", fanout=fanout)
    assert hits, "the effects check did not run"
    if torch.device(DEVICE).type == "cuda":  # the caching allocator reused a freed block
        assert any(hits), hits
    assert b in ev._unseen, (b, ev._unseen, _why(plan))  # the keeper of the side tensor
    ref, _ = _reused_address()
    want = _naive(ref.eval().to(DEVICE), variants, batches)
    _close_to_naive(res.counts, want, exact=not fanout)
