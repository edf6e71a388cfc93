"""`naive_evaluate` (the reference loop) under a caller's autocast (session 23). With grad mode
on (the loop runs under `no_grad`, not `inference_mode`), autocast keeps the bf16 casts of leaf
parameters for the whole region, so after the loop loaded a variant into the model's own
tensors every forward still read the casts made before it: a bf16 reference check got the final
model's counts for every variant, silently (seen on a ResNet-20 study: three different variants
at one error, 48.34%). Each variant now reads its own weights."""

from __future__ import annotations

import torch
from torch import nn

from layerfast.engine.naive import naive_evaluate


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 4, (64,), generator=g)
    variants = [{}, {"1.weight": torch.randn(32, 16, generator=g)},
                {"3.weight": torch.zeros(4, 32), "3.bias": torch.tensor([0.0, 0.0, 9.0, 0.0])}]
    return model, variants, lambda: [(x[:32], y[:32]), (x[32:], y[32:])]


def _per_variant_bf16(model, variants, batches) -> list[float]:
    """Each variant in an autocast region of its own (a fresh cache), correct@1."""
    state = {k: t.clone() for k, t in model.state_dict().items()}
    out = []
    with torch.no_grad():
        for v in variants:
            model.load_state_dict(v, strict=False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out.append(float(sum(int((model(x).argmax(1) == y).sum()) for x, y in batches())))
            model.load_state_dict(state)
    return out


def test_naive_evaluate_under_autocast_reads_each_variants_weights() -> None:
    model, variants, batches = _case()
    want = _per_variant_bf16(model, variants, batches)
    assert want[2] == sum(int((y == 2).sum()) for _, y in batches())  # the head says class 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = naive_evaluate(model, variants, batches)
    assert got[:, 0].tolist() == want
    # and the caller's model reads its own weights afterwards in the same region
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        before = model(batches()[0][0])
        naive_evaluate(model, variants, batches)
        assert torch.equal(model(batches()[0][0]), before)
