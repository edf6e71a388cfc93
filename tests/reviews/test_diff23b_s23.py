"""Review of session 23's later changes (diff23b).

1. `bench.naive_pass` under a caller's autocast: the loop loads each variant into the model's
   own tensors under `no_grad` (grad mode on, not `inference_mode`), where autocast keeps the
   bf16 casts of leaf parameters for the whole region, so every variant was counted with the
   casts of the first forward's weights ([11, 11, 11] for three different models on 200
   digits); `engine.naive` was fixed for the same in c30cbe7. Each variant now reads its own
   weights, and the caller's model its own after the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from layerfast.bench import naive_pass
from layerfast.data import open_data


class _Variant:
    def __init__(self, overrides: dict[str, torch.Tensor]) -> None:
        self._ov = overrides

    def overrides(self) -> dict[str, torch.Tensor]:
        return self._ov


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(3)
    head2 = torch.zeros(10)
    head2[2] = 9.0  # every sample predicted as class 2
    variants = [_Variant({}), _Variant({"3.weight": torch.zeros(10, 64), "3.bias": head2}),
                _Variant({"1.weight": torch.randn(64, 64, generator=g)})]
    return model, variants, open_data("digits", split="test", max_samples=200)


def test_bench_naive_pass_under_autocast_reads_each_variants_weights() -> None:
    model, variants, src = _case()
    cpu = torch.device("cpu")
    want = []
    for v in variants:  # each variant alone, in an autocast region (a cache) of its own
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want += naive_pass(model, [v], src, cpu, 64)[2]
    assert want[1] == int((src.labels() == 2).sum())  # the head says class 2
    assert len(set(want)) == 3, want
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = naive_pass(model, variants, src, cpu, 64, warmup=True)[2]
        assert got == want
        # and the caller's model reads its own (restored) weights afterwards, in the same region
        assert naive_pass(model, [variants[0]], src, cpu, 64)[2] == want[:1]
