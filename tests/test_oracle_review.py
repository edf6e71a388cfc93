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
