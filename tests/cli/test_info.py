"""`layerfast info` / `python -m layerfast.info`: versions, kernel status, ops, FFCV, threads."""

from __future__ import annotations

import json
import platform
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerfast
from layerfast import _ext, info

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "layerfast",
    "torch",
    "torch_cuda",
    "python",
    "platform",
    "extension",
    "cpu_bf16",
    "cuda_kernels_compiled",
    "cuda_kernels_runnable",
    "cuda_check",
    "gpus",
    "extension_gpu_code",
    "torch_cuda_arch_list",
    "ops",
    "ffcv",
    "threads",
}


def run_main(capsys, *argv: str) -> str:
    assert info.main(list(argv)) == 0
    return capsys.readouterr().out


def test_text_reports_versions_and_kernels(capsys):
    out = run_main(capsys)
    assert f"layerfast       {layerfast.__version__}" in out
    assert f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})" in out
    assert f"python          {platform.python_version()}" in out
    compiled = torch._C._dispatch_has_kernel_for_dispatch_key("layerfast::swap_", "CUDA")
    assert f"compiled: {'yes' if compiled else 'no'};" in out
    if not torch.cuda.is_available():
        assert "runnable here: no (" in out
    lines = out.splitlines()
    for op in ("swap_", "score_"):
        (line,) = [ln for ln in lines if ln.split()[:1] == [op]]
        assert "CPU" in line.split(None, 1)[1]
        assert ("CUDA" in line) == compiled
    assert any(ln.startswith("FFCV ") for ln in lines)
    assert f"{torch.get_num_threads()}" in next(ln for ln in lines if ln.startswith("threads"))


def test_json_has_every_key_and_true_values(capsys):
    d = json.loads(run_main(capsys, "--json"))
    assert set(d) == KEYS
    assert d["layerfast"] == layerfast.__version__
    assert d["torch"] == torch.__version__
    assert d["torch_cuda"] == torch.version.cuda
    assert d["python"] == platform.python_version()
    assert d["cuda_kernels_compiled"] is _ext.HAS_CUDA_KERNELS
    assert d["cuda_kernels_compiled"] == torch._C._dispatch_has_kernel_for_dispatch_key(
        "layerfast::swap_", "CUDA"
    )
    assert isinstance(d["cuda_kernels_runnable"], bool) and d["cuda_check"]
    assert Path(d["extension"]).name.startswith("_C")
    assert Path(d["extension"]).parent == Path(layerfast.__file__).parent
    assert {"swap_", "score_", "affine_relu"} <= set(d["ops"])
    for name, keys in d["ops"].items():
        # test-only ops (leading underscore) run on the CPU alone
        cuda = d["cuda_kernels_compiled"] and not name.startswith("_")
        assert "CPU" in keys and ("CUDA" in keys) == cuda, (name, keys)
    assert set(d["ffcv"]) >= {"available", "version", "error"}
    assert d["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert d["threads"]["cpus"] >= 1
    if torch.backends.cuda.is_built():
        assert d["torch_cuda_arch_list"] == torch.cuda.get_arch_list()
    else:
        assert d["torch_cuda_arch_list"] == []
    # A build with CUDA kernels carries device code; a CPU-only build carries none.
    assert bool(d["extension_gpu_code"]) == d["cuda_kernels_compiled"]


def test_registered_ops_are_introspected_not_hardcoded():
    ops = info.registered_ops()
    assert "layerfast::swap_" in ops and "layerfast::score_" in ops
    assert all(q.startswith("layerfast::") for q in ops)
    assert "aten::add" not in ops


def test_without_gpu_kernels_are_not_runnable():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    ok, detail = info.cuda_check()
    assert not ok
    assert detail in ("no CUDA GPU is visible", "the extension was built without CUDA kernels")


@pytest.mark.cuda
def test_with_gpu_kernels_run():
    ok, detail = info.cuda_check()
    assert ok == _ext.HAS_CUDA_KERNELS, detail
    assert info.collect()["gpus"]


def test_ffcv_missing_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` raises ImportError
    d = json.loads(run_main(capsys, "--json"))
    assert d["ffcv"]["available"] is False and "Error" in d["ffcv"]["error"]
    assert "FFCV            not importable (ModuleNotFoundError" in run_main(capsys)


def test_info_leaves_torch_threads_alone():
    # Importing ffcv calls torch.set_num_threads(1); info must not change the process. A fresh
    # process, so that ffcv is imported for the first time by info itself.
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(2)\n"
        "from layerfast import info\n"
        "assert 'ffcv' not in sys.modules\n"
        "d = info.collect()\n"
        "print(torch.get_num_threads(), d['ffcv']['available'], d['threads']['torch_intra_op'])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0::2] == ["2", "2"], r.stdout


def test_ffcv_present_reports_its_distribution_version():
    pytest.importorskip("ffcv")
    from importlib.metadata import version

    d = info._ffcv()
    assert d["available"] is True and d["version"] == version("ffcv")


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A CUDA fat binary: header (magic, version, header size, payload size) then entries
    (kind 1 = PTX, 2 = ELF; sm at byte 28 of a 64-byte entry header)."""
    body = b""
    for kind, sm in entries:
        payload = b"\0" * 24
        head = struct.pack("<HHII", kind, 0x101, 64, len(payload)) + b"\0" * 16
        head += struct.pack("<I", sm)
        body += head + b"\0" * (64 - len(head)) + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_archs_parses_elf_and_ptx(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(
        b"\x7fELF junk" + _fatbin([(2, 80), (2, 90), (1, 90)]) + b"pad" + _fatbin([(2, 90)])
    )
    assert info.fatbin_archs(lib) == ["sm_80", "compute_90", "sm_90"]
    plain = tmp_path / "plain.so"
    plain.write_bytes(b"\x7fELF no device code here")
    assert info.fatbin_archs(plain) == []
    assert info.fatbin_archs(tmp_path / "missing.so") == []
    assert info.fatbin_archs(None) == []


def test_python_dash_m_info_json():
    r = subprocess.run(
        [sys.executable, "-m", "layerfast.info", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == KEYS and d["layerfast"] == layerfast.__version__


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        info.main(["--no-such-flag"])
    assert e.value.code == 2


def test_a_reader_that_leaves_early_is_not_a_traceback() -> None:
    """`python -m layerfast.info --json | head -1`: the pipe closes before the JSON is written;
    that is the reader's choice, not an error (it printed a BrokenPipeError traceback)."""
    p = subprocess.Popen([sys.executable, "-m", "layerfast.info", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the child writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("argv", [["-m", "layerfast.info"], ["-m", "layerfast", "info", "--json"]])
def test_a_full_stdout_is_one_line_and_exit_2(argv) -> None:
    """`layerfast info > /dev/full` was an OSError traceback (exit 1, as if a bug of ours): a
    write the system refuses is the same one line and exit 2 as any other full disk."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, *argv], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr == "layerfast: error: cannot write the output (No space left on device)\n"


def test_dir_lists_the_lazy_api() -> None:
    """`analyze` and `Evaluator` load on first use; dir() (tab completion) must still list them."""
    assert {"analyze", "Evaluator", "LayerfastError", "__version__"} <= set(dir(layerfast))
