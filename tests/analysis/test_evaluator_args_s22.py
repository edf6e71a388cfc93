"""`Evaluator`'s public arguments (session 22): a callback that is no function, an interval or
a start that is no number, and an empty variant list are refused before any work, with one
message naming the argument. Each test failed on 449832c."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerfast import Evaluator
from layerfast.errors import LayerfastError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("name", ["on_progress", "on_checkpoint", "on_logits"])
@pytest.mark.parametrize("value", [5, "print"])
def test_a_callback_that_is_no_function_is_refused_before_the_pass(name, value):
    """`on_progress=5` ran the first batch and then died in "'int' object is not callable"."""
    seen = []
    data = (b for b in _data() if not seen.append(b))  # records what the pass read
    with pytest.raises(LayerfastError, match=f"{name} must be a function or None"):
        Evaluator(_model(), [{}], device="cpu").run(data, **{name: value})
    assert seen == []


@pytest.mark.parametrize("every", ["x", "5", -1, float("nan"), True, None])
@pytest.mark.parametrize("with_callback", [False, True])
def test_a_checkpoint_interval_that_is_no_seconds_count_is_refused(every, with_callback):
    """`checkpoint_every="x"` was ignored without `on_checkpoint` and, with it, a TypeError
    ('>=' not supported) at the first batch; -1 and NaN ran."""
    cb = {"on_checkpoint": lambda c, n: None} if with_callback else {}
    with pytest.raises(LayerfastError, match="checkpoint_every must be a number of seconds"):
        Evaluator(_model(), [{}], device="cpu").run(_data(), checkpoint_every=every, **cb)


@pytest.mark.parametrize("start", [-3, 1.5, "x", True, None])
def test_a_start_that_is_no_sample_count_is_refused(start):
    """`start="x"` was said to need a DataSource; with one, True skipped a sample."""
    with pytest.raises(LayerfastError, match="start must be an integer >= 0"):
        Evaluator(_model(), [{}], device="cpu").run(_data(), start=start)


def test_good_arguments_still_run_and_call_back():
    import numpy as np

    saves, seen = [], []
    res = Evaluator(_model(), [{}], device="cpu").run(
        _data(), start=np.int64(0), on_progress=seen.append,
        on_checkpoint=lambda c, n: saves.append(n), checkpoint_every=math.inf)
    assert res.n == 10 and seen == [5, 10] and saves == [10]  # inf: at the end only
    saves.clear()
    Evaluator(_model(), [{}], device="cpu").run(
        _data(), on_checkpoint=lambda c, n: saves.append(n), checkpoint_every=0)
    assert saves == [5, 10, 10]


@pytest.mark.parametrize("variants", [[], {}, ()])
def test_an_empty_variant_list_is_refused(variants):
    """`Evaluator(model, [])` (and `{}`, the final model given bare instead of as `[{}]`) ran
    a whole data pass and returned [0, 4] counts: nothing evaluated, exit 0."""
    with pytest.raises(LayerfastError, match=r"variants is .*nothing to evaluate; pass \[\{\}\]"):
        Evaluator(_model(), variants, device="cpu")


def test_the_final_model_alone_is_one_row():
    res = Evaluator(_model(), [{}], device="cpu").run(_data())
    assert tuple(res.counts.shape) == (1, 4) and res.n == 10


@pytest.mark.parametrize("spec", ["empty.npz", "synthetic:cifar:0"])
def test_the_cli_on_an_empty_data_set_is_one_line_exit_2(ckpts, tmp_path, spec, capsys):
    """A check, not a fix (it passed on 449832c): the CLI's path for an empty data set (an
    empty empty.npz) refuses it before the pass, one line, exit 2, nothing written; an empty
    iterable given to `Evaluator.run` is refused after its (empty) pass."""
    import numpy as np

    from layerfast.cli import main

    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32),
             y=np.zeros((0,), np.int64))
    data = str(tmp_path / spec) if spec.endswith(".npz") else spec
    rc = main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ckpts), "--data", data,
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "empty" in err or "must be positive" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(LayerfastError, match="the data is empty"):
        Evaluator(_model(), [{}], device="cpu").run([])
