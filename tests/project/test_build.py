"""Build-level checks: a missing extension fails with a message that says what to run, setup.py
stops on an nvcc/torch CUDA mismatch naming both versions, and CI's script is valid bash."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerfast

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(layerfast.__file__).resolve().parent
FIX = "pip install --no-build-isolation -e ."


# An editable install (`pip install -e .`) adds a meta-path finder that maps `layerfast.*` back to
# the source tree, so `layerfast._C` would still be found from a copy of the package; its path
# entry also turns `import layerfast` into an empty namespace package when the source tree is not
# first on sys.path. The subprocesses below drop those hooks and put the package they test first.
_NO_EDITABLE = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
    "getattr(f, '__module__', '')]\n"
    "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
)


def _python(code: str, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run(
        [sys.executable, "-c", _NO_EDITABLE + code],
        cwd=pythonpath,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def pkg_without_ext(tmp_path_factory) -> Path:
    """A copy of the layerfast package with no compiled `_C*.so` / `_C*.pyd`."""
    root = tmp_path_factory.mktemp("noext")
    shutil.copytree(
        PKG, root / "layerfast", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__")
    )
    assert not list((root / "layerfast").glob("_C*"))
    return root


def test_import_without_extension_says_what_to_run(pkg_without_ext):
    code = (
        "import importlib.util, sys\n"
        "print(importlib.util.find_spec('layerfast').origin)\n"
        "import layerfast\n"
    )
    r = _python(code, pkg_without_ext)
    # The copy, not the installed package, was imported.
    assert r.stdout.strip() == str(pkg_without_ext / "layerfast" / "__init__.py")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert any(ln.startswith("ImportError: layerfast's compiled extension") for ln in lines), (
        r.stderr
    )
    assert "layerfast._C" in r.stderr and FIX in r.stderr


def test_import_without_extension_says_not_built_and_where(pkg_without_ext):
    # `from layerfast import _C` inside layerfast/__init__.py used to fail with Python's
    # "partially initialized module ... (most likely due to a circular import)", which the
    # message quoted: the user went looking for a circular import instead of building.
    r = _python("import layerfast\n", pkg_without_ext)
    assert r.returncode != 0
    assert "circular import" not in r.stderr, r.stderr
    assert (
        f"(layerfast._C) is not built: there is no _C*.so in {pkg_without_ext / 'layerfast'}"
        in r.stderr
    ), r.stderr


def test_import_with_unloadable_extension_names_the_torch(pkg_without_ext, tmp_path):
    # A _C*.so that is there but does not load (built for another torch, CUDA or Python).
    root = tmp_path / "badext"
    shutil.copytree(pkg_without_ext / "layerfast", root / "layerfast")
    (root / "layerfast" / "_C.abi3.so").write_bytes(b"not an ELF file")
    r = _python("import layerfast\n", root)
    assert r.returncode != 0
    import torch

    msg = r.stderr.strip().splitlines()
    assert any(
        ln.startswith("ImportError: layerfast's compiled extension (layerfast._C) is not built "
                      f"for the installed torch {torch.__version__} ") for ln in msg
    ), r.stderr  # fmt: skip
    assert "_C.abi3.so" in r.stderr and FIX in r.stderr  # the loader's own error, and the fix


def test_info_without_extension_says_what_to_run(pkg_without_ext):
    r = _python("import runpy; runpy.run_module('layerfast.info', run_name='__main__')",
                pkg_without_ext)  # fmt: skip
    assert r.returncode != 0 and FIX in r.stderr


def test_import_with_extension_blocked_says_what_to_run():
    # sys.modules[name] = None makes `import name` raise ImportError, as a missing file would.
    code = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('layerfast').origin)\n"
        "sys.modules['layerfast._C'] = None\n"
        "import layerfast\n"
    )
    r = _python(code, PKG.parent)
    assert r.stdout.strip() == str(PKG / "__init__.py")
    assert r.returncode != 0
    assert "layerfast's compiled extension (layerfast._C) is not built" in r.stderr
    assert FIX in r.stderr and "CUDA_HOME" in r.stderr


@pytest.fixture
def setup_py():
    """setup.py imported as a module (its `setup()` call is guarded by __main__)."""
    spec = importlib.util.spec_from_file_location("layerfast_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_versions_stops_on_mismatch_naming_both(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_nvcc_version", lambda cuda_home: "12.4")
    with pytest.raises(SystemExit) as e:
        setup_py._check_versions("13.0", "/opt/cuda-12.4")
    msg = str(e.value.code)
    assert "12.4" in msg and "13.0" in msg and "/opt/cuda-12.4" in msg
    assert "FORCE_CUDA=0" in msg  # the way out for someone who only wants the CPU kernels


@pytest.mark.parametrize(("force", "torch_cuda", "home", "want"), [
    (None, "13.0", "/usr/local/cuda", True), (None, None, "/usr/local/cuda", False),
    (None, "13.0", None, False), ("1", None, None, True), ("0", "13.0", "/usr/local/cuda", False),
])
def test_want_cuda_follows_force_cuda(setup_py, monkeypatch, force, torch_cuda, home, want):
    if force is None:
        monkeypatch.delenv("FORCE_CUDA", raising=False)
    else:
        monkeypatch.setenv("FORCE_CUDA", force)
    assert setup_py._want_cuda(torch_cuda, home) is want


def test_wheel_abi3_tag_is_the_python_torch_compiles_the_extension_for(setup_py, monkeypatch):
    # torch builds py_limited_api extensions with -DPy_LIMITED_API=min_supported_cpython; the
    # wheel's cpXY-abi3 tag must name that Python (it said cp39 while the binary targets 3.10).
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(setup_py, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv("FORCE_CUDA", "0")
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    monkeypatch.chdir(ROOT)
    setup_py.main()
    v = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
    assert seen["options"]["bdist_wheel"]["py_limited_api"] == f"cp3{(v >> 16) & 0xFF}"
    assert [e.name for e in seen["ext_modules"]] == ["layerfast._C"]
    monkeypatch.setattr(cpp_extension, "min_supported_cpython", "0x030C0000", raising=False)
    assert setup_py._limited_api_tag() == "cp312"


def test_check_versions_accepts_a_match(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_nvcc_version", lambda cuda_home: "13.0")
    assert setup_py._check_versions("13.0", "/usr/local/cuda") is None


def test_check_versions_refuses_cpu_torch_and_missing_nvcc(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_nvcc_version", lambda cuda_home: "13.0")
    with pytest.raises(SystemExit) as e:
        setup_py._check_versions(None, "/usr/local/cuda")
    assert "13.0" in str(e.value.code) and "no CUDA" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        setup_py._check_versions("13.0", None)
    assert "CUDA_HOME" in str(e.value.code)
    monkeypatch.setattr(setup_py, "_nvcc_version", lambda cuda_home: None)
    with pytest.raises(SystemExit) as e:
        setup_py._check_versions("13.0", "/nowhere")
    assert "/nowhere/bin/nvcc" in str(e.value.code)


def test_nvcc_version_parses_nvcc_output(setup_py, tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        "echo 'Cuda compilation tools, release 13.0, V13.0.48'\n"
    )
    nvcc.chmod(0o755)
    assert setup_py._nvcc_version(str(tmp_path)) == "13.0"
    assert setup_py._nvcc_version(str(tmp_path / "absent")) is None


def test_ci_script_is_valid_strict_bash():
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "python -m pytest -q" in text
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
