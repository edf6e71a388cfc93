"""Models whose parameters cross unit boundaries (a module registered in two places, tied
tensors, a module called twice): a unit resets every tensor it holds, and the engine's counts
equal the naive loop's."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.engine.evaluator import Evaluator
from layerfast.engine.naive import naive_evaluate
from layerfast.units import make_units, tied_across_units


def _batches(n: int = 40, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[:24], y[:24]), (x[24:], y[24:])]


def _unit_variants(model: nn.Module, units, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Two fresh draws of every key of each unit, one variant each."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    return [{k: torch.randn(sd[k].shape, generator=g) * 2 for k in u.keys}
            for u in units for _ in range(2)]


class _SharedEncoder(nn.Module):
    """`dec` holds the module `enc` as its first layer: one Linear, two names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Sequential(self.enc, nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


class _OnlyShared(nn.Module):
    """The top-level child `again` holds nothing but a module `enc` registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.again = nn.Sequential(self.enc, nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.again(torch.relu(self.enc(x))))


def test_block_holds_a_module_another_block_registered_first() -> None:
    """Block/stage selected owners by their first name only: the block `dec` left out its
    own `dec.0` (the shared `enc`), although `--units dec` selects it, so resetting `dec`
    reset only `dec.2` and the row measured less than the block."""
    torch.manual_seed(0)
    model = _SharedEncoder().eval()
    for g in ("block", "stage"):
        units = {u.name: u for u in make_units(model, granularity=g)}
        assert set(units) == {"enc", "dec"}
        assert units["dec"].keys == ("dec.0.weight", "dec.0.bias", "dec.2.weight", "dec.2.bias")
        assert units["dec"].modules == ("dec.0", "dec.2")
        # one tensor in two units, under two names: said, as for tied weights
        assert any("enc and dec" in line for line in tied_across_units(model, list(units.values())))
    units = make_units(model, granularity="block")
    variants = _unit_variants(model, units)
    batches = _batches()
    res = Evaluator(model, variants, device="cpu", precision="fp32").run(batches)
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(res.counts[:, [0, 1, 3]], want[:, [0, 1, 3]])
    # what the naive loop does with every state-dict key under the prefix `dec.`
    sd = model.state_dict()
    g = torch.Generator().manual_seed(5)
    whole = {k: torch.randn(sd[k].shape, generator=g) * 2 for k in sd if k.startswith("dec.")}
    ours = {k: whole[k] for k in {u.name: u for u in units}["dec"].keys}
    assert torch.equal(naive_evaluate(model, [whole], lambda: batches),
                       naive_evaluate(model, [ours], lambda: batches))


def test_top_level_child_holding_only_a_shared_module_is_a_unit() -> None:
    """A top-level child whose only state is a module registered first elsewhere got no
    block at all: silently missing from the results."""
    units = make_units(_OnlyShared(), granularity="block")
    assert [(u.name, u.keys) for u in units] == [
        ("enc", ("enc.weight", "enc.bias")),
        ("again", ("again.0.weight", "again.0.bias")),
        ("head", ("head.weight", "head.bias")),
    ]


class _TiedHead(nn.Module):
    """An LM-style head: `fc.weight` IS `embed.weight` (tied after construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mid = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 32)
        self.fc.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed((x.flatten(1).abs() * 8).long().clamp(max=31)).mean(1)
        return self.fc(torch.relu(self.mid(h)))[:, :10]


def test_checkpoint_with_two_values_for_one_tied_tensor_is_refused_up_front(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file holding `embed.weight` and `fc.weight` with different values (saved untied) was
    refused only by a fullmodel variant at evaluation; a reinit-only run went through, the
    final model holding the last name's value and each unit's reset its own name's value, so
    `embed` reset to the final τ was not the baseline (delta_error ≠ 0)."""
    import layerfast
    from layerfast.errors import LayerfastError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    sds = {}
    for t in range(3):
        sd = {k: v.clone() for k, v in _TiedHead().state_dict().items()}
        sd["fc.weight"] = sd["fc.weight"] + 1.0  # its own tensor, another value
        sds[t] = sd
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 10, (60,), generator=g)
    out = tmp_path / "out"
    with pytest.raises(LayerfastError, match="two different values for one tied tensor"):
        layerfast.analyze(_TiedHead, sds, data=(x.numpy(), y.numpy()), out=out,
                          reset="reinit", device="cpu", progress=False, figures=False)
    assert not out.exists() or not any(out.iterdir())
    # saved tied (one value), the same run goes through
    for sd in sds.values():
        sd["fc.weight"] = sd["embed.weight"]
    a = layerfast.analyze(_TiedHead, sds, data=(x.numpy(), y.numpy()), out=out, reset="reinit",
                          device="cpu", progress=False, figures=False)
    final = a.table[(a.table.kind == "reinit") & (a.table.checkpoint == 2)]
    assert (final.delta_error == 0).all()
