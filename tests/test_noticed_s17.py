"""Session 17: items from the "noticed and left alone" list that are now fixed."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.interp import interp_options


def test_sigma_beyond_float32_is_refused() -> None:
    """`--sigma 1e39` is finite in float64 but Inf in the weights' float32: every noisy weight
    became Inf, and the run went on with only the overflow warning."""
    with pytest.raises(LayerfastError, match="beyond float32's range"):
        interp_options(["interp"], "0.5", "0,1e39")
    assert interp_options(["interp"], "0.5", "3e38") == ([0.5], [3e38])
