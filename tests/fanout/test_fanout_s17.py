"""Fan-out defects found by a randomized differential test (review s17, fan-out on the CPU).

Each test compares `Evaluator(fanout=True)` under every glue mode with the naive loop (a deep
copy per variant, `load_state_dict`, full forward) and fails on the code it was found in.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanrun import GLUE_MODES
from tests.engine.test_engine_fuzz2 import _naive  # eager logits of each variant, one by one


def _engine(model: nn.Module, variants: list[dict], x, y, **kw) -> torch.Tensor:
    got: dict[int, torch.Tensor] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got[r] = lg

    Evaluator(model, variants, device="cpu", precision="fp32", **kw).run([(x, y)], on_logits=hook)
    return torch.stack([got[i] for i in range(len(variants))])


class ProjectedToken(nn.Module):
    """A learned token through the unit under study, added to per-sample features."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 8))
        self.enc = nn.Linear(12, 8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        f = self.enc(x.flatten(1)).unsqueeze(1)  # [B, 1, D]
        h = f + self.proj(self.tok)  # [B, 1, D] + [1, D]
        return self.fc(h[:, 0])


@pytest.mark.parametrize("glue", GLUE_MODES)
def test_a_unit_applied_to_a_parameter_is_not_fanned_wrongly(glue: str) -> None:
    """`self.proj(self.tok)` reads no sample: fanned, its K outputs became a [K, D] "batch"
    that broadcast against the [B, 1, D] features to [K·B, K, D], and `h[:, 0]` gave every
    variant variant 0's token — logits off by ~7, silently (no fallback). Such a unit must
    take the swap path (or be fanned correctly)."""
    torch.manual_seed(0)
    model = ProjectedToken().eval()
    x, y = torch.randn(6, 12), torch.randint(0, 10, (6,))
    sd = model.state_dict()
    variants = [
        {k: sd[k] + torch.randn_like(sd[k]) for k in ("proj.weight", "proj.bias")}
        for _ in range(3)
    ]
    ref = _naive(model, variants, x)
    got = _engine(model, variants, x, y, fanout=True, glue=glue)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
