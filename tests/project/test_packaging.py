"""What a user installs outside the checkout: the sdist must build on its own (every csrc file,
headers included), and the built package must carry every subpackage and the `digits` data.

The distributions are made with setuptools' own commands from a copy of the files git would
commit (tracked, plus untracked ones that are not ignored), so build outputs of the dev checkout
(`_C*.so`, build/, .venv/) cannot mask a file missing from the source tree. Nothing is compiled:
`sdist` and `build_py` only collect files (about 5 s each, most of it importing torch)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("checkpoints", "data", "engine", "models", "report")


def _source_files() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to know which files are the sources")
    r = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A copy of the repository's source files, nothing built in it."""
    dst = tmp_path_factory.mktemp("src") / "layerfast-src"
    for f in _source_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def _setup(tree: Path, *args: str) -> str:
    """Run setup.py in `tree`; its output (stdout and stderr)."""
    # FORCE_CUDA=0: collecting files must not depend on (or probe) a CUDA toolkit.
    env = dict(os.environ, FORCE_CUDA="0")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", *args],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def sdist(source_tree, tmp_path_factory) -> tuple[set[str], str]:
    """(the files in the sdist, relative to its top directory; setup.py's output)."""
    dist = tmp_path_factory.mktemp("dist")
    out = _setup(source_tree, "sdist", "--dist-dir", str(dist))
    (archive,) = dist.glob("layerfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    return {n[len(top) + 1:] for n in names if n.startswith(top + "/")}, out


@pytest.fixture(scope="module")
def sdist_names(sdist) -> set[str]:
    return sdist[0]


def test_metadata_uses_nothing_setuptools_deprecates(sdist):
    # `license = { text = ... }` printed "`project.license` as a TOML table is deprecated ...
    # By 2027-Feb-18 ... your builds will no longer be supported" on every build.
    out = sdist[1]
    assert not re.search(r"SetuptoolsDeprecationWarning|BuildBackendWarning|is deprecated", out), (
        out
    )


def _bundled_setuptools() -> Path | None:
    """The setuptools wheel that `python3 -m venv` puts into a fresh venv of this Python."""
    import ensurepip

    found = sorted(Path(ensurepip.__file__).parent.glob("_bundled/setuptools-*.whl"))
    return found[-1] if found else None


def test_pyproject_is_valid_for_the_setuptools_a_fresh_venv_has(tmp_path):
    # The README's first command builds with the venv's own setuptools (Python 3.11: 65.5.0;
    # `pip install setuptools` does not upgrade it). `license = "BSD-3-Clause"` needs setuptools
    # 77, and 65.5's pyproject validation refused it, so the quick start failed.
    wheel = _bundled_setuptools()
    if wheel is None:
        pytest.skip("this Python bundles no setuptools wheel (3.12+): a fresh venv has none")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import setuptools;"
        "from setuptools.config.pyprojecttoml import read_configuration;"
        "read_configuration(sys.argv[2], expand=False); print(setuptools.__version__)"
    )
    r = subprocess.run([sys.executable, "-I", "-c", code, str(wheel), str(ROOT / "pyproject.toml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{wheel.name} rejects pyproject.toml:\n{r.stderr[-2000:]}"


def test_the_license_reaches_the_metadata(source_tree, tmp_path):
    _setup(source_tree, "egg_info", "--egg-base", str(tmp_path))
    (info,) = tmp_path.glob("*.egg-info/PKG-INFO")
    assert re.search(r"^License: BSD-3-Clause$", info.read_text(), re.M)


def test_sdist_has_every_csrc_file(source_tree, sdist_names):
    csrc = {str(p.relative_to(source_tree)) for p in (source_tree / "csrc").rglob("*")
            if p.is_file()}  # fmt: skip
    assert {"csrc/layerfast.cpp", "csrc/swap.h", "csrc/score.h"} <= csrc
    assert sorted(csrc - sdist_names) == []


def test_sdist_resolves_every_quoted_include(source_tree, sdist_names):
    # What the compiler needs: each `#include "x"` of a csrc file, relative to that file.
    included = set()
    for src in (source_tree / "csrc").rglob("*"):
        if src.suffix in (".cpp", ".cu", ".h", ".cuh"):
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(), re.M):
                path = os.path.normpath(os.path.join(os.path.dirname(src), inc))
                included.add(os.path.relpath(path, source_tree))
    assert included, "no quoted #include found in csrc: the check would prove nothing"
    assert sorted(included - sdist_names) == []


def test_sdist_has_build_files_and_package_data_but_no_tests(sdist_names):
    for f in ("setup.py", "pyproject.toml", "README.md", "layerfast/data/digits.npz",
              "layerfast/__init__.py", *(f"layerfast/{p}/__init__.py" for p in SUBPACKAGES)):
        assert f in sdist_names, f
    assert not [n for n in sdist_names if n.startswith("tests/") or n.endswith((".so", ".o"))]


def test_built_package_has_every_subpackage_and_the_digits_data(source_tree, tmp_path):
    # `build_py` is what puts the Python files and package data into a wheel.
    _setup(source_tree, "build_py", "--build-lib", str(tmp_path))
    pkg = tmp_path / "layerfast"
    for p in SUBPACKAGES:
        assert (pkg / p / "__init__.py").is_file(), p
    assert (pkg / "data" / "digits.npz").stat().st_size > 0
    src_py = {p.relative_to(source_tree) for p in (source_tree / "layerfast").rglob("*.py")}
    assert {p.relative_to(tmp_path) for p in pkg.rglob("*.py")} == src_py
    assert not list(tmp_path.glob("tests"))
