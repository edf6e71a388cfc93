"""Mutation testing of checkpoint discovery and safe loading (session 25): each test kills a
mutant of `checkpoints/safeload.py`, `discover.py`, `directory.py` or `keymap.py` that the
existing tests let through (a refusal message off by one, an upper-case suffix, a compression
method other than deflate, a damaged zip header, a dtype family dropped, ...)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import layerfast.checkpoints.safeload as safeload
from layerfast.checkpoints import CheckpointDir, write_manifest
from layerfast.checkpoints.discover import MAX_LABEL
from layerfast.errors import LayerfastError
from tests.checkpoints.test_checkpoints import sd_at
from tests.checkpoints.test_checkpoints_audit import _repack, _write_zip


def _refusal(tmp_path: Path) -> str:
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).tensors(0)
    return str(err.value)


def _no_load(monkeypatch) -> None:
    def no_load(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(safeload.torch, "load", no_load)


# ------------------------------------------------- refusing code: which names are shown


def test_a_damaged_global_in_a_legacy_file_is_shown_whole(tmp_path: Path) -> None:
    """A control byte inside `_rebuild_tensor_v2` (a legacy file has no checksum) is named as
    damaged text, never cut at the byte into the real torch function `_rebuild_tensor`."""
    path = tmp_path / "e_0.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"_rebuild_tensor_v2") + len(b"_rebuild_tensor")
    path.write_bytes(raw[:at] + b"\x16" + raw[at + 1:])
    msg = _refusal(tmp_path)
    assert "_rebuild_tensor\\x16v2" in msg and "_rebuild_tensor)" not in msg
    assert "legacy (non-zip)" in msg and "\n" not in msg


def test_exactly_five_globals_are_all_named_with_no_and_0_more(tmp_path: Path) -> None:
    names = ["os system", "os popen", "builtins eval", "builtins exec", "subprocess Popen"]
    pkl = b"\x80\x02" + b"".join(b"c" + n.replace(" ", "\n").encode() + b"\n" for n in names)
    _write_zip(tmp_path / "e_0.pt", pkl + b".")
    msg = _refusal(tmp_path)
    shown = ", ".join(n.replace(" ", ".") for n in names)
    assert f"(it asks for {shown})" in msg and "more" not in msg


# ------------------------------------------------- zip archives: compression, headers


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_checkpoint_compressed_other_than_by_deflate_is_refused(
    tmp_path: Path, monkeypatch, method: int
) -> None:
    """Every compression method is refused before torch sees the file, not only deflate."""
    buf = io.BytesIO()
    torch.save(sd_at(0), buf)
    _repack(buf.getvalue(), tmp_path / "e_0.pt", compress=method)
    _no_load(monkeypatch)
    msg = _refusal(tmp_path)
    assert "e_0.pt: refused" in msg and "compressed" in msg


def test_exactly_three_compressed_records_are_all_named_with_no_and_0_more(
    tmp_path: Path, monkeypatch
) -> None:
    with zipfile.ZipFile(tmp_path / "e_0.pt", "w") as z:
        for name in ("a/data.pkl", "a/byteorder", "a/data/0"):
            z.writestr(name, b"x" * 100, compress_type=zipfile.ZIP_DEFLATED)
    _no_load(monkeypatch)
    msg = _refusal(tmp_path)
    assert "compressed (a/data.pkl, a/byteorder, a/data/0)" in msg and "more" not in msg


def test_a_stored_record_claiming_more_bytes_than_the_file_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    """A stored record whose headers claim 4 GB in a small file is refused before torch
    sizes anything by it."""
    path = tmp_path / "e_0.pt"
    torch.save(sd_at(0), path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("byteorder"))
    big = struct.pack("<I", 0xFFFFFFF0)
    raw[info.header_offset + 22:info.header_offset + 26] = big  # local: uncompressed size
    name = info.filename.encode()
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(name)] != name:
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 24:central + 28] = big  # central directory: uncompressed size
    path.write_bytes(bytes(raw))
    _no_load(monkeypatch)
    msg = _refusal(tmp_path)
    assert "e_0.pt: refused" in msg and "byteorder" in msg


def test_a_record_whose_local_header_signature_is_damaged_is_refused(tmp_path: Path) -> None:
    """torch reads a tensor through the local header without checking its signature: the
    CRC check does, so a damaged header is corrupt, not loaded."""
    path = tmp_path / "e_0.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    raw[info.header_offset + 3] ^= 1  # PK\x03\x04 -> PK\x03\x05
    path.write_bytes(bytes(raw))
    msg = _refusal(tmp_path)
    assert "truncated or corrupt" in msg and "data/0 fails its CRC-32 check" in msg


# ------------------------------------------------- empty files, suffixes, the other format


@pytest.mark.parametrize("name", ["e_0.pt", "e_0.safetensors"])
def test_an_empty_file_is_said_to_be_empty(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    msg = _refusal(tmp_path)
    assert f"{name}: cannot read the checkpoint: the file is empty." in msg


def test_an_upper_case_safetensors_suffix_is_read_as_safetensors(tmp_path: Path) -> None:
    save_file(sd_at(0), str(tmp_path / "E_0.SAFETENSORS"))
    got = CheckpointDir(tmp_path).tensors(0)
    assert all(torch.equal(got[k], v) for k, v in sd_at(0).items())


def test_a_torch_file_under_an_upper_case_safetensors_suffix_says_what_it_is(
    tmp_path: Path,
) -> None:
    torch.save(sd_at(0), tmp_path / "E_0.SAFETENSORS")
    msg = _refusal(tmp_path)
    assert "not a safetensors file: it is a torch.save file (a zip archive)" in msg
    assert "truncated" not in msg


def test_a_safetensors_file_of_empty_tensors_under_pt_says_what_it_is(tmp_path: Path) -> None:
    """Its header fills the file exactly (no tensor bytes): still recognised as safetensors."""
    path = tmp_path / "e_0.pt"
    save_file({"w": torch.zeros(0)}, str(path))
    assert int.from_bytes(path.read_bytes()[:8], "little") == path.stat().st_size - 8
    msg = _refusal(tmp_path)
    assert "not a torch.save file: it is a safetensors file" in msg


def test_a_safetensors_file_with_no_tensors_is_refused_at_open(tmp_path: Path) -> None:
    save_file({}, str(tmp_path / "e_0.safetensors"))
    msg = _refusal(tmp_path)
    assert "e_0.safetensors: the safetensors file holds no tensors." in msg


# ------------------------------------------------- dtypes read from metadata, per format


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "a": torch.ones(2, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16),
        "c": torch.ones(2, dtype=torch.complex64), "d": torch.ones(2, dtype=torch.int64),
        "e": torch.ones(2, dtype=torch.float16),
    }  # fmt: skip


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_both_formats_name_and_classify_stored_dtypes_alike(tmp_path: Path, suffix: str) -> None:
    """bfloat16 and complex are floating in a safetensors header as in a torch file: they are
    recorded as stored dtypes and checked for NaN/Inf; bfloat16 is spelled as torch spells it."""
    path = tmp_path / f"e_0{suffix}"
    (save_file(_mixed(), str(path)) if suffix == ".safetensors" else torch.save(_mixed(), path))
    ck = CheckpointDir(tmp_path)
    assert ck.key_dtypes(0) == {
        "a": "float32", "b": "bfloat16", "c": "complex64", "e": "float16"}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.complex64])
def test_nan_in_a_bfloat16_or_complex_safetensors_tensor_is_refused(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    t = torch.tensor([1.0, float("nan")]).to(dtype)
    save_file({"w": t}, str(tmp_path / "e_0.safetensors"))
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match="NaN or Inf weights: e_0.safetensors"):
        ck.validate({"w": torch.zeros(2, dtype=dtype)})


# ------------------------------------------------- discovery: labels, names, the manifest


def _manifest(root: Path, entries: list[dict]) -> None:
    (root / "manifest.json").write_text(json.dumps({"checkpoints": entries}))


def test_labels_and_files_are_in_numeric_order(tmp_path: Path) -> None:
    """τ sorted as numbers everywhere (`files`, `labels`, the final), never as strings."""
    for t in (10, 2, 0):
        torch.save(sd_at(t), tmp_path / f"epoch_{t}.pt")
    ck = CheckpointDir(tmp_path)
    assert list(ck.files) == ck.labels == [0, 2, 10] and ck.final == 10


def test_an_unfinished_copy_of_a_bin_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_0.pt")
    torch.save(sd_at(1), tmp_path / "epoch_1.pt")
    (tmp_path / "epoch_3.bin.part").write_bytes(b"half a download")
    with pytest.raises(LayerfastError, match=r"epoch_3\.bin\.part looks like an unfinished copy"):
        CheckpointDir(tmp_path)


def test_a_hidden_folder_with_a_checkpoint_suffix_is_ignored(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_0.pt")
    (tmp_path / ".epoch_9.pt").mkdir()  # a tool's hidden work folder
    assert CheckpointDir(tmp_path).labels == [0]


def test_an_upper_case_lightning_last_version_suffix_is_refused(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch=0-step=10.ckpt")
    torch.save(sd_at(1), tmp_path / "LAST-v1.ckpt")
    with pytest.raises(LayerfastError, match="LAST-v1.ckpt ends in -v1"):
        CheckpointDir(tmp_path)


@pytest.mark.parametrize("epoch", [True, False])
def test_a_manifest_epoch_of_true_or_false_is_refused(tmp_path: Path, epoch: bool) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    _manifest(tmp_path, [{"epoch": epoch, "file": "a.pt"}])
    with pytest.raises(LayerfastError, match=r"needs a non-negative integer \"epoch\", got (True|False)"):
        CheckpointDir(tmp_path)


def test_the_largest_int64_label_is_accepted_in_a_manifest(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    torch.save(sd_at(1), tmp_path / "b.pt")
    write_manifest(tmp_path, [{"epoch": 0, "file": "a.pt"}, {"epoch": MAX_LABEL, "file": "b.pt"}])
    assert CheckpointDir(tmp_path).final == 2**63 - 1


@pytest.mark.parametrize("name", ["sub/a.pt", "../a.pt", "/tmp/a.pt", "sub/../a.pt"])
def test_a_manifest_file_outside_the_directory_is_refused(tmp_path: Path, name: str) -> None:
    """A manifest names files directly in the directory: never one in a subfolder or outside."""
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    for p in (root / "sub" / "a.pt", tmp_path / "a.pt", root / "a.pt"):
        torch.save(sd_at(0), p)
    _manifest(root, [{"epoch": 0, "file": name}])
    with pytest.raises(LayerfastError, match=r"needs a \"file\" name directly in the directory"):
        CheckpointDir(root)
    with pytest.raises(ValueError, match="plain file name"):
        write_manifest(root, [{"epoch": 0, "file": name}])


def test_a_manifest_file_with_an_upper_case_suffix_is_read(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "INIT.PT")
    save_file(sd_at(1), str(tmp_path / "FINAL.SAFETENSORS"))
    _manifest(tmp_path, [{"epoch": 0, "file": "INIT.PT"}, {"epoch": 1, "file": "FINAL.SAFETENSORS"}])
    ck = CheckpointDir(tmp_path)
    assert ck.labels == [0, 1] and torch.equal(ck.tensors(1)["fc.bias"], sd_at(1)["fc.bias"])


@pytest.mark.parametrize("listed", [{"0": "a.pt"}, "a.pt", None])
def test_a_manifest_whose_checkpoints_is_not_a_list_says_what_it_needs(
    tmp_path: Path, listed: object
) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoints": listed}))
    with pytest.raises(LayerfastError, match=r'must be an object with a "checkpoints" list'):
        CheckpointDir(tmp_path)


def test_a_trainer_folder_is_named_by_its_model_file_not_its_optimizer(tmp_path: Path) -> None:
    """Hugging Face's Trainer saves optimizer.pt, scheduler.pt and rng_state.pth beside the
    model: the message names the model file and links it in."""
    sub = tmp_path / "checkpoint-500"
    sub.mkdir()
    for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):
        torch.save({"x": torch.ones(1)}, sub / name)
    save_file(sd_at(0), str(sub / "model.safetensors"))
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path)
    msg = str(err.value)
    assert "subfolders hold checkpoint-500/model.safetensors (one folder" in msg
    assert "optimizer" not in msg and "ln -s checkpoint-500/model.safetensors" in msg


def test_unlabelled_files_are_listed_in_name_order(tmp_path: Path) -> None:
    """Messages do not depend on the order the file system lists a folder in."""
    names = ["last.pt", "best.pt", "final.pt", "ema.pt", "avg.pt", "swa.pt"]
    for name in names:
        torch.save(sd_at(0), tmp_path / name)
    with pytest.raises(LayerfastError, match="cannot tell the epoch of " + ", ".join(sorted(names))):
        CheckpointDir(tmp_path)


# ------------------------------------------------- CheckpointDir: key maps, caches, messages


def test_keys_that_collapse_when_normalised_are_kept_raw_before_validation(
    tmp_path: Path,
) -> None:
    """`fc.weight` beside `_orig_mod.fc.weight` would both normalise to `fc.weight`: before a
    reference decides, the raw keys are the keys (not none at all)."""
    w = torch.ones(2)
    torch.save({"fc.weight": w, "_orig_mod.fc.weight": w * 2}, tmp_path / "e_0.pt")
    ck = CheckpointDir(tmp_path)
    assert sorted(ck.keys(0)) == ["_orig_mod.fc.weight", "fc.weight"]
    assert torch.equal(ck.tensors(0, ["_orig_mod.fc.weight"])["_orig_mod.fc.weight"], w * 2)


def test_a_new_reference_checks_finiteness_again(tmp_path: Path) -> None:
    """A file that passed against one model is checked again against a model that reads other
    tensors of it: a Lightning file's `model.w` passed, its `loss.p` holds NaN."""
    torch.save({"model.w": torch.ones(2), "loss.p": torch.tensor([1.0, float("nan")])},
               tmp_path / "e_0.pt")  # fmt: skip
    ck = CheckpointDir(tmp_path)
    ck.validate({"w": torch.zeros(2)})
    with pytest.raises(LayerfastError, match=r"NaN or Inf weights: e_0\.pt: tensors \(1\): p"):
        ck.validate({"p": torch.zeros(2)})


def test_exactly_twenty_missing_tensors_are_listed_with_no_and_0_more(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt")
    names = [f"gone{i}" for i in range(20)]
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).tensors(0, names)
    msg = str(err.value)
    assert f"missing tensors (20): {', '.join(names)} (the checkpoint" in msg and "more" not in msg


@pytest.mark.parametrize("complete", ["absent", None, 0, True])
def test_only_complete_false_marks_a_run_unfinished(tmp_path: Path, complete: object) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    torch.save(sd_at(1), tmp_path / "b.pt")
    extra = {} if complete == "absent" else {"complete": complete}
    write_manifest(tmp_path, [{"epoch": 0, "file": "a.pt"}, {"epoch": 1, "file": "b.pt"}],
                   **extra)  # fmt: skip
    assert CheckpointDir(tmp_path).incomplete is None


def test_an_unfinished_run_names_its_last_epoch_and_no_boolean_count(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    torch.save(sd_at(1), tmp_path / "b.pt")
    write_manifest(tmp_path, [{"epoch": 0, "file": "a.pt"}, {"epoch": 1, "file": "b.pt"}],
                   complete=False, epochs=True)  # fmt: skip
    why = CheckpointDir(tmp_path).incomplete
    assert why is not None and "(checkpoints up to epoch 1):" in why and "True" not in why


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 3, bias=False)
        self.fc = nn.Linear(3, 3, bias=False)
        self.fc.weight = self.embed.weight


def test_ties_learnt_after_a_shape_only_reference_remap_the_keys(tmp_path: Path) -> None:
    """A file holding one name of a tied tensor (`safetensors.torch.save_model`) is missing
    the other against a reference that cannot show ties; the model itself shows them, and the
    key maps are made again, serving `fc.weight` from `embed.weight`."""
    model = _Tied()
    save_file({"embed.weight": model.embed.weight.detach().clone()},
              str(tmp_path / "e_0.safetensors"))  # fmt: skip
    ck = CheckpointDir(tmp_path)
    shapes = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}  # no ties
    with pytest.raises(LayerfastError, match=r"missing keys \(1\): fc\.weight"):
        ck.validate(shapes)
    ck.validate(model.state_dict())
    assert torch.equal(ck.tensors(0)["fc.weight"], model.embed.weight.detach())


def test_three_files_with_one_problem_are_all_named(tmp_path: Path) -> None:
    for t in range(3):
        torch.save({"w": torch.ones(2)}, tmp_path / f"e_{t}.pt")
    with pytest.raises(LayerfastError, match=r"e_0\.pt, e_1\.pt, e_2\.pt: shape mismatches"):
        CheckpointDir(tmp_path).validate({"w": torch.zeros(3)})


# ------------------------------------------------- key mapping (DESIGN §2: wrappers, prefixes)


def _keys_before_validation(tmp_path: Path, sd: dict) -> list[str]:
    torch.save(sd, tmp_path / "e_0.pt")
    return sorted(CheckpointDir(tmp_path).keys(0))


def test_a_model_wrapped_twice_by_ddp_loses_both_prefixes(tmp_path: Path) -> None:
    sd = {f"module.module.{k}": v for k, v in sd_at(0).items()}
    assert _keys_before_validation(tmp_path, sd) == sorted(sd_at(0))


def test_only_a_whole_orig_mod_component_is_dropped(tmp_path: Path) -> None:
    """`_orig_mod` is dropped as a key component, never as text inside a module's name."""
    sd = {"_orig_mod.head_orig_mod.weight": torch.ones(2), "_orig_mod.b": torch.ones(1)}
    assert _keys_before_validation(tmp_path, sd) == ["b", "head_orig_mod.weight"]


def test_state_dict_is_preferred_to_model_when_a_file_holds_both(tmp_path: Path) -> None:
    """Rule 1's order: `state_dict` before `model_state_dict`, `model`, `module`."""
    torch.save({"model": sd_at(1), "state_dict": sd_at(2)}, tmp_path / "e_0.pt")
    got = CheckpointDir(tmp_path).tensors(0)
    assert all(torch.equal(got[k], v) for k, v in sd_at(2).items())


def test_extra_state_entries_are_allowed_and_left_out(tmp_path: Path) -> None:
    sd = {**sd_at(0), "fc._extra_state": {"scale": 1.0}}
    assert _keys_before_validation(tmp_path, sd) == sorted(sd_at(0))


def test_a_state_dict_three_levels_deep_is_found_and_four_is_not(tmp_path: Path) -> None:
    torch.save({"state_dict": {"model": {"module": sd_at(0)}}}, tmp_path / "e_0.pt")
    assert sorted(CheckpointDir(tmp_path).keys(0)) == sorted(sd_at(0))
    torch.save({"state_dict": {"model": {"module": {"state_dict": sd_at(0)}}}},
               tmp_path / "e_0.pt")  # fmt: skip
    with pytest.raises(LayerfastError, match="no state dict found"):
        CheckpointDir(tmp_path).keys(0)


def test_a_one_key_file_that_does_not_match_is_a_clear_mismatch(tmp_path: Path) -> None:
    """A lone undotted key is no shared prefix to strip: a mismatch listed, not a KeyError."""
    torch.save({"w": torch.ones(2)}, tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError, match=r"missing keys \(1\): fc\.w; unexpected keys \(1\): w"):
        CheckpointDir(tmp_path).validate({"fc.w": torch.zeros(2)})


def test_a_near_miss_is_listed_against_the_best_matching_key_map(tmp_path: Path) -> None:
    """No key map matches: the one sharing most keys with the model is listed (Lightning's
    `model.` stripped), so the message names the one real difference."""
    torch.save({"model.a": torch.ones(1), "model.b": torch.ones(1)}, tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).validate({"a": torch.zeros(1), "c": torch.zeros(1)})
    assert "missing keys (1): c; unexpected keys (1): b" in str(err.value)


def test_only_a_num_batches_tracked_buffer_itself_may_be_missing(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "e_0.pt")
    ref = {"w": torch.zeros(1), "head.my_num_batches_tracked": torch.zeros(1)}
    with pytest.raises(LayerfastError, match=r"missing keys \(1\): head\.my_num_batches_tracked"):
        CheckpointDir(tmp_path).validate(ref)
    ref = {"w": torch.zeros(1), "bn.num_batches_tracked": torch.zeros((), dtype=torch.long)}
    CheckpointDir(tmp_path).validate(ref)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_float64_weight_beyond_float32_is_inf_in_a_float32_model(
    tmp_path: Path, suffix: str
) -> None:
    """Checked as the model will hold it: 1e300 is finite as stored, Inf once cast."""
    sd = {"w": torch.tensor([1.0, 1e300], dtype=torch.float64)}
    path = tmp_path / f"e_0{suffix}"
    (save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path))
    CheckpointDir(tmp_path).validate({"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(LayerfastError, match=r"NaN or Inf weights: e_0"):
        CheckpointDir(tmp_path).validate({"w": torch.zeros(2, dtype=torch.float32)})
