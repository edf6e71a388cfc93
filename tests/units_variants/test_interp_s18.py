"""Review s18 of the interp variants (`--reset interp --alphas A,... --sigma S,...`)."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.flags import parse_flags
from tests.cli.test_cli import cli

_MANY = ",".join(str(i / 999) for i in range(1000))  # 1000 α: MAX_VALUES, allowed alone
_SIGMAS = ",".join(str((i + 1) / 1000) for i in range(1000))  # 1000 σ > 0: allowed alone


def test_an_alpha_sigma_seed_grid_too_large_to_build_is_refused() -> None:
    """Each list is bounded (1000 values, 1000 seeds), but interp makes |α| × |σ| × seeds
    variants of every unit and τ: 10⁹ of them here, a variant list that runs out of memory
    (the failure MAX_SEEDS exists to turn into a clear error) instead of exit 2."""
    with pytest.raises(LayerfastError, match="interp variants per unit and τ"):
        parse_flags("interp", _MANY, _SIGMAS, 1000)
    with pytest.raises(LayerfastError, match="ask for fewer"):
        parse_flags("interp", _MANY, "0,0.01", 20)  # 1000 × (1 + 20)


def test_large_but_sane_interp_grids_still_pass() -> None:
    assert parse_flags("interp", _MANY, "0").interp is not None  # 1000 α, no noise
    f = parse_flags("interp", ",".join(str(i / 99) for i in range(100)), "0,0.01", 10)
    assert f.interp is not None and len(f.interp[0]) == 100  # 100 × (1 + 10) = 1100
    # seeds do not multiply without noise: 1000 α and 1000 seeds is 1000 variants
    assert parse_flags("interp", _MANY, "0", 1000).interp is not None


def test_list_units_refuses_the_huge_grid_with_exit_2(capsys) -> None:
    rc, _, err = cli(["analyze", "--arch", "fcn3x256", "--list-units", "--reset", "interp",
                      "--alphas", _MANY, "--sigma", _SIGMAS, "--seeds", "1000"], capsys)
    assert rc == 2 and "interp variants per unit and τ" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
