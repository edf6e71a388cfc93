"""`naive_evaluate` gives the caller's model back as it came (session 22): its device, each
module's own training flag, its weights, its gradients — also when the pass raises.

It used to leave the model on the device it moved it to (a notebook's CPU model on the GPU),
set every module to the root's mode afterwards (a frozen eval-mode BN of a train-mode model
came back in train mode), and on an exception left the model in eval mode, on the device, with
the failing variant's weights loaded into the caller's CPU tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import naive_evaluate


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]


def _variant(m: nn.Module) -> dict[str, torch.Tensor]:
    return {"3.weight": torch.zeros_like(m[3].weight), "3.bias": torch.ones_like(m[3].bias)}


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_each_module_keeps_its_own_mode() -> None:
    m = _model().train()
    m[1].eval()  # a frozen BN in a model being trained
    naive_evaluate(m, [_variant(m)], _data)
    assert [x.training for x in m.modules()] == [True, True, False, True, True]


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_a_raising_pass_gives_the_model_back() -> None:
    m = _model()
    m.append(_Boom())
    m.train()
    before = _state(m)
    variant = _variant(m)

    class Arming:  # armed when the variant is loaded: the final model's pass runs first
        def overrides(self) -> dict[str, torch.Tensor]:
            m[4].armed = True
            return variant

    with pytest.raises(RuntimeError, match="boom"):
        naive_evaluate(m, [Arming()], _data)
    assert all(x.training for x in m.modules())
    after = _state(m)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_model_stays_on_its_device_when_the_pass_fails_there() -> None:
    m = _model()
    m[0].weight.grad = torch.ones_like(m[0].weight)
    before, weight = _state(m), m[0].weight
    with pytest.raises(Exception):  # noqa: B017 - a meta pass cannot read its counts back
        naive_evaluate(m, [_variant(m)], _data, device="meta")
    assert m[0].weight is weight
    assert all(t.device.type == "cpu" for t in m.state_dict().values())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m[0].weight.grad is not None and torch.equal(m[0].weight.grad, torch.ones(8, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_model_comes_back_from_cuda_on_the_cpu() -> None:
    m = _model()
    m[0].weight.grad = torch.ones_like(m[0].weight)
    before = _state(m)
    want = naive_evaluate(m, [_variant(m)], _data)
    got = naive_evaluate(m, [_variant(m)], _data, device="cuda")
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    assert all(t.device.type == "cpu" for t in m.state_dict().values())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m[0].weight.grad.device.type == "cpu"
    assert all(x.training for x in m.modules())
