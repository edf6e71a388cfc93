"""Review of `layerfast.Evaluator` as a library: the input forms research code hands it
(DataLoaders, generators, lists, odd label dtypes, odd model outputs, odd variants, one
Evaluator run twice), each compared with a hand-written "reset, forward, count" loop.

Defects pinned here:
- One Evaluator run again after the caller changed the model (a submodule replaced, a
  `forward` swapped in) kept the first run's first-batch checks — above all its verdict that
  the traced program computes the model's forward — so the second run executed an unchecked
  trace and returned another function's counts, silently, baseline row included.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.errors import LayerfastError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models."""


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def _data(n: int = 60) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def _assert_naive(got: torch.Tensor, model: nn.Module, variants: list, batches: list) -> None:
    want = naive_evaluate(model, variants, lambda: batches)
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]]), (got, want)
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-6)


class _TypeBranch(nn.Module):
    """Eager: `out` is a tensor, returned as is. fx: a Proxy is not a tensor, so the traced
    program records `out * 0` — the first-batch trace check exists to catch exactly this."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.lin(h)
        if isinstance(out, torch.Tensor):
            return out
        return out * 0.0


def test_a_reused_evaluator_checks_the_changed_model_again() -> None:
    """Research code builds one Evaluator and runs it after each edit of the model. The
    second run must be the changed model's counts, not those of an unchecked trace."""
    model, batches = _mlp(), _data()
    torch.manual_seed(2)
    variants = [{}, {"1.weight": torch.randn(32, 64)}, {"5.weight": torch.randn(10, 16)}]
    ev = Evaluator(model, variants, device="cpu", precision="fp32")
    _assert_naive(ev.run(batches).counts, model, variants, batches)
    model[3] = _TypeBranch(model[3])  # same state keys under another name: variants untouched
    _assert_naive(ev.run(batches).counts, model, variants, batches)


@pytest.mark.parametrize("names", [["baseline", "fc1@rnd"], [0, 1]])
def test_a_dict_of_named_variants_is_refused_with_the_right_advice(names) -> None:
    model = _mlp()
    named = dict(zip(names, [{}, {"1.weight": torch.randn(32, 64)}], strict=True))
    with pytest.raises(LayerfastError, match=r"list\(variants.values\(\)\)"):
        Evaluator(model, named, device="cpu")


@pytest.mark.parametrize("item", [None, torch.zeros(3), "1.weight", [("1.weight", None)]])
def test_a_variant_that_is_no_mapping_is_refused_when_the_evaluator_is_built(item) -> None:
    with pytest.raises(LayerfastError, match=r"variant 1 must be a mapping .* got "):
        Evaluator(_mlp(), [{}, item], device="cpu")


class _OneLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 1]: a sigmoid binary classifier's logit


@pytest.mark.parametrize("labels", ["zeros", "binary"])
def test_a_one_logit_model_is_refused_as_analyze_refuses_it(labels) -> None:
    torch.manual_seed(0)
    model = _OneLogit()
    x = torch.randn(20, 64)
    y = torch.zeros(20, dtype=torch.long) if labels == "zeros" else torch.arange(20) % 2
    variants = [{}, {"net.2.weight": torch.randn(1, 8)}]
    with pytest.raises(LayerfastError, match=r"1 output: with one class .*torch.cat"):
        Evaluator(model, variants, device="cpu").run([(x, y)])


@pytest.mark.parametrize("counts", [torch.zeros(2, 4), torch.zeros(3), [[0.0] * 4] * 3])
def test_resumed_counts_of_another_shape_are_refused(counts) -> None:
    model, batches = _mlp(), _data()
    ev = Evaluator(model, [{}, {}, {}], device="cpu")
    with pytest.raises(LayerfastError, match=r"counts must be .*\[3, 4\]"):
        ev.run(batches, counts=counts)


class _Shrinking:
    """A re-iterable that gives 10 samples fewer each time it is iterated."""

    def __init__(self, batches: list) -> None:
        self.batches, self.k = batches, 0

    def __iter__(self):
        x, y = (torch.cat(t) for t in zip(*self.batches, strict=True))
        n = x.shape[0] - 10 * self.k
        self.k += 1
        return iter([(x[:n], y[:n])])


def test_passes_over_data_of_another_size_are_refused() -> None:
    model = _mlp()
    torch.manual_seed(3)
    variants = [{}] + [{"3.weight": torch.randn(16, 32)} for _ in range(8)]
    ev = Evaluator(model, variants, device="cpu", stage_bytes=3 * 16 * 32 * 4)
    assert len(ev.passes()) > 1
    with pytest.raises(LayerfastError,
                       match=r"gave \d+ samples in the first of the \d passes .* in pass 2"):
        ev.run(_Shrinking(_data()))
    fixed = ev.run(_data())  # the same batches every pass: fine
    _assert_naive(fixed.counts, model, variants, _data())


@pytest.mark.parametrize("batch", ["dict", "numpy", "x-list"])
def test_a_bad_first_batch_is_the_same_clear_error_with_channels_last(batch) -> None:
    x, y = torch.randn(8, 64), torch.arange(8) % 10
    item = {"dict": {"image": x, "label": y}, "numpy": (x.numpy(), y.numpy()),
            "x-list": ([x], y)}[batch]
    with pytest.raises(LayerfastError, match="each batch must be a pair"):
        Evaluator(_mlp(), [{}], device="cpu", layout="channels_last").run([item])


# ---- what docs/engine.md says the Evaluator takes (passing: pins the documented forms) -----


@pytest.mark.parametrize("form", ["list", "generator", "lists", "int32", "uint8", "empty",
                                  "one-sample", "loader"])
def test_the_documented_batch_forms_give_the_naive_counts(form) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model, batches = _mlp(), _data()
    torch.manual_seed(2)
    variants = [{}, {"1.weight": torch.randn(32, 64)}, {"5.weight": torch.randn(10, 16)}]
    x, y = (torch.cat(t) for t in zip(*batches, strict=True))
    given = {
        "list": batches,
        "generator": (b for b in batches),
        "lists": [list(b) for b in batches],
        "int32": [(a, b.int()) for a, b in batches],
        "uint8": [(a, b.to(torch.uint8)) for a, b in batches],
        "empty": [batches[0], (x[:0], y[:0]), batches[1]],
        "one-sample": [(x[:1], y[:1]), (x[1:], y[1:])],
        "loader": DataLoader(TensorDataset(x, y), batch_size=16),
    }[form]
    got = Evaluator(model, variants, device="cpu", precision="fp32").run(given).counts
    _assert_naive(got, model, variants, batches)


class _Returns(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.fc = how, nn.Linear(64, 12)

    def forward(self, x: torch.Tensor):
        z = self.fc(x)
        if self.how == "tuple":
            return z, z.sum()
        if self.how == "dict":
            return {"logits": z}
        if self.how == "object":
            return type("Out", (), {"logits": z})()
        if self.how == "[B]":
            return z[:, 0]
        return z.view(-1, 3, 2, 2)  # [B, C, H, W]


@pytest.mark.parametrize("how", ["tuple", "dict", "object", "[B]", "[B,C,H,W]"])
def test_outputs_that_are_no_class_scores_are_one_clear_error(how) -> None:
    x, y = torch.randn(8, 64), torch.arange(8) % 3
    with pytest.raises(LayerfastError, match="must return logits shaped"):
        Evaluator(_Returns(how), [{}], device="cpu").run([(x, y)])


@pytest.mark.parametrize("batch", ["float", "onehot", "[B,1]", "dict", "triple"])
def test_batches_that_are_no_pairs_of_integer_labels_are_one_clear_error(batch) -> None:
    x, y = torch.randn(8, 64), torch.arange(8) % 10
    item = {"float": (x, y.float()), "onehot": (x, nn.functional.one_hot(y, 10)),
            "[B,1]": (x, y[:, None]), "dict": {"image": x, "label": y},
            "triple": (x, y, torch.arange(8))}[batch]
    with pytest.raises(LayerfastError, match="labels|pair"):
        Evaluator(_mlp(), [{}], device="cpu").run([item])
