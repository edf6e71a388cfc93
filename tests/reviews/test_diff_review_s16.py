"""Adversarial review of 3bee89f..95117dc (session 16): the defects it found.

Checked and fine (not repeated here): `score_`'s correct@1/@5 on CPU and `score_reference`
against `torch.sort(descending=True, stable=True)` and `torch.argmax` over rows of NaN, ±inf,
0, ±1, 1e-8, 65504 and small-integer ties, float32/float16/bfloat16, C = 1, 2, 4, 5, 6, 7, 33,
64, 65, 200 and 100,000; every registry architecture keeps all its cuts and is not flagged as
mixing samples when the 8- and 4-sample runs use the same conv algorithm.
"""

from __future__ import annotations

import collections
import pickle
import sys

import pytest
import torch
from torch import nn

from layerfast.checkpoints.safeload import open_file
from layerfast.errors import LayerfastError

# ---- a refused pickle named as damage ------------------------------------------------------


def _save_from_script(monkeypatch, path, **kw) -> None:
    """`torch.save(Net())` as a training script does it: the class is `__main__.Net`, which the
    loading process (layerfast's `__main__`) does not define."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

    Net.__module__, Net.__qualname__ = "__main__", "Net"
    with monkeypatch.context() as m:
        m.setattr(sys.modules["__main__"], "Net", Net, raising=False)
        torch.save(Net(), path, **kw)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_whole_model_saved_by_a_script_is_code_not_corruption(tmp_path, monkeypatch, legacy):
    """The commonest file that needs code: `torch.save(model)` from a training script, whose
    pickle asks for `__main__.Net` (and, at torch's pickle protocol 2, `__builtin__.set`).
    A first fix for damaged legacy files judged both names by this process -- `__main__` here
    is not the script, and `__builtin__` is Python 2's name of `builtins`, which pickle maps --
    so an intact file was reported as "truncated or corrupt ... most likely damaged bytes" (a
    zip one too, whose every record had just passed its CRC-32), sending the user to
    re-download it instead of re-saving its state dict."""
    p = tmp_path / "epoch_003.pt"
    _save_from_script(monkeypatch, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(LayerfastError) as err:
        open_file(p)
    msg = str(err.value)
    assert "would run code" in msg and "__main__.Net" in msg, msg
    assert "corrupt" not in msg or "legacy (non-zip)" in msg, msg  # only the hedge


def _legacy_header() -> bytes:
    """The three pickles a legacy torch file starts with (magic number, protocol, sys info)."""
    info = dict(protocol_version=1001, little_endian=True,
                type_sizes=dict(short=2, int=4, long=4))  # fmt: skip
    return b"".join(pickle.dumps(o, protocol=2)
                    for o in (0x1950A86A20F9469CFC6C, 1001, info))  # fmt: skip


def test_a_protocol_2_payload_asking_for_dunder_builtin_eval_is_code(tmp_path):
    """`c__builtin__\\neval` is what Python 3's pickle writes for `eval` at protocol 2 (torch's
    default) and maps back to `builtins.eval` when loading: `torch.load(weights_only=False)` of
    this file runs the payload. When torch's refusal names no global (an opcode its weights-only
    unpickler lacks comes first), layerfast's own scan saw `__builtin__.eval`, found no module
    `__builtin__`, and called the file "most likely damaged bytes" instead of code."""
    payload = b'\x80\x02I1\n0c__builtin__\neval\nX\x08\x00\x00\x00"PWNED!"\x85R.'
    assert pickle.loads(payload) == "PWNED!"  # the stream does call eval
    p = tmp_path / "epoch_003.pt"
    p.write_bytes(_legacy_header() + payload)
    with pytest.raises(LayerfastError) as err:
        open_file(p)
    msg = str(err.value)
    assert "would run code" in msg and "eval" in msg, msg
    assert "corrupt" not in msg or "legacy (non-zip)" in msg, msg  # only the hedge


def test_legacy_flipped_global_is_still_called_possibly_damaged(tmp_path):
    """The control the fix must keep: a flipped bit in a legacy file's GLOBAL is named as
    possible damage (a legacy file has no checksum)."""
    src = tmp_path / "src.pt"
    torch.save(collections.OrderedDict(w=torch.ones(2)), src, _use_new_zipfile_serialization=False)
    data = bytearray(src.read_bytes())
    data[data.index(b"collections") + 10] ^= 1  # collectionr.OrderedDict
    p = tmp_path / "epoch_003.pt"
    p.write_bytes(bytes(data))
    with pytest.raises(LayerfastError, match="no checksum.*truncated or corrupt"):
        f = open_file(p)
        [f.get(k) for k in f.keys()]


def test_a_crafted_name_in_an_intact_zip_stays_one_printable_line(tmp_path):
    """Guard for the fix above: a zip file that passed its CRC-32 has no "damaged" names, so a
    GLOBAL holding a control byte reaches the "would run code" message, escaped."""
    import io
    import zipfile

    src = io.BytesIO()
    torch.save({"w": torch.ones(2)}, src)
    src.seek(0)
    payload = b"\x80\x02cos\nsys\x01tem\nX\x02\x00\x00\x00id\x85R."
    p = tmp_path / "epoch_003.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zo:
        for i in zi.infolist():
            zo.writestr(i.filename, payload if i.filename.endswith("data.pkl") else zi.read(i))
    with pytest.raises(LayerfastError) as err:
        open_file(p)
    assert str(err.value).isprintable(), repr(str(err.value))


# ---- verify._close: rounding read as mixing ------------------------------------------------


def _cut_values(prog, x: torch.Tensor, mkldnn: bool) -> dict:
    cache: dict = {}
    with torch.backends.mkldnn.flags(enabled=mkldnn), torch.no_grad():
        out = prog.run(x.clone(), 0, keep=set(prog.cuts), saved=cache)
    return {**cache, -1: out}


def test_rounding_of_another_conv_algorithm_is_not_mixing(one_thread):
    """`unbatched_cuts` compares a program's cut values on 4 samples with the first 4 rows on
    8. Off the CPU the two sizes may run different conv/GEMM algorithms (cuDNN and cuBLAS pick
    per shape), so rows agree to rounding only. Rounding scales with the magnitude of the
    layer's terms, not with one output feature's value over 4 samples: judged per feature
    (clamped at the tensor's median |value|, 0 after a ReLU), plain float32 rounding of a
    registry resnet20 (|diff| ~ 1e-6 of the tensor's largest value) failed, so cuts were
    dropped (prefix sharing lost) and the model could be taken for one that mixes samples.
    Simulated on the CPU with oneDNN on for 8 samples and off for 4 (two conv algorithms)."""
    from layerfast.engine.graph import Program
    from layerfast.engine.verify import _same_rows
    from layerfast.models import build_model

    torch.manual_seed(0)
    model, _ = build_model("resnet20", 10, (3, 32, 32))
    with torch.no_grad():  # BatchNorm statistics away from their init, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.1, 2.0)
                m.bias.normal_(0, 0.3)
    prog = Program(model.eval())
    x = torch.randn(8, 3, 32, 32)
    eight, four = _cut_values(prog, x, True), _cut_values(prog, x[:4], False)
    bad = {}
    for c, t in four.items():
        if c != 0 and isinstance(t, torch.Tensor) and not _same_rows(t, eight[c]):
            r = eight[c][:4]
            bad[c] = (float((t - r).abs().max()), float(r.abs().max()))
    assert not bad, f"cut: (max |diff|, max |value|): {bad}"
