"""Defects found by an independent oracle (a from-scratch "reset, forward, count" loop compared
with `layerfast analyze` over a matrix of architectures, unit granularities, BN policies, reset
kinds, data sets and batch sizes). Everything else the oracle compared agreed; these tests pin
what did not.
"""

from __future__ import annotations

import math

import torch

from layerfast import ops


def _score(logits: list[list[float]], labels: list[int], reference: bool = False) -> torch.Tensor:
    """`score_` (or its pure-torch reference) on one variant: [correct@1, correct@5, loss, agree]."""
    x = torch.tensor([logits], dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    pred = x[0].argmax(1)
    acc = torch.zeros(1, 4, dtype=torch.float64)
    (ops.score_reference if reference else ops.score_)(x, y, pred, acc)
    return acc[0]


def test_nan_logits_are_not_top5_correct() -> None:
    """A NaN logit must rank the same way for top-5 as it does for top-1.

    Why: correct@1 takes the argmax with NaN counted as maximal (first NaN index wins, as
    `torch.argmax`), but correct@5 counted a sample when fewer than 5 logits are strictly
    `>` its label's, and every comparison with NaN is false. So a sample whose logits are all
    NaN (a reset that overflows the network: reinit to a diverging checkpoint) was top-5
    correct whatever its label, and a variant whose every logit is NaN reported
    `top5_error = 0.0` -- perfect -- next to a top-1 error of ~0.9 (seen end to end:
    `layerfast analyze --arch tienet:plain` with a checkpoint whose first layer's bias is 3e38,
    360 digits samples: error 0.889, top5_error 0.0). Likewise a finite label logit with 5 or
    more NaN logits above it (by argmax's own order) was counted top-5 correct.

    Expected, with argmax's order (NaN above every number, earlier index first among NaNs):
    all-NaN row, label 7: not in the top 5 (the top 5 are classes 0..4); label 3: in it;
    label 0 is top-1 correct, so top-5 correct too.
    """
    nan = math.nan
    all_nan = [[nan] * 10] * 3
    for reference in (False, True):
        got = _score(all_nan, [7, 3, 0], reference)
        assert got[0].item() == 1.0  # only label 0 is the argmax (first NaN)
        assert got[1].item() == 2.0, (reference, got)  # labels 3 and 0; not 7
        # six NaN logits rank above a finite label logit: not top-5
        row = [nan] * 6 + [0.0, 0.0, 0.0, 1.0]
        got = _score([row], [9], reference)
        assert got[0].item() == 0.0
        assert got[1].item() == 0.0, (reference, got)


def test_an_all_nan_variant_is_top5_correct_only_for_the_first_five_labels() -> None:
    """End to end: the engine and the naive loop agree on a variant whose logits are all NaN
    (a linear layer reset to an overflowing bias), and neither counts it top-5 correct."""
    from torch import nn

    from layerfast.engine import Evaluator
    from layerfast.engine.naive import naive_evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 10))
    x, y = torch.randn(40, 6), torch.arange(40) % 10
    nan_head = {"2.weight": torch.full((10, 8), math.inf), "2.bias": torch.full((10,), -math.inf)}
    variants = [{}, nan_head]
    got = Evaluator(model, variants, device="cpu").run([(x, y)]).counts
    want = naive_evaluate(model, variants, lambda: [(x, y)])
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])
    logits = torch.func.functional_call(model, nan_head, (x,))
    assert logits.isnan().all()  # inf·relu(h) − inf: every logit NaN
    assert got[1, 1].item() == (y < 5).sum().item() == 20  # labels 0..4 only, not all 40
    assert got[1, 0].item() == (y == 0).sum().item()  # argmax: the first NaN, class 0
