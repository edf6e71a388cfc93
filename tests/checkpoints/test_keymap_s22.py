"""Checkpoint keys under a prefix of more than one part (session 22).

The model's keys are matched under the one prefix whose subtree alone matches them; that
search looked at first components only, so a LightningModule holding the model one attribute
deeper (`self.backbone = Wrapper(net)`, saved as `backbone.net.*`) beside a loss with
parameters was listed as every key missing and every key unexpected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.checkpoints.keymap import resolve
from layerfast.errors import LayerfastError
from tests.checkpoints.test_checkpoints import Tiny, assert_sd_equal, sd_at


def pre(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("prefix", ["backbone.net.", "model.backbone.net.", "a.b.c."])
def test_the_one_matching_subtree_of_any_depth_is_used(tmp_path: Path, prefix: str) -> None:
    """Beside a loss module's parameter (`loss.weight`, or `model.loss.weight` under a first
    part every key shares), the model under a two- or three-part prefix is found."""
    head = prefix.split(".", 1)[0] + "." if prefix.startswith("model.") else ""
    sd = {**pre(prefix, sd_at(1)), f"{head}loss.weight": torch.ones(3)}
    torch.save({"state_dict": sd}, tmp_path / "e_1.ckpt")
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())
    assert_sd_equal(ck.tensors(1), sd_at(1))


def test_a_deeper_match_beside_a_first_level_one_is_ambiguous() -> None:
    """`student.*` and `teacher.net.*` both hold the model: the first-level one won silently."""
    keys = [*pre("student.", sd_at(1)), *pre("teacher.net.", sd_at(2))]
    with pytest.raises(LayerfastError, match=r"several parts.*'student\.', 'teacher\.net\.'"):
        resolve(keys, set(Tiny().state_dict()), "f.pt")


def test_two_deeper_matches_are_ambiguous() -> None:
    keys = [*pre("a.net.", sd_at(1)), *pre("b.net.", sd_at(2)), "loss.weight"]
    with pytest.raises(LayerfastError, match=r"several parts.*'a\.net\.', 'b\.net\.'"):
        resolve(keys, set(Tiny().state_dict()), "f.pt")


def test_a_wrapped_copy_is_one_match_named_by_its_shortest_prefix() -> None:
    """`ema.module.*` is one subtree under `ema.` (its `module.` stripped) and under
    `ema.module.`: one candidate, not two, so it still resolves beside a loss, and beside a
    top-level copy the refusal names `ema.` as before."""
    ref = set(Tiny().state_dict())
    keys = [*pre("ema.module.", sd_at(1)), "loss.weight"]
    got = resolve(keys, ref, "f.pt")
    assert got == {k: f"ema.module.{k}" for k in ref}
    with pytest.raises(LayerfastError, match=r"\(the top level, 'ema\.'\)"):
        resolve([*sd_at(1), *pre("ema.module.", sd_at(1))], ref, "f.pt")


def test_no_match_still_lists_mismatches(tmp_path: Path) -> None:
    """A subtree that holds only part of the model is no match: validation lists the keys."""
    sd = {k: v for k, v in pre("backbone.net.", sd_at(1)).items() if "fc" not in k}
    torch.save({**sd, "loss.weight": torch.ones(3)}, tmp_path / "e_1.pt")
    with pytest.raises(LayerfastError, match="fc.weight"):
        CheckpointDir(tmp_path).validate(Tiny().state_dict())
