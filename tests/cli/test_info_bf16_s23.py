"""`layerfast info` says whether the CPU has native bf16 instructions (session 23): on the CPU,
`--precision bf16` is several times fp32 where it has them (AVX512-BF16: FCN study 11x the naive
loop against 4.5x) and has no such rate to gain where it has not, and nothing told a user which
CPU they were on."""

from __future__ import annotations

import json

import pytest

from layerfast import info

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t: avx512f amx_bf16 amx_tile avx512_bf16\n"
OLD_XEON = "flags\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
READ_FLAGS = info.cpu_bf16  # the real reader, given text; the CLI tests patch what it reads


@pytest.mark.parametrize(
    ("text", "native", "flags"),
    [
        (EPYC, True, ["avx512_bf16"]),
        (SAPPHIRE, True, ["avx512_bf16", "amx_bf16"]),
        (OLD_XEON, False, []),
        (ARM, True, ["bf16"]),
        ("", None, []),
    ],
)
def test_cpu_bf16_reads_the_cpu_flags(text: str, native: bool | None, flags: list[str]) -> None:
    assert info.cpu_bf16(text) == {"native": native, "flags": flags}


def test_a_flag_that_merely_contains_bf16_is_not_native() -> None:
    assert info.cpu_bf16("flags\t: avx512_fp16 xbf16ish\n") == {"native": False, "flags": []}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (EPYC, "CPU bf16        native (avx512_bf16): --precision bf16 runs fast on the CPU"),
        (OLD_XEON, "CPU bf16        not native (no avx512_bf16, amx_bf16 or bf16 flag)"),
        ("", "CPU bf16        unknown"),
    ],
)
def test_the_text_and_json_say_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    monkeypatch.setattr(info, "cpu_bf16", lambda: READ_FLAGS(text))
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert any(ln.startswith(line) for ln in out.splitlines()), out
    assert info.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_bf16"] == READ_FLAGS(text)
