"""Extreme and degenerate values end to end (review of NaN/Inf/huge/tied logits and weights).

Each test is a defect found by that review and fails on the code it was found in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.cli import main
from layerfast.errors import LayerfastError
from layerfast.models import build_model

ARCH = "fcn1x8"  # fc1: Linear(4, 8) -> relu -> fc2: Linear(8, 10), for npz x of shape [N, 4]


def _separable(tmp: Path, n: int = 60) -> tuple[Path, np.ndarray]:
    """An npz whose labels a 1x8 FCN fits exactly (y = argmax W x), and that W."""
    g = np.random.default_rng(1)
    w = g.standard_normal((10, 4)).astype(np.float32)
    x = g.standard_normal((n, 4)).astype(np.float32)
    np.savez(tmp / "d.npz", x=x, y=(x @ w.T).argmax(1).astype(np.int64))
    return tmp / "d.npz", w


def _final(w: np.ndarray) -> dict[str, torch.Tensor]:
    """fc2(relu(fc1 x)) = W x exactly: fc1 = [I; -I], fc2 = [W, -W]: error 0 on `_separable`."""
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in build_model(ARCH, 10, (1, 1, 4))[0].state_dict().items()}
    eye, wt = torch.eye(4), torch.from_numpy(w)
    sd.update({"fc1.weight": torch.cat([eye, -eye]), "fc1.bias": torch.zeros(8),
               "fc2.weight": torch.cat([wt, -wt], 1), "fc2.bias": torch.zeros(10)})
    return sd


def _init() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return dict(build_model(ARCH, 10, (1, 1, 4))[0].state_dict())


# ---------------------------------------------- a float64 weight beyond float32's range


def _overflowing_dir(tmp: Path) -> tuple[Path, Path]:
    data, w = _separable(tmp)
    ck = tmp / "ck"
    ck.mkdir()
    t0 = {k: v.double() for k, v in _init().items()}
    t0["fc1.weight"] = torch.full((8, 4), 1e300, dtype=torch.float64)  # finite in float64 only
    torch.save(t0, ck / "epoch_000.pt")
    torch.save(_final(w), ck / "epoch_001.pt")
    return ck, data


def test_a_float64_weight_that_overflows_float32_is_refused_as_inf(tmp_path: Path) -> None:
    """The NaN/Inf check ran on the stored float64 values, which are finite; the model holds
    them cast to float32, where 1e300 is inf. Such a checkpoint was evaluated as inf weights."""
    ck, _ = _overflowing_dir(tmp_path)
    d = CheckpointDir(ck)
    with pytest.raises(LayerfastError, match=r"epoch_000\.pt.*fc1\.weight"):
        d.validate(build_model(ARCH, 10, (1, 1, 4))[0].state_dict())


def test_analyze_with_a_float64_overflow_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end it was a matplotlib OverflowError traceback (exit 1) from distances.png,
    after results.csv had reported the inf-weight variants."""
    ck, data = _overflowing_dir(tmp_path)
    rc = main(["analyze", "--arch", ARCH, "--ckpts", str(ck), "--data", str(data),
               "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "NaN or Inf" in err and "fc1.weight" in err


# ---------------------------------------------- top-5 with tied logits (a constant output)


@pytest.mark.parametrize("value", [0.0, 1e38, float("inf")])
def test_top5_of_an_all_tied_row_ranks_ties_as_argmax_does(value: float) -> None:
    """A network whose output does not depend on the class (a zero-initialized head reset to
    τ=0, or logits that all overflow to +inf) reported top5_error 0.0 next to a top-1 error
    of ~90%: top-1 breaks ties by index (argmax), top-5 counted every tie in the sample's
    favour, so all 10 classes tied made every sample top-5 correct. The NaN fix already ranks
    NaNs as argmax does; equal numbers must rank so too (a lower index ranks above), which
    makes correct@5 of a constant row mean "label among the first 5", as argmax reads it
    (`score::ranks_above` in csrc/score.h, `ops.ranks_above`)."""
    from layerfast import ops

    labels = torch.arange(10)
    logits = torch.full((1, 10, 10), value)
    for score in (ops.score_, ops.score_reference):
        acc = torch.zeros(1, 4, dtype=torch.float64)
        score(logits, labels, torch.zeros(10, dtype=torch.int64), acc)
        assert acc[0, 0].item() == 1  # top-1: argmax is class 0, right for label 0 only
        assert acc[0, 1].item() == 5, score.__name__  # top-5: labels 0..4, not all 10


# ---------------------------------------------- an infinite (not NaN) loss


def test_the_overflow_warning_describes_an_infinite_loss_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reset that sends the label's logit to -inf and another to +inf has a mean
    cross-entropy of +inf, which results.csv writes as `inf`; the warning said "their loss is
    empty in results.csv", which holds only for NaN."""
    import pandas as pd

    g = np.random.default_rng(1)
    w = g.standard_normal((10, 4)).astype(np.float32)
    x = 10 * g.standard_normal((200, 4)).astype(np.float32)
    y = (x @ w.T).argmax(1)
    keep = y != 0  # label 0 would meet +inf - +inf = NaN
    np.savez(tmp_path / "d.npz", x=x[keep], y=y[keep].astype(np.int64),
             num_classes=np.array(10))
    ck = tmp_path / "ck"
    ck.mkdir()
    t0 = _final(w)
    head = torch.full((10, 8), -1e38)
    head[0] = 1e38  # h >= 0 and large: class 0 -> +inf, every other class -> -inf
    t0["fc2.weight"] = head
    torch.save(t0, ck / "epoch_000.pt")
    torch.save(_final(w), ck / "epoch_001.pt")
    out = tmp_path / "out"
    rc = main(["analyze", "--arch", ARCH, "--ckpts", str(ck), "--data", str(tmp_path / "d.npz"),
               "--out", str(out), "--reset", "reinit", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    table = pd.read_csv(out / "results.csv")
    row = table[(table.unit == "fc2") & (table.checkpoint == 0)].iloc[0]
    assert row.loss == np.inf  # the true mean cross-entropy here
    line = next(s for s in err.splitlines() if "NaN or Inf logits" in s)
    assert "reinit fc2 @0" in line
    assert "inf" in line.split("their loss is", 1)[1], line  # not "empty" alone


# ---------------------------------------------- one huge value hides batch mixing


class _MaskedBatchStats(torch.nn.Module):
    """Batch statistics (rows depend on the other samples) and one class masked with a huge
    negative logit, as attention and class masks often are (`torch.finfo(dtype).min`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 12)
        self.fc2 = torch.nn.Linear(12, 10)
        shift = torch.zeros(10)
        shift[-1] = torch.finfo(torch.float32).min
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True)) + self.shift


def test_a_huge_masked_logit_does_not_hide_that_the_model_mixes_samples() -> None:
    """`verify._same_rows` compared rows within 1e-5 of the tensor's largest |value|: with one
    logit at -3.4e38 every finite difference passed, so a model with batch statistics was taken
    for one whose rows are its samples' own, and an out-of-memory back-off could cut its
    batches silently (results then depend on the back-off, not the naive loop's batches)."""
    from layerfast.engine import Evaluator

    torch.manual_seed(0)
    model = _MaskedBatchStats().eval()
    x, y = torch.randn(32, 12), torch.randint(0, 9, (32,))
    fc2 = {k: 2 * v for k, v in model.state_dict().items() if k.startswith("fc2")}
    ev = Evaluator(model, [{}, fc2], device="cpu", precision="fp32")
    ev.run([(x[:16], y[:16]), (x[16:], y[16:])])
    assert ev._mixes_samples is True


def test_the_trace_check_off_the_cpu_is_not_blinded_by_one_masked_logit() -> None:
    """Off the CPU the traced program's logits may differ from the forward's to rounding:
    `verify.differs` allowed 1e-5 of the largest |logit|, so with one class masked at
    finfo.min a traced program off by 1.0 on every other logit passed as the forward.
    (Only the tolerance depends on the device: CPU tensors exercise the CUDA rule.)"""
    from layerfast.engine.verify import differs

    torch.manual_seed(0)
    ref = torch.randn(8, 10)
    ref[:, -1] = torch.finfo(torch.float32).min
    wrong = ref.clone()
    wrong[:, :-1] += 1.0
    assert differs(wrong, ref, torch.device("cuda")) is not None
    near = ref.clone()
    near[:, :-1] *= 1 + 1e-6  # rounding-sized: still the forward
    assert differs(near, ref, torch.device("cuda")) is None
