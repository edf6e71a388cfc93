"""What `--schedule` and a manifest's `train_loss` mean, as the help and docs now say.

Every schedule is set before each step from the steps done, so `--schedule step` drops the lr
mid-epoch when the epochs are not a multiple of 4; the help said "every step" of cosine only
(and "of the epochs" of step). `train_loss` (the mean over the epoch's trained steps, the
weights moving between them) was documented nowhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerfast.data import open_data, to_device
from layerfast.models import build_model
from layerfast.train import lr_at, train


def _schedule_help() -> str:
    from layerfast.cli import parser

    (action,) = [a for a in parser().commands["train"]._actions if a.dest == "schedule"]
    return " ".join(action.help.split())


def test_help_says_every_schedule_is_set_per_step():
    text = _schedule_help()
    assert "set before every step" in text
    assert "75%% of the steps" in text and "multiple of 4" in text


def test_step_drops_where_the_docs_say():
    """30 epochs of 10 steps: ÷10 from the first step of epoch 16, ÷100 from the sixth step of
    epoch 23 (train's progress is (epoch + step/steps) / epochs)."""
    def lrs(epoch: int) -> list[float]:  # epoch counted from 1, as the docs count it
        return [lr_at("step", 1.0, (epoch - 1 + s / 10) / 30) for s in range(10)]

    assert lrs(15) == [1.0] * 10 and lrs(16) == [0.1] * 10
    assert lrs(23) == [0.1] * 5 + [0.01] * 5


def test_train_docstring_defines_train_loss():
    assert "`train_loss` is the mean" in " ".join(train.__doc__.split())


def test_train_loss_is_the_loss_of_the_steps_trained(tmp_path):
    """One step per epoch (40 samples, batch 40): epoch 1's train_loss is the loss of θ⁰ on
    the training batch, computed before the step, not a loss of the saved epoch-1 weights."""
    man = train("fcn1x4", "digits", 1, tmp_path / "run", max_samples=40, batch_size=40,
                progress=False, device="cpu")
    src = open_data("digits", split="train", max_samples=40)
    model, _ = build_model("fcn1x4", src.num_classes, src.shape)
    x, y = to_device(*next(iter(src.batches(40))), src, "cpu")

    def loss_of(name: str) -> float:
        model.load_state_dict(torch.load(tmp_path / "run" / name, weights_only=True))
        model.train()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    got = man["checkpoints"][1]["train_loss"]
    assert abs(got - loss_of("epoch_000.pt")) < 1e-5
    assert abs(got - loss_of("epoch_001.pt")) > 1e-3
