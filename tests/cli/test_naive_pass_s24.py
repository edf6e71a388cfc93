"""`layerfast.bench.naive_pass` from Python: the caller's model is given back as it came on an
error, and the loop runs fp32 under a caller's autocast (session 24).

Defects: (a) a variant whose forward raised left its weights loaded in the caller's model (no
try/finally around the load); (b) under a caller's `torch.autocast`, the "fp32" naive loop (its
docstring, `bench --help`) ran the caller's bfloat16. Now the model's tensors are restored on
any exception, and the loop runs with autocast disabled for its device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.bench import naive_pass
from tests.reviews.test_diff23b_s23 import _case, _Variant


def test_a_variant_that_raises_leaves_the_model_as_it_came() -> None:
    model, variants, src = _case()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(module: nn.Module, args: tuple) -> None:
        if bool((module.bias == 9.0).any()):  # the variant's head is loaded
            raise RuntimeError("the variant's forward fails")

    model[3].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="the variant's forward fails"):
        naive_pass(model, variants, src, torch.device("cpu"), 64)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_variant_that_does_not_fit_leaves_the_model_as_it_came() -> None:
    """load_state_dict copies the tensors that fit before it raises for the one that does not."""
    model, _, src = _case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _Variant({"1.weight": torch.ones(64, 64), "3.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        naive_pass(model, [bad], src, torch.device("cpu"), 64)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_naive_loop_runs_fp32_under_a_callers_autocast() -> None:
    model, variants, src = _case()
    seen: list[torch.dtype] = []
    model[3].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    cpu = torch.device("cpu")
    plain = naive_pass(model, variants, src, cpu, 64)[2]
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = naive_pass(model, variants, src, cpu, 64, warmup=True)[2]
        assert torch.is_autocast_enabled("cpu")  # the caller's region is still on after it
    assert set(seen) == {torch.float32}, seen
    assert under == plain

