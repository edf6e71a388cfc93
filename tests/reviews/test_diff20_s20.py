"""Fresh-eyes review of session 20's changes (the diff 715699c..1f20832): each test pins a
defect found in how today's commits fit together or in what one of them left out."""

from __future__ import annotations

import pytest
from torch import nn

import layerfast
from layerfast.errors import LayerfastError


def _fcn() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("holder", ["state_dict", "model", "model_state_dict", "module"])
def test_one_checkpoint_held_under_a_wrapper_key_is_said_to_be_one_checkpoint(tmp_path, holder):
    """d81d3ce told a single state dict passed as ckpts to give {τ: state_dict}; one
    checkpoint as training scripts save it (`{"state_dict": sd, "epoch": 3}`, Lightning;
    `{"model": sd}`, torchvision's scripts: DESIGN §2's holders) still got "the labels τ must
    be integers, got str 'state_dict'", which does not say why."""
    sd = _fcn().state_dict()
    with pytest.raises(LayerfastError, match=r"one checkpoint .*\{τ: state_dict"):
        layerfast.analyze(_fcn, {holder: sd, "epoch": 3}, data="digits", device="cpu",
                          out=tmp_path / "o", progress=False, figures=False)
    assert not (tmp_path / "o").exists()


def test_labels_that_are_integers_as_text_keep_their_message(tmp_path):
    """Not every str key is a holder: {"1": sd} keeps the labels' own message."""
    sd = _fcn().state_dict()
    with pytest.raises(LayerfastError, match="labels τ must be integers"):
        layerfast.analyze(_fcn, {"1": sd, 0: sd}, data="digits", device="cpu",
                          out=tmp_path / "o", progress=False, figures=False)
