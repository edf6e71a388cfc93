"""`arch="module:factory"` leaves the caller's `sys.path` as it was (session 22).

The module is imported with the current directory importable, and each call of its factory too
(a factory may import a sibling module when called), but the directory used to stay first on
`sys.path` after `analyze` / `list_units` / `get_arch` returned: in a notebook every later
import then found the study directory's files (a `utils.py`, a `data.py`) before installed
packages."""

from __future__ import annotations

import sys
import textwrap

import pytest

from layerfast.analysis import analyze, list_units
from layerfast.models import get_arch
from tests.models import test_models as _models

# test_models' fixture: a temporary cwd not on sys.path, sys.path/sys.modules restored
user_dir = _models.user_dir

NET = """
def build(num_classes, in_shape):
    import lf_s22_parts  # a sibling module, imported when the factory is called
    return lf_s22_parts.net(num_classes, in_shape)
"""
PARTS = """
from layerfast.models import get_arch

def net(num_classes, in_shape):
    return get_arch("fcn3x256").build(num_classes, in_shape)
"""


@pytest.fixture
def study_dir(user_dir):
    """A study directory as the cwd, not on sys.path; sys.modules restored afterwards."""
    (user_dir / "lf_s22_net.py").write_text(textwrap.dedent(NET))
    (user_dir / "lf_s22_parts.py").write_text(textwrap.dedent(PARTS))
    return user_dir


def test_get_arch_and_its_build_leave_sys_path_alone(study_dir) -> None:
    path = list(sys.path)
    spec = get_arch("lf_s22_net:build")
    assert sys.path == path
    model = spec.build(10, (1, 8, 8))  # the factory's own import still finds the sibling
    assert sum(p.numel() for p in model.parameters()) > 0
    assert sys.path == path


def test_list_units_leaves_sys_path_alone(study_dir) -> None:
    path = list(sys.path)
    units = list_units("lf_s22_net:build", "digits")
    assert units and sys.path == path


def test_analyze_leaves_sys_path_alone(study_dir, ckpts, one_thread) -> None:
    path = list(sys.path)
    res = analyze("lf_s22_net:build", ckpts, data="digits", reset="reinit", checkpoints=[0],
                  max_samples=100, progress=False, figures=False, device="cpu",
                  out=study_dir / "out")
    assert len(res.table) > 1
    assert sys.path == path


def test_a_module_that_is_not_there_is_still_one_line_and_leaves_sys_path(study_dir) -> None:
    from layerfast.errors import LayerfastError

    path = list(sys.path)
    with pytest.raises(LayerfastError, match="cannot import module 'lf_s22_nope'"):
        get_arch("lf_s22_nope:build")
    assert sys.path == path
