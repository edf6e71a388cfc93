"""CPU-side checks of what matters on a GPU: the engine's hot loop makes no host->device copies
per batch (on CUDA each `torch.tensor(..., device=cuda)` of host data is a synchronous copy, a
host sync that drains the launch queue)."""

from __future__ import annotations

import torch

from layerfast.engine import Evaluator


def test_fanned_row_index_is_built_once_per_pass_not_per_batch(monkeypatch):
    """A unit's fanned group is rarely one run of variant rows (its final-τ reinit is scored
    from the baseline and leaves a gap), so its sums are added with `index_add_`; the index
    tensor used to be made from a Python list for every chunk of every batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))  # fmt: skip
    sd = model.state_dict()
    g = torch.Generator().manual_seed(1)
    draw = {k: torch.randn(v.shape, generator=g) for k, v in sd.items() if k.startswith("1.")}
    # rows 0, 1, 3 override layer 1; row 2 equals the live weights (scored from the baseline)
    variants = [{k: v * s for k, v in draw.items()} for s in (1.0, 2.0)]
    variants += [{k: sd[k].clone() for k in draw}, {k: -v for k, v in draw.items()}]
    x = torch.randn(4 * 8, 1, 4, 4, generator=g)
    y = torch.randint(0, 10, (4 * 8,), generator=g)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]

    built = []
    real = torch.tensor

    def spy(data, *args, **kwargs):
        if isinstance(data, list) and "device" in kwargs:
            built.append(list(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    ev = Evaluator(model, variants, device="cpu", fanout=True, batch_size=8)
    res = ev.run(batches)
    monkeypatch.undo()
    groups = [gr.members for gr in ev.last_plan.groups if gr.fan is not None]
    assert groups == [[0, 1, 3]] and res.plan["fanned_variants"] == 3, (groups, res.plan)
    assert built == [[0, 1, 3]], built  # once, not once per batch (4)
    # and the sums are the swap path's
    ref = Evaluator(model, variants, device="cpu", fanout=False, batch_size=8).run(batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], ref.counts[:, [0, 1, 3]])
