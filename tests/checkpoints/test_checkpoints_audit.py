"""Checkpoint loading audit (security and key mapping): hostile or unusual files that used to
give a traceback, a misleading message, unbounded memory or the wrong weights. Each is refused
with one clear LayerfastError (exit 2 from the CLI), and no payload runs.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import torch._utils as tu
from safetensors.torch import save_file

import layerfast.checkpoints.safeload as safeload
from layerfast.checkpoints import CheckpointDir
from layerfast.cli import main
from layerfast.errors import LayerfastError
from tests.checkpoints.test_checkpoints import Tiny, sd_at


def _fcn_sd(seed: int) -> dict[str, torch.Tensor]:
    from layerfast.models import get_arch

    torch.manual_seed(seed)
    return dict(get_arch("fcn3x256").build(10, (1, 8, 8)).state_dict())


def _analyze(ck: Path, out: Path) -> int:
    return main(
        [
            "analyze",
            "--arch",
            "fcn3x256",
            "--ckpts",
            str(ck),
            "--data",
            "digits",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--max-samples",
            "40",
        ]
    )


class _Rebuild:
    """Pickles as a call of an allow-listed torch rebuild function (as a forged file would)."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


# ------------------------------------------------- zip bombs / compressed members


def _repack(src: bytes, dst: Path, compress=zipfile.ZIP_DEFLATED, pkl_extra: bytes = b"") -> None:
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl") and pkl_extra:
                data = b"\xff" + pkl_extra  # an invalid opcode after a huge inflated record
            zout.writestr(info.filename, data, compress_type=compress)


def test_a_zip_bomb_is_refused_before_torch_inflates_it(tmp_path: Path, monkeypatch) -> None:
    buf = io.BytesIO()
    torch.save(sd_at(0), buf)
    # 64 MiB of zeros deflate to ~64 KiB; torch would inflate the whole record in memory (a
    # 10 MB file of this kind costs over 20 GB before torch notices anything is wrong)
    _repack(buf.getvalue(), tmp_path / "e_0.pt", pkl_extra=bytes(64 * 2**20))
    assert (tmp_path / "e_0.pt").stat().st_size < 2**20

    def no_load(*a, **k):
        raise AssertionError("torch.load was called on a compressed archive")

    monkeypatch.setattr(safeload.torch, "load", no_load)
    with pytest.raises(LayerfastError, match=r"e_0\.pt: refused: .*compressed"):
        CheckpointDir(tmp_path).tensors(0)


def test_a_recompressed_checkpoint_says_so(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(sd_at(0), buf)
    _repack(buf.getvalue(), tmp_path / "e_0.pt")  # `unzip; zip -r`: a valid zip, deflated
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).validate(Tiny().state_dict())
    msg = str(err.value)
    assert "e_0.pt: refused" in msg and "compressed" in msg and "truncated" not in msg


def test_an_uncompressed_repack_still_loads(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(sd_at(0), buf)
    _repack(buf.getvalue(), tmp_path / "e_0.pt", compress=zipfile.ZIP_STORED)
    got = CheckpointDir(tmp_path).tensors(0)
    assert all(torch.equal(got[k], v) for k, v in sd_at(0).items())


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_allocating_gigabytes_is_refused_before_loading(
    tmp_path: Path, monkeypatch, legacy: bool
) -> None:
    """torch's allow-list has `bytearray`: a 1 KB file could make torch zero any number of GB."""
    torch.save(
        {"model": sd_at(0), "x": _Rebuild(bytearray, (2**40,))},
        tmp_path / "e_0.pt",
        _use_new_zipfile_serialization=not legacy,
    )
    assert (tmp_path / "e_0.pt").stat().st_size < 2**16

    def no_load(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(safeload.torch, "load", no_load)
    with pytest.raises(LayerfastError, match=r"e_0\.pt: refused: the pickle calls .*bytearray"):
        CheckpointDir(tmp_path).tensors(0)


# ------------------------------------------------- tensors with no data / not dense


def _forged(kind: str):
    if kind == "meta":  # shape of fc.weight, no data at all
        return _Rebuild(tu._rebuild_meta_tensor_no_storage, (torch.float32, (3, 8), (8, 1), False))
    if kind == "sparse":
        return torch.zeros(3, 8).to_sparse()
    if kind == "sparse_csr":
        return torch.zeros(3, 8).to_sparse_csr()
    if kind == "nested":
        return torch.nested.nested_tensor([torch.zeros(8), torch.zeros(8), torch.zeros(8)])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["meta", "sparse", "sparse_csr", "nested"])
def test_a_tensor_that_is_not_dense_cpu_data_is_refused(tmp_path: Path, kind: str) -> None:
    sd: dict[str, object] = dict(sd_at(1))
    sd["fc.weight"] = _forged(kind)
    torch.save(sd, tmp_path / "e_1.pt")
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).validate(Tiny().state_dict())
    msg = str(err.value)
    assert "e_1.pt" in msg and "fc.weight" in msg and "dense" in msg


def test_a_meta_tensor_checkpoint_exits_2_through_the_cli(tmp_path: Path, capsys) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "e_0.pt")
    sd: dict[str, object] = dict(_fcn_sd(1))
    sd["fc4.bias"] = _Rebuild(
        tu._rebuild_meta_tensor_no_storage, (torch.float32, (10,), (1,), False)
    )
    torch.save(sd, ck / "e_1.pt")
    assert _analyze(ck, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("layerfast: error: ") and "fc4.bias" in err and "meta" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- float8 weights


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_float8_weights_are_checked_for_nan_and_load(tmp_path: Path, fmt: str) -> None:
    good, bad = sd_at(1), sd_at(2)
    good["fc.bias"] = good["fc.bias"].to(torch.float8_e4m3fn)
    bad["fc.bias"] = torch.tensor([0.0, float("nan"), 1.0]).to(torch.float8_e5m2)
    for label, sd in ((1, good), (2, bad)):
        if fmt == "pt":
            torch.save(sd, tmp_path / f"e_{label}.pt")
        else:
            save_file(sd, str(tmp_path / f"e_{label}.safetensors"))
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict(), labels=[1])
    model = Tiny()
    model.load_state_dict(ck.tensors(1))
    assert torch.equal(model.fc.bias, good["fc.bias"].float())
    with pytest.raises(LayerfastError, match=r"NaN or Inf weights: e_2\..*fc\.bias"):
        ck.validate(Tiny().state_dict(), labels=[2])


# ------------------------------------------------- refusal messages


def _write_zip(path: Path, pkl: bytes) -> None:
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", pkl, len(pkl))
    w.write_record("byteorder", b"little", 6)
    w.write_end_of_file()


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE (protocol 4)


def test_a_protocol_4_stack_global_payload_is_named_not_called_corrupt(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pkl = (
        b"\x80\x04"
        + _unicode("builtins")
        + _unicode("eval")
        + b"\x93"
        + _unicode(f"__import__('os').system('touch {marker}')")
        + b"\x85R."
    )
    _write_zip(tmp_path / "e_0.pt", pkl)
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).tensors(0)
    msg = str(err.value)
    assert "run code (it asks for builtins.eval)" in msg and "truncated" not in msg
    assert not marker.exists()


def test_a_protocol_4_checkpoint_is_not_called_truncated(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt", pickle_protocol=4)
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).tensors(0)
    msg = str(err.value)
    assert "e_0.pt" in msg and "pickle protocol 4" in msg and "truncated" not in msg


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(a[0]))

    monkeypatch.setattr(safeload, "open", denied, raising=False)
    with pytest.raises(LayerfastError, match=r"e_0\.pt: cannot read the checkpoint: Permission"):
        CheckpointDir(tmp_path).tensors(0)


# ------------------------------------------------- manifest


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # nested past the JSON decoder's recursion limit
        '{"checkpoints": [{"epoch": 1' + "0" * 5000 + ', "file": "e_0.pt"}]}',  # > 4300 digits
    ],
)
def test_a_hostile_manifest_is_a_parse_error(tmp_path: Path, text: str) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt")
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(LayerfastError, match=r"manifest\.json: cannot parse the manifest"):
        CheckpointDir(tmp_path)


# ------------------------------------------------- key mapping


def test_a_flat_state_dict_with_an_ema_copy_is_ambiguous(tmp_path: Path) -> None:
    """The model at the top level plus `ema.`: the lone matching subtree used to win silently."""
    model, ema = sd_at(1), sd_at(7)
    torch.save({**model, **{f"ema.{k}": v for k, v in ema.items()}}, tmp_path / "e_1.pt")
    with pytest.raises(LayerfastError, match=r"several parts .*the top level.*'ema\.'"):
        CheckpointDir(tmp_path).validate(Tiny().state_dict())


def test_state_dicts_in_the_wild_load_onto_the_right_keys(tmp_path: Path) -> None:
    sd, ema = sd_at(1), sd_at(7)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).state_dict()

    def pre(p: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {p + k: v for k, v in d.items()}

    files = {
        1: {"state_dict": pre("model._orig_mod.module.", sd), "optimizer_states": [opt]},
        2: {"model": pre("_orig_mod.module.", sd), "model_ema": ema, "optimizer": opt},
        3: {"state_dict": sd, "state_dict_ema": ema, "epoch": 3},  # timm: the documented order
        4: {**pre("module.", sd), "n_averaged": torch.tensor(5)},  # swa_utils.AveragedModel
    }
    for label, obj in files.items():
        torch.save(obj, tmp_path / f"e_{label}.pt")
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())
    for label in files:
        got = ck.tensors(label)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), label


def test_an_inst_payload_is_named_not_called_corrupt(tmp_path: Path) -> None:
    """INST (protocol 0/1) is not an opcode torch's weights-only unpickler knows: refused, and
    the message names what the pickle asked for."""
    marker = tmp_path / "pwned"
    inst = (
        b"\x80\x02("
        + b"X"
        + struct.pack("<I", 5)
        + b"touch"
        + b"X"
        + struct.pack("<I", len(str(marker)))
        + str(marker).encode()
        + b"l"
        + b"isubprocess\nPopen\n."
    )
    _write_zip(tmp_path / "e_0.pt", inst)
    with pytest.raises(LayerfastError, match="run code.*subprocess.Popen"):
        CheckpointDir(tmp_path).tensors(0)
    assert not marker.exists()
