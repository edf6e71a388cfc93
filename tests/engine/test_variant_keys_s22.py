"""A variant whose keys carry DataParallel's / DDP's `module.` prefix (session 22).

Checkpoint keys lose the prefix (`checkpoints.keymap`); a variant given as a mapping is taken
as it is, since a model may own a submodule called `module`. Such a variant must never run as
a no-op: `Evaluator` refused it as "unknown keys" without saying why, and `naive_evaluate`
ended in a bare KeyError. Both now refuse it with one LayerfastError that names the prefix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.errors import LayerfastError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]


def _ddp_variant(m: nn.Module) -> dict[str, torch.Tensor]:
    return {f"module.{k}": torch.zeros_like(t) for k, t in m.state_dict().items()
            if k.startswith("2.")}


def test_evaluator_names_the_prefix() -> None:
    m = _model()
    with pytest.raises(LayerfastError, match=r"unknown keys \['module\.2\.weight', "
                       r"'module\.2\.bias'\] \(a DataParallel/DDP state dict's keys: strip "
                       r"their leading 'module\.'\)"):
        Evaluator(m, [_ddp_variant(m)], device="cpu").run(_data())


def test_naive_loop_refuses_it_as_the_evaluator_does() -> None:
    m = _model()
    with pytest.raises(LayerfastError, match=r"variant 0 does not fit the model: unknown keys "
                       r".*strip their leading 'module\.'"):
        naive_evaluate(m, [_ddp_variant(m)], _data)


def test_a_wrapped_model_is_named_too() -> None:
    m = _model()
    plain = {k: torch.zeros_like(t) for k, t in m.state_dict().items() if k.startswith("2.")}
    with pytest.raises(LayerfastError, match=r"pass model\.module"):
        Evaluator(nn.DataParallel(m), [plain], device="cpu").run(_data())


def test_a_model_whose_own_submodule_is_called_module_takes_its_keys() -> None:
    m = nn.Sequential()
    m.add_module("module", _model())  # `module.` is this model's own key prefix: not stripped
    v = {k: torch.zeros_like(t) for k, t in m.state_dict().items() if k.startswith("module.2.")}
    got = Evaluator(m, [{}, v], device="cpu").run(_data()).counts
    want = naive_evaluate(m, [{}, v], _data)
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    assert not torch.equal(want[0], want[1])  # the variant was not a no-op


def test_other_unknown_keys_get_no_hint() -> None:
    m = _model()
    with pytest.raises(LayerfastError, match=r"unknown keys \['fc\.weight'\]$"):
        Evaluator(m, [{"fc.weight": torch.zeros(3, 8)}], device="cpu").run(_data())
