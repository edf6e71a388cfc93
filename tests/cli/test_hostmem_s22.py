"""The computing commands start glibc malloc in its steady state (`layerfast/hostmem.py`): a CPU
pass's few-MB activations were each mapped, faulted in page by page and unmapped again until
glibc's dynamic threshold had risen, ~40% of a ResNet-20 CPU pass's time in system calls. No
test here times anything: page faults are counted, and calls recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import layerfast.hostmem as hostmem
from layerfast.cli import main

ROOT = Path(__file__).resolve().parents[2]

_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "steady":
        from layerfast.hostmem import steady_malloc
        assert steady_malloc()
    x = torch.randn(6 << 18)  # 6 MiB of float32
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):  # a step's activations: five of 6 MiB alive at once, then freed
        acts = [x * i for i in range(5)]
        del acts
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")
PAGES = 5 * (6 << 20) // os.sysconf("SC_PAGE_SIZE")  # touched per iteration: 7,680 of 4 KiB


def _faults(mode: str, **env_vars: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_vars)
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not hostmem._glibc(), reason="glibc only")
def test_steady_malloc_stops_the_page_faults_of_freed_activations():
    """How many faults glibc's own rule leaves depends on what the process freed before (its
    thresholds only rise), so the comparison is with every block mapped (the rule's start):
    each iteration faults its 7,680 pages in again. In the steady state the blocks are reused
    from the heap: the first iteration's faults, not fifty (measured: ~12,000-14,000 against
    ~385,000; glibc's rule from a fresh start gave anywhere between 33,000 and 310,000)."""
    mapped = _faults("plain", MALLOC_MMAP_THRESHOLD_="131072")
    steady = _faults("steady")
    assert mapped > 25 * PAGES, (mapped, PAGES)
    assert steady < 3 * PAGES, (steady, PAGES)


_REAL_GLIBC = hostmem._glibc


def _no_such_name(name: str) -> str:
    raise ValueError(f"unrecognized configuration name {name!r}")


class _Libc:
    """`ctypes.CDLL(None)` with a `mallopt` that records its calls (a function: ctypes sets
    `argtypes` on it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return 1

        self.mallopt = mallopt


def _fake_libc(monkeypatch) -> _Libc:
    libc = _Libc()
    monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(hostmem, "_glibc", lambda: True)
    for v in (*hostmem._USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(v, raising=False)
    return libc


def test_it_sets_the_thresholds_where_glibcs_rule_ends(monkeypatch):
    libc = _fake_libc(monkeypatch)
    assert hostmem.steady_malloc()
    assert libc.calls == [(-3, 32 << 20), (-1, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@pytest.mark.parametrize("var, value", [("MALLOC_MMAP_THRESHOLD_", "131072"),
                                        ("MALLOC_TRIM_THRESHOLD_", "0"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_a_users_own_malloc_settings_win(monkeypatch, var, value):
    libc = _fake_libc(monkeypatch)
    monkeypatch.setenv(var, value)
    assert not hostmem.steady_malloc() and libc.calls == []


def test_nothing_is_done_off_glibc(monkeypatch):
    libc = _fake_libc(monkeypatch)
    monkeypatch.setattr(hostmem, "_glibc", _REAL_GLIBC)  # confstr decides again
    monkeypatch.setattr(hostmem.os, "confstr", _no_such_name)  # musl, macOS
    assert not hostmem.steady_malloc() and libc.calls == []


@pytest.mark.parametrize("argv, computes", [
    (["analyze", "--arch", "fcn1x4", "--list-units"], True),
    (["info"], False),
])
def test_the_computing_commands_set_it_and_the_others_do_not(monkeypatch, capsys, argv,
                                                             computes):
    called: list[int] = []
    monkeypatch.setattr(hostmem, "steady_malloc", lambda: called.append(1) or True)
    assert main(argv) == 0
    assert called == ([1] if computes else [])
