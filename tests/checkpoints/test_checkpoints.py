"""CheckpointDir: discovery, labels, formats in the wild, safe loading, laziness, validation."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import layerfast.checkpoints.directory as directory
import layerfast.checkpoints.safeload as safeload
from layerfast.checkpoints import CheckpointDir, label_from_stem, write_manifest
from layerfast.errors import LayerfastError


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)


def sd_at(tau: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + tau)
    return {k: v.clone() for k, v in Tiny().state_dict().items()}


def assert_sd_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TouchViaAllowedClass:
    """Tries to reach a method of an allow-listed class (pathlib) to create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.PosixPath(self.marker),))


# ------------------------------------------------------------------------------ discovery


def test_labels_from_file_names_and_final(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    torch.save(sd_at(3), tmp_path / "model_3.pth")
    torch.save(sd_at(5), tmp_path / "run2_epoch=5.ckpt")
    save_file(sd_at(10), str(tmp_path / "checkpoint-10.safetensors"))
    (tmp_path / "notes_99.txt").write_text("not a checkpoint")
    torch.save(sd_at(7), tmp_path / ".hidden_7.pt")
    ck = CheckpointDir(tmp_path)
    assert ck.labels == [0, 3, 5, 10]
    assert ck.final == 10
    assert ck.manifest is None
    assert ck.files[3].name == "model_3.pth"
    assert CheckpointDir(tmp_path, final=5).final == 5
    with pytest.raises(LayerfastError, match="label 4"):
        CheckpointDir(tmp_path, final=4)
    assert_sd_equal(ck.tensors(10), sd_at(10))
    assert_sd_equal(ck.tensors(5), sd_at(5))


def test_label_is_last_integer() -> None:
    assert label_from_stem("epoch_003") == 3
    assert label_from_stem("epoch=3-step=300") == 300
    assert label_from_stem("resnet50_run1_12") == 12
    assert label_from_stem("last") is None


def test_manifest_labels_and_metadata(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "init.pt")
    torch.save(sd_at(4), tmp_path / "best_1.pt")  # the name's integer is NOT the label
    torch.save(sd_at(9), tmp_path / "stray_9.pt")  # not in the manifest: ignored
    write_manifest(
        tmp_path,
        [{"epoch": 0, "file": "init.pt"}, {"epoch": 4, "file": "best_1.pt", "test_error": 0.1}],
        arch="tiny",
        out=tmp_path,
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".manifest")]
    ck = CheckpointDir(tmp_path)
    assert ck.labels == [0, 4]
    assert ck.manifest is not None and ck.manifest["arch"] == "tiny"
    assert ck.manifest["out"] == str(tmp_path)
    assert_sd_equal(ck.tensors(4), sd_at(4))
    with pytest.raises(ValueError):
        write_manifest(tmp_path, [], checkpoints=[])


def test_manifest_errors(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"checkpoints": [{"epoch": 0, "file": "gone.pt"}]})
    )
    with pytest.raises(LayerfastError, match="gone.pt"):
        CheckpointDir(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"checkpoints": [{"epoch": 1, "file": "a.pt"}, {"epoch": 1, "file": "a.pt"}]})
    )
    with pytest.raises(LayerfastError, match="epoch 1 is listed twice"):
        CheckpointDir(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LayerfastError, match="manifest"):
        CheckpointDir(tmp_path)


def test_duplicate_and_missing_labels(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_1.pt")
    torch.save(sd_at(0), tmp_path / "model_01.pth")
    with pytest.raises(LayerfastError, match="epoch_1.pt and model_01.pth both have label 1"):
        CheckpointDir(tmp_path)
    (tmp_path / "model_01.pth").unlink()
    torch.save(sd_at(0), tmp_path / "last.ckpt")
    with pytest.raises(LayerfastError, match="last.ckpt"):
        CheckpointDir(tmp_path)


def test_empty_missing_and_not_a_dir(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="no checkpoints"):
        CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match="does not exist"):
        CheckpointDir(tmp_path / "nope")
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(LayerfastError, match="not a directory"):
        CheckpointDir(tmp_path / "f.pt")


# ------------------------------------------------------------------------- formats in the wild


def test_torchvision_reference_style(tmp_path: Path) -> None:
    model = Tiny()
    model.load_state_dict(sd_at(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.fc.weight.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    args = argparse.Namespace(lr=0.1, output_dir=pathlib.Path("/runs/x"), data_path="/d")
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 3,
        "args": args,
        "best_acc1": np.float64(0.75),
    }
    torch.save(ckpt, tmp_path / "model_3.pth")
    ck = CheckpointDir(tmp_path)
    assert_sd_equal(ck.tensors(3), model.state_dict())
    ck.validate(Tiny().state_dict())


def _lightning(sd: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> dict:
    inner = {f"model.{k}": v for k, v in sd.items()}
    inner.update(extra or {})
    return {
        "epoch": 2,
        "global_step": 200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": inner,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "/x/epoch=2.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 2, "_last_lr": [0.1]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "arch": "tiny"},
    }


def test_lightning_prefix_resolved_against_model(tmp_path: Path) -> None:
    for tau in (0, 2):
        torch.save(_lightning(sd_at(tau)), tmp_path / f"epoch={tau}.ckpt")
    ck = CheckpointDir(tmp_path)
    assert all(k.startswith("model.") for k in ck.keys(2))  # no reference yet: as saved
    ck.validate(Tiny().state_dict())
    assert_sd_equal(ck.tensors(2), sd_at(2))
    assert_sd_equal(ck.tensors(0, ["fc.bias"]), {"fc.bias": sd_at(0)["fc.bias"]})


def test_lightning_module_with_extra_submodule(tmp_path: Path) -> None:
    extra = {"criterion.weight": torch.ones(3)}
    sd = sd_at(1)
    del sd["bn.num_batches_tracked"]  # still a match: eval never reads it
    torch.save(_lightning(sd, extra), tmp_path / "e_1.ckpt")
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())
    assert_sd_equal(ck.tensors(1), sd)


def test_two_matching_subtrees_is_ambiguous(tmp_path: Path) -> None:
    sd = {f"teacher.{k}": v for k, v in sd_at(1).items()}
    sd.update({f"student.{k}": v for k, v in sd_at(2).items()})
    torch.save({"state_dict": sd}, tmp_path / "e_1.ckpt")
    with pytest.raises(LayerfastError, match="several parts.*'student.', 'teacher.'"):
        CheckpointDir(tmp_path).validate(Tiny().state_dict())


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_ddp_and_compile_prefixes(tmp_path: Path, prefix: str) -> None:
    torch.save(
        {"model_state_dict": {prefix + k: v for k, v in sd_at(1).items()}}, tmp_path / "e1.pt"
    )
    ck = CheckpointDir(tmp_path)
    assert sorted(ck.keys(1)) == sorted(sd_at(1))  # stripped without a reference
    ck.validate(Tiny().state_dict())
    assert_sd_equal(ck.tensors(1), sd_at(1))


def test_safetensors_and_legacy_format(tmp_path: Path) -> None:
    save_file(sd_at(0), str(tmp_path / "e_0.safetensors"))
    torch.save(sd_at(1), tmp_path / "e_1.pt", _use_new_zipfile_serialization=False)  # can't mmap
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())
    assert_sd_equal(ck.tensors(0), sd_at(0))
    assert_sd_equal(ck.tensors(1), sd_at(1))


def test_no_state_dict_inside(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, tmp_path / "e_3.pt")
    with pytest.raises(LayerfastError, match="no state dict found.*'epoch'"):
        CheckpointDir(tmp_path).tensors(3)


# ------------------------------------------------------------------------------ safety


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": sd_at(0), "payload": Evil(marker)}, tmp_path / "e_0.pt")
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError) as err:
        ck.validate(Tiny().state_dict())
    msg = str(err.value)
    assert "run code" in msg and "system" in msg and "e_0.pt" in msg
    assert "never unpickles code" in msg
    assert not marker.exists()


def test_raw_pickle_and_allowed_class_method_are_refused(tmp_path: Path) -> None:
    m1, m2 = tmp_path / "pwned1", tmp_path / "pwned2"
    with open(tmp_path / "e_0.pt", "wb") as f:
        pickle.dump({"model": sd_at(0), "x": Evil(m1)}, f, protocol=4)
    torch.save({"model": sd_at(1), "x": TouchViaAllowedClass(m2)}, tmp_path / "e_1.pt")
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match=r"run code \(it asks for posix\.system"):
        ck.tensors(0)
    with pytest.raises(LayerfastError, match=r"run code \(it asks for builtins\.getattr"):
        ck.tensors(1)
    assert not m1.exists() and not m2.exists()


def test_whole_module_pickle_is_refused(tmp_path: Path) -> None:
    torch.save(Tiny(), tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError, match="run code.*Tiny"):
        CheckpointDir(tmp_path).tensors(0)


@pytest.mark.parametrize("name", ["e_0.pt", "e_0.safetensors", "e_0.pth"])
def test_truncated_or_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(sd_at(0), str(path))
    elif name.endswith(".pth"):
        path.write_bytes(b"")
    else:
        torch.save({"model": sd_at(0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match=rf"{name}: cannot read the checkpoint"):
        ck.validate(Tiny().state_dict())


# ---------------------------------------------------------------------------- laziness


def test_safetensors_reads_only_requested_tensors(tmp_path: Path, monkeypatch) -> None:
    save_file(sd_at(0), str(tmp_path / "e_0.safetensors"))
    read: list[str] = []
    real = safeload.safe_open

    class Spy:
        def __init__(self, *a, **kw) -> None:
            self._f = real(*a, **kw)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(safeload, "safe_open", Spy)
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict(), check_finite=False)
    assert read == []  # validation reads headers only
    got = ck.tensors(0, ["fc.bias"])
    assert list(got) == ["fc.bias"] and read == ["fc.bias"]
    assert torch.equal(got["fc.bias"], sd_at(0)["fc.bias"])


def test_torch_files_are_memory_mapped_weights_only(tmp_path: Path, monkeypatch) -> None:
    torch.save({"model": sd_at(0)}, tmp_path / "e_0.pt")
    calls: list[dict] = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    ck = CheckpointDir(tmp_path)
    got = ck.tensors(0, ["conv.weight"])
    assert list(got) == ["conv.weight"]
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    got["conv.weight"].zero_()  # a fresh copy: neither the cache nor the file change
    assert torch.equal(ck.tensors(0, ["conv.weight"])["conv.weight"], sd_at(0)["conv.weight"])
    assert len(calls) == 1  # served from the LRU of opened files


def test_open_file_cache_is_bounded(tmp_path: Path) -> None:
    for tau in range(7):
        torch.save(sd_at(tau), tmp_path / f"e_{tau}.pt")
    torch.save(sd_at(7), tmp_path / "e_7.pt", _use_new_zipfile_serialization=False)
    torch.save(sd_at(8), tmp_path / "e_8.pt", _use_new_zipfile_serialization=False)
    ck = CheckpointDir(tmp_path)
    for tau in ck.labels:
        assert_sd_equal(ck.tensors(tau, ["fc.bias"]), {"fc.bias": sd_at(tau)["fc.bias"]})
        assert len(ck._open_files) <= CheckpointDir.CACHE_SIZE
        assert sum(f.in_memory for f in ck._open_files.values()) <= 1


def test_cycling_over_the_checkpoints_opens_each_file_once(tmp_path: Path, monkeypatch) -> None:
    """Variants read unit after unit from every τ in turn: the paper's 8 checkpoints must not
    thrash the LRU (each miss is a weights-only unpickle of the whole file's metadata)."""
    for tau in range(8):
        torch.save(sd_at(tau), tmp_path / f"e_{tau}.pt")
    opened: list[str] = []
    real = directory.open_file
    monkeypatch.setattr(directory, "open_file", lambda p: opened.append(p.name) or real(p))
    ck = CheckpointDir(tmp_path)
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        for tau in ck.labels:
            assert_sd_equal(ck.tensors(tau, [name]), {name: sd_at(tau)[name]})
    assert sorted(opened) == sorted(f"e_{t}.pt" for t in range(8))


def test_missing_tensor_request(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError, match="missing tensors.*nope"):
        CheckpointDir(tmp_path).tensors(0, ["nope"])
    with pytest.raises(LayerfastError, match="labels: 0"):
        CheckpointDir(tmp_path).tensors(5)


# ---------------------------------------------------------------------------- validation


def test_all_mismatches_in_one_message(tmp_path: Path) -> None:
    bad = sd_at(0)
    del bad["fc.bias"]  # missing
    bad["head.weight"] = torch.zeros(1)  # unexpected
    bad["conv.weight"] = torch.zeros(4, 1, 3, 3)  # shape
    del bad["bn.num_batches_tracked"]  # tolerated
    torch.save(bad, tmp_path / "e_0.pt")
    other = sd_at(1)
    other["fc.weight"] = torch.zeros(3, 9)
    torch.save(other, tmp_path / "e_1.pt")
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError) as err:
        ck.validate(Tiny().state_dict())
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "e_0.pt",
        "missing keys (1): fc.bias",
        "unexpected keys (1): head.weight",
        "conv.weight [4, 1, 3, 3] in the checkpoint vs [2, 1, 3, 3] in the model",
        "e_1.pt",
        "fc.weight [3, 9] in the checkpoint vs [3, 8] in the model",
    ):
        assert part in msg, part
    assert "num_batches_tracked" not in msg
    with pytest.raises(LayerfastError, match="e_1.pt") as err:
        ck.validate(Tiny().state_dict(), labels=[1])
    assert "e_0.pt" not in str(err.value)


def test_long_mismatch_lists_are_truncated(tmp_path: Path) -> None:
    sd = {f"extra{i}.weight": torch.zeros(1) for i in range(30)}
    sd.update(sd_at(0))
    torch.save(sd, tmp_path / "e_0.pt")
    with pytest.raises(LayerfastError, match=r"unexpected keys \(30\):.*\.\.\. and 10 more"):
        CheckpointDir(tmp_path).validate(Tiny().state_dict())


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    sd = sd_at(0)
    del sd["bn.num_batches_tracked"]
    torch.save(sd, tmp_path / "e_0.pt")
    CheckpointDir(tmp_path).validate(Tiny().state_dict())


def test_nan_weights_named(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt")
    sd = sd_at(1)
    sd["fc.weight"][1, 2] = float("nan")
    sd["bn.running_var"][0] = float("inf")
    save_file(sd, str(tmp_path / "e_1.safetensors"))
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError, match=r"NaN or Inf.*e_1.safetensors.*fc.weight") as err:
        ck.validate(Tiny().state_dict())
    assert "bn.running_var" in str(err.value) and "e_0.pt" not in str(err.value)
    ck.validate(Tiny().state_dict(), check_finite=False)
    ck.validate(Tiny().state_dict(), labels=[0])
