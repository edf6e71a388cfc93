"""interp's noise σ·N(0, 1) must fit the weights' dtype (review s22).

A σ just below float32's maximum (3e38) passed both checks (`--sigma` was compared with
float32's maximum, make_variants only asked for a finite σ); a standard normal draw above 1.13
then made those float32 weights Inf, and the rows read as chance with only the generic
NaN/Inf-logits warning. Each test fails on the code before the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.interp import interp_options
from layerfast.units import Unit
from layerfast.variants import make_variants
from tests.units_variants.test_variants import FC, write_run


def test_cli_sigma_whose_noise_overflows_float32_is_refused() -> None:
    with pytest.raises(LayerfastError, match=r"--sigma 3e\+38 .*float32.*σ must be <= 3\.4e\+37"):
        interp_options(["interp"], "0.5", "0,3e38")
    assert interp_options(["interp"], "0.5", "3e37") == ([0.5], [3e37])  # fits: 8.6·3e37 < max


def test_make_variants_refuses_a_sigma_that_overflows_the_units_weights(tmp_path: Path) -> None:
    model = write_run(tmp_path)
    with pytest.raises(LayerfastError, match=r"interp fc: sigma 3e\+38 .*float32"):
        make_variants(model, [FC], CheckpointDir(tmp_path), reset=(),
                      interp=[("fc", 1, 0.5, 3e38)])
    (v,) = [v for v in make_variants(model, [FC], CheckpointDir(tmp_path), reset=(),
                                     interp=[("fc", 1, 0.5, 3e37)]) if v.kind == "interp"]
    assert all(torch.isfinite(t).all() for t in v.overrides().values())


def test_the_limit_follows_the_models_own_dtype(tmp_path: Path) -> None:
    """A float16 model (a factory's `.half()`) holds at most 65504: σ = 1e4 is refused there,
    and the noise of an accepted σ stays finite once cast."""
    model = write_run(tmp_path).half()
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match=r"interp fc: sigma 10000 .*6\.55e\+03 \(float16"):
        make_variants(model, [FC], ck, reset=(), interp=[("fc", 1, 0.5, 1e4)])
    (v,) = [v for v in make_variants(model, [FC], ck, reset=(), interp=[("fc", 1, 0.5, 6e3)],
                                     seeds=(1,)) if v.kind == "interp"]
    got = v.overrides()
    assert got["fc.weight"].dtype == torch.float16 and torch.isfinite(got["fc.weight"]).all()


def test_sigma_without_noisy_parameters_is_not_judged(tmp_path: Path) -> None:
    """Noise lands on floating parameters only: a unit of BN running statistics alone gets
    none, so no σ can overflow it."""
    model = write_run(tmp_path)
    stats = Unit("stats", ("bn",), ("bn.running_mean", "bn.running_var"))
    vs = make_variants(model, [stats], CheckpointDir(tmp_path), reset=(),
                       interp=[("stats", 1, 0.5, 3e38)])
    assert [v.kind for v in vs] == ["baseline", "interp"]
