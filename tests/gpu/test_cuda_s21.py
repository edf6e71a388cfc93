"""Session 21's engine changes, checked on a CUDA GPU (every test here is `cuda`: skipped
without one; `scripts/gpu_session.sh`'s cuda-new-tests step runs them).

1. A reused `Evaluator` runs the first-batch checks again on each `run`: after the caller
   replaced a submodule with one fx traces wrongly, the second run must give the changed
   model's naive counts — on CUDA in fp32, and in bf16 where the default layout is
   channels_last (the trace check then runs on the converted model).
2. The channels_last layout probe (CUDA's bf16/tf32 default) refuses a first batch that is no
   (x, y) pair with the clear pair error, not a KeyError.
3. A multi-pass run over data that gives another number of samples in a later pass is refused
   on CUDA too (the check reads sample counts on the host: no extra sync per batch).
4. A one-logit model is refused by the Evaluator on CUDA as analyze refuses it.

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"`, no markers and the CPU naive loop (6 passed in 3 s;
with the session-21 engine fixes reverted, 4 of them fail: 1, 3, 4 and 1's bf16 case — 2's
CPU copy passes either way, as the CPU's bf16 default layout is contiguous).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.errors import LayerfastError
from tests.engine.test_evaluator_api_review import _data, _mlp, _OneLogit, _Shrinking, _TypeBranch
from tests.gpu.test_cuda_s20 import _naive

DEVICE = "cuda"


def _conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def _images(n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


@pytest.mark.cuda
def test_a_reused_evaluator_checks_the_changed_model_again_fp32() -> None:
    model, batches = _mlp(), _data()
    torch.manual_seed(2)
    variants = [{}, {"1.weight": torch.randn(32, 64)}, {"5.weight": torch.randn(10, 16)}]
    ev = Evaluator(model, variants, device=DEVICE, precision="fp32")
    first = ev.run(batches).counts.cpu()
    assert torch.equal(first[:, [0, 1, 3]], _naive(model, variants, batches)[:, [0, 1, 3]].cpu())
    model[3] = _TypeBranch(model[3])
    second = ev.run(batches)
    want = _naive(model, variants, batches).cpu()
    assert torch.equal(second.counts.cpu()[:, [0, 1, 3]], want[:, [0, 1, 3]]), second.plan
    torch.testing.assert_close(second.counts.cpu()[:, 2], want[:, 2], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_a_reused_evaluator_checks_the_changed_model_again_bf16_channels_last() -> None:
    """bf16 on CUDA runs channels_last by default (asked for here, so the CPU copy runs it
    too): the second run's trace check must see the replaced submodule there. bf16 is compared with bf16 runs of a fresh Evaluator on the
    changed model (the engine against itself, both checked), not with fp32."""
    model, batches = _conv(), _images()
    torch.manual_seed(2)
    variants = [{}, {"0.weight": torch.randn(8, 1, 3, 3)}, {"6.weight": torch.randn(10, 512)}]
    ev = Evaluator(model, variants, device=DEVICE, precision="bf16", layout="channels_last")
    ev.run(batches)
    model[4] = _TypeBranch(model[4])
    second = ev.run(batches).counts.cpu()
    fresh = Evaluator(model, variants, device=DEVICE, precision="bf16",
                      layout="channels_last").run(batches).counts.cpu()
    assert torch.equal(second, fresh)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", ["dict", "numpy"])
def test_a_bad_first_batch_is_the_pair_error_under_cudas_default_layout(batch) -> None:
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    item = {"dict": {"image": x, "label": y}, "numpy": (x.numpy(), y.numpy())}[batch]
    with pytest.raises(LayerfastError, match="each batch must be a pair"):
        Evaluator(_conv(), [{}], device=DEVICE, precision="bf16").run([item])


@pytest.mark.cuda
def test_passes_over_data_of_another_size_are_refused_on_cuda() -> None:
    model = _mlp()
    torch.manual_seed(3)
    variants = [{}] + [{"3.weight": torch.randn(16, 32)} for _ in range(8)]
    ev = Evaluator(model, variants, device=DEVICE, precision="fp32", stage_bytes=3 * 16 * 32 * 4)
    assert len(ev.passes()) > 1
    with pytest.raises(LayerfastError, match=r"gave \d+ samples in the first"):
        ev.run(_Shrinking(_data()))
    got = ev.run(_data()).counts.cpu()
    want = _naive(model, variants, _data()).cpu()
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])


@pytest.mark.cuda
def test_a_one_logit_model_is_refused_on_cuda() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(20, 64), torch.zeros(20, dtype=torch.long)
    with pytest.raises(LayerfastError, match=r"1 output: with one class"):
        Evaluator(_OneLogit(), [{}, {"net.2.weight": torch.randn(1, 8)}],
                  device=DEVICE).run([(x, y)])
