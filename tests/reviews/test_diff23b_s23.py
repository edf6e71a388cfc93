"""Review of session 23's later changes (diff23b).

1. `bench.naive_pass` under a caller's autocast: the loop loads each variant into the model's
   own tensors under `no_grad` (grad mode on, not `inference_mode`), where autocast keeps the
   bf16 casts of leaf parameters for the whole region, so every variant was counted with the
   casts of the first forward's weights ([11, 11, 11] for three different models on 200
   digits); `engine.naive` was fixed for the same in c30cbe7. Each variant now reads its own
   weights, and the caller's model its own after the loop.
2. `naive_evaluate`'s reference pass under a caller's autocast holding casts older than the
   weights (below).
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


def test_naive_evaluate_reads_the_final_models_current_weights_under_autocast() -> None:
    """2. `naive_evaluate` under a caller's autocast that cast the weights before they last
    changed in place (the caller's forward, then an in-place change or `load_state_dict`): the
    reference predictions read those old casts while each variant, loaded after a clear of the
    cache (c30cbe7), read fresh ones, so the final model agreed with itself on 10 of 64 samples.
    The loop now clears the cache before its reference pass too."""
    from layerfast.engine.naive import naive_evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 4, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            model(x)  # the caller's forward: autocast keeps the weights' casts
            model[1].weight.mul_(-1)  # then the caller changes them in place
        got = naive_evaluate(model, [{}], lambda: [(x, y)])
    assert got[0, 3] == 64  # the model as it is agrees with itself on every sample
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a region of its own: no old casts
        assert torch.equal(got, naive_evaluate(model, [{}], lambda: [(x, y)]))
