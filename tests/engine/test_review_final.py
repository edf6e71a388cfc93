"""Review 3 (s15) of definition_id, the first batch's cuts/mixing check and train's probe."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.errors import LayerfastError
from layerfast.models.identity import definition_id
from tests.engine.test_engine_batch_dim_zoo import _oom_once, _variants


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread."""


def _user_module(tmp_path, name: str, src: str):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
        return sys.modules[name]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "body",
    [
        "raise RuntimeError('working outside of a context')",  # an unbound LocalProxy
        "return Proxy()",  # a lazy config: every attribute another proxy
    ],
)
def test_definition_id_survives_a_proxy_global(tmp_path, body: str):
    """Got: RuntimeError / RecursionError from `definition_id` (analyze crashes)."""
    mod = _user_module(
        tmp_path,
        "proxy_arch",
        f"""
        from torch import nn

        class Proxy:
            def __getattr__(self, name):
                {body}

        current = Proxy()

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                if isinstance(current, Proxy):
                    pass
                return self.fc(x)
    """,
    )
    assert len(definition_id(mod.Net())) == 16


def test_definition_id_sees_a_global_callable_objects_code(tmp_path):
    """`ACT = Swish(1.0)` at module level, called by the forward: editing Swish's code (to a
    ReLU) or its argument was not seen (the same digest: the old model's results resumed)."""
    src = """
        import torch
        from torch import nn

        class Swish:
            def __init__(self, beta):
                self.beta = beta

            def __call__(self, x):
                return BODY

        ACT = Swish(BETA)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return ACT(self.fc(x))
    """
    a = _user_module(
        tmp_path,
        "act_arch",
        src.replace("BODY", "x * torch.sigmoid(self.beta * x)").replace("BETA", "1.0"),
    )
    b = _user_module(
        tmp_path, "act_arch", src.replace("BODY", "torch.relu(x)").replace("BETA", "1.0")
    )
    c = _user_module(
        tmp_path,
        "act_arch",
        src.replace("BODY", "x * torch.sigmoid(self.beta * x)").replace("BETA", "5.0"),
    )
    ids = {definition_id(m.Net()) for m in (a, b, c)}
    assert len(ids) == 3


class BatchMax(nn.Module):
    """Scaled by the batch's max: its outputs depend on which samples share a batch; a batch
    repeated to 8 rows and 3 or 4 of them holding every distinct sample have the same max."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.fc(torch.relu(self.b(h)) * h.max(0).values)


@pytest.mark.parametrize("first", [2, 3])
def test_a_batch_max_model_is_mixing_from_a_small_first_batch(monkeypatch, first: int):
    """First batch of 2 or 3 samples, then an out-of-memory back-off on a batch of 16: got
    other counts than the naive loop, no error (mixing False)."""
    torch.manual_seed(0)
    model = BatchMax().eval()
    x, y = torch.randn(first + 32, 12), torch.randint(0, 10, (first + 32,))
    batches = [
        (x[:first], y[:first]),
        (x[first : first + 16], y[first : first + 16]),
        (x[first + 16 :], y[first + 16 :]),
    ]
    variants = _variants(model)
    want = naive_evaluate(model, variants, lambda: batches)
    fired = _oom_once(
        monkeypatch, lambda start, rows, keep: start > 0 and keep is None and rows == 16
    )
    ev = Evaluator(model, variants, device="cpu", precision="fp32")
    try:
        got = ev.run(batches).counts
    except LayerfastError:
        return  # refusing to cut its batches is an answer
    assert fired["n"] == 1
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]]), (got - want)[:, [0, 1, 3]]


class NeedsTwo(nn.Module):
    """Row-local, but takes no batch of one sample (`chunk(2)` gives one piece)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.a, self.fc = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.relu(self.a(torch.tanh(self.pre(x)))).chunk(2, 0)
        return self.fc(torch.cat([p, q], 0))


def test_a_swap_back_off_does_not_leave_a_piece_of_one(monkeypatch):
    """After a back-off to 8 rows, a later batch of 9 was cut 8 + 1 (not 5 + 4): got the
    model's own IndexError (one chunk, not two) as an internal error, where the naive loop runs."""
    torch.manual_seed(0)
    model = NeedsTwo().eval()
    x, y = torch.randn(25, 12), torch.randint(0, 10, (25,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    variants = _variants(model)
    want = naive_evaluate(model, variants, lambda: batches)
    _oom_once(monkeypatch, lambda start, rows, keep: start > 0 and keep is None and rows == 16)
    ev = Evaluator(model, variants, device="cpu", precision="fp32", fanout=False, stage_bytes=1)
    got = ev.run(batches).counts
    assert torch.equal(got[:, [0, 1, 3]], want[:, [0, 1, 3]])


class CountingNoCopy(nn.Module):
    """A step counter outside the state dict, and no deepcopy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.steps = 0

    def __deepcopy__(self, memo):
        raise TypeError("cannot be copied")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
        return self.fc(x.flatten(1))


def test_the_probe_puts_back_a_counter_of_a_model_it_cannot_copy():
    """Got steps == 1 after the probe: the seeded run starts one step on (the copy's fallback
    restores the state dict and modes only)."""
    from layerfast.data import open_data
    from layerfast.train import _probe

    src = open_data("digits", split="train", max_samples=64)
    model = CountingNoCopy()
    _probe(model, "counting", src, 16)
    assert model.steps == 0
