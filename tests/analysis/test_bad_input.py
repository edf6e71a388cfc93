"""Bad input found by the error-handling audit (auditB, findings F1-F18): each case is refused
with one clear LayerfastError (exit 2 from the CLI), never a traceback, a silent cast or a
half-written directory. One test per finding, named after it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import layerfast.train as train_mod
from layerfast.checkpoints import CheckpointDir, write_manifest
from layerfast.checkpoints.save import save_atomic
from layerfast.cli import main
from layerfast.data import open_data
from layerfast.errors import LayerfastError
from layerfast.train import train
from tests.checkpoints.test_checkpoints import Tiny, sd_at


@pytest.fixture
def umask002():
    """Run with umask 002 (group-writable files), restoring the caller's afterwards: a mode
    that differs from both mkstemp's 0600 and a hard-coded 0644."""
    old = os.umask(0o002)
    yield
    os.umask(old)


# ------------------------------------------------------------------ F1: labels below 2**63


def test_f1_a_label_of_2_63_or_more_is_refused_at_discovery(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    torch.save(sd_at(1), tmp_path / f"epoch_{2**63 - 1}.pt")
    assert CheckpointDir(tmp_path).final == 2**63 - 1  # the largest int64 is fine
    torch.save(sd_at(1), tmp_path / "epoch_99999999999999999999999.pt")
    with pytest.raises(LayerfastError, match=r"epoch_9+\.pt has label 9+ .*below 2\*\*63"):
        CheckpointDir(tmp_path)


def test_f1_a_manifest_epoch_of_2_63_or_more_is_refused(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    torch.save(sd_at(1), tmp_path / "b.pt")
    entries = [{"epoch": 0, "file": "a.pt"}, {"epoch": 10**30, "file": "b.pt"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoints": entries}))
    with pytest.raises(LayerfastError, match=r"checkpoints\[1\] has \"epoch\" 10+, out of range"):
        CheckpointDir(tmp_path)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        write_manifest(tmp_path, entries)


# ------------------------------------------------------- F7: floating weights from int data


@pytest.mark.parametrize(
    ("suffix", "dtype", "name"),
    [(".pt", torch.int64, "int64"), (".safetensors", torch.int8, "int8"),
     (".pt", torch.bool, "bool"), (".safetensors", torch.complex64, "complex64")],
)  # fmt: skip
def test_f7_a_floating_weight_from_a_non_floating_tensor_is_a_dtype_mismatch(
    tmp_path: Path, suffix: str, dtype: torch.dtype, name: str
) -> None:
    sd = sd_at(3)
    sd["fc.weight"] = torch.zeros(3, 8, dtype=dtype)
    sd["conv.bias"] = torch.zeros(2, dtype=dtype)
    path = tmp_path / f"epoch_3{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    torch.save(sd_at(0), tmp_path / "epoch_0.pt")
    ck = CheckpointDir(tmp_path)
    with pytest.raises(LayerfastError) as err:
        ck.validate(Tiny().state_dict())
    msg = str(err.value)
    assert f"epoch_3{suffix}: dtype mismatches" in msg and "(2)" in msg
    assert f"fc.weight {name} in the checkpoint vs float32 in the model" in msg
    assert f"conv.bias {name} in the checkpoint vs float32" in msg
    assert "epoch_0.pt" not in msg and "\n" not in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_f7_float_casts_and_integer_buffers_still_load(tmp_path: Path, dtype) -> None:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd_at(3).items()}
    assert sd["bn.num_batches_tracked"].dtype == torch.int64  # an int buffer, kept as is
    save_file(sd, str(tmp_path / "epoch_3.safetensors"))
    sd["bn.num_batches_tracked"] = sd["bn.num_batches_tracked"].double()  # float into int: ok
    torch.save(sd, tmp_path / "epoch_0.pt")
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())
    model = Tiny()
    model.load_state_dict(ck.tensors(3))
    assert torch.equal(model.fc.weight, sd["fc.weight"].float())


# ------------------------------------------------ F8: unfinished runs, nothing trained


def test_f8_an_incomplete_manifest_is_exposed_with_a_reason(tmp_path: Path) -> None:
    for t in (0, 1, 3):
        torch.save(sd_at(t), tmp_path / f"epoch_{t:03d}.pt")
    entries = [{"epoch": t, "file": f"epoch_{t:03d}.pt"} for t in (0, 1, 3)]
    write_manifest(tmp_path, entries, epochs=10, complete=False)
    why = CheckpointDir(tmp_path).incomplete
    assert why is not None
    assert "did not finish" in why and "up to epoch 3 of 10" in why and "interrupted" in why
    write_manifest(tmp_path, entries, epochs=10, complete=True)
    assert CheckpointDir(tmp_path).incomplete is None
    (tmp_path / "manifest.json").unlink()
    assert CheckpointDir(tmp_path).incomplete is None  # no manifest: nothing is known


def test_f8_a_directory_holding_only_tau0_is_refused_unless_asked_for(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    write_manifest(tmp_path, [{"epoch": 0, "file": "epoch_000.pt"}], epochs=2, complete=False)
    ck = CheckpointDir(tmp_path)
    ck.validate(Tiny().state_dict())  # the file itself is fine ...
    with pytest.raises(LayerfastError) as err:
        ck.check_trained()  # ... but there is no trained model
    msg = str(err.value)
    assert "holds only the initialization (τ=0)" in msg and "did not finish" in msg
    assert "final=0" in msg and "--final 0" in msg
    CheckpointDir(tmp_path, final=0).check_trained()  # asked for on purpose
    torch.save(sd_at(2), tmp_path / "epoch_002.pt")
    (tmp_path / "manifest.json").unlink()
    CheckpointDir(tmp_path).check_trained()


# --------------------------------------------------------------- F16: messages say what


def test_f16_a_text_file_is_not_a_torch_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "epoch_3.pt").write_text("not a checkpoint at all\n")
    with pytest.raises(LayerfastError) as err:
        CheckpointDir(tmp_path).tensors(3)
    msg = str(err.value)
    assert "epoch_3.pt: not a torch checkpoint" in msg
    assert "neither a zip archive" in msg and "legacy torch pickle" in msg
    assert "(101)" not in msg


def test_f16_a_truncated_torch_file_is_still_called_truncated(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "e_0.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "e_0.pt").read_bytes()
    (tmp_path / "e_0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerfastError, match="truncated or corrupt"):
        CheckpointDir(tmp_path).tensors(0)


def test_f16_a_manifest_entry_naming_a_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    (tmp_path / "sub.pt").mkdir()
    entries = [{"epoch": 0, "file": "a.pt"}, {"epoch": 1, "file": "sub.pt"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoints": entries}))
    with pytest.raises(LayerfastError, match=r"lists sub.pt \(epoch 1\), which is not a regular"):
        CheckpointDir(tmp_path)


def test_f16_train_names_the_option_and_the_flag_neutrally(tmp_path: Path) -> None:
    (tmp_path / "epoch_000.pt").write_bytes(b"precious")
    with pytest.raises(LayerfastError) as err:
        train("fcn3x256", "digits", 1, tmp_path, max_samples=64, progress=False)
    assert "pass --overwrite to replace them (overwrite=True from Python)" in str(err.value)


# ----------------------------------------------------- F17: broken links, one file twice


def test_f17_a_broken_link_with_a_checkpoint_suffix_is_an_error(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    torch.save(sd_at(3), tmp_path / "epoch_003.pt")
    (tmp_path / "epoch_005.pt").symlink_to(tmp_path / "gone.pt")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not a checkpoint: ignored
    with pytest.raises(LayerfastError, match=r"epoch_005\.pt is a broken link \(to .*gone\.pt\)"):
        CheckpointDir(tmp_path)
    (tmp_path / "epoch_005.pt").unlink()
    assert CheckpointDir(tmp_path).final == 3
    entries = [{"epoch": 0, "file": "epoch_000.pt"}, {"epoch": 5, "file": "dead.pt"}]
    (tmp_path / "dead.pt").symlink_to(tmp_path / "gone.pt")
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoints": entries}))
    with pytest.raises(LayerfastError, match=r"lists dead\.pt \(epoch 5\), which is a broken link"):
        CheckpointDir(tmp_path)


@pytest.mark.parametrize("kind", ["dir", "devzero"])
def test_f17_a_checkpoint_name_that_is_not_a_file_is_an_error(tmp_path: Path, kind: str) -> None:
    """A directory named epoch_005.pt, or a link to /dev/zero, was skipped in silence, so an
    earlier τ became the final model (the adversarial review)."""
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    torch.save(sd_at(3), tmp_path / "epoch_003.pt")
    if kind == "dir":
        (tmp_path / "epoch_005.pt").mkdir()
    else:
        (tmp_path / "epoch_005.pt").symlink_to("/dev/zero")
    with pytest.raises(LayerfastError, match=r"epoch_005\.pt is not a regular file"):
        CheckpointDir(tmp_path)


def test_f17_one_file_under_two_epochs_is_refused(tmp_path: Path) -> None:
    torch.save(sd_at(0), tmp_path / "epoch_000.pt")
    torch.save(sd_at(3), tmp_path / "epoch_003.pt")
    entries = [{"epoch": 0, "file": "epoch_000.pt"}, {"epoch": 1, "file": "epoch_003.pt"},
               {"epoch": 3, "file": "epoch_003.pt"}]  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoints": entries}))
    with pytest.raises(LayerfastError, match=r"epoch_003\.pt is the same file under two epochs"):
        CheckpointDir(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "epoch_001.pt").symlink_to("epoch_003.pt")  # the same file by another name
    with pytest.raises(LayerfastError, match=r"epoch_001\.pt and epoch_003\.pt is the same file"):
        CheckpointDir(tmp_path)


# ---------------------------------------------------------- F18: files get the usual mode


def test_f18_manifest_and_checkpoints_honour_the_umask(tmp_path: Path, umask002) -> None:
    torch.save(sd_at(0), tmp_path / "a.pt")
    write_manifest(tmp_path, [{"epoch": 0, "file": "a.pt"}])
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o664
    save_atomic({"w": torch.zeros(1)}, tmp_path / "epoch_000.pt")
    assert (tmp_path / "epoch_000.pt").stat().st_mode & 0o777 == 0o664


# --------------------------------------------------------------------- F2, F10, F11: data


def test_f2_a_huge_synthetic_sample_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="sample count 99999999999999999999 is too large"):
        open_data("synthetic:cifar:99999999999999999999")
    with pytest.raises(LayerfastError, match="must be positive, got 0"):
        open_data("synthetic:cifar:0")
    # under the limit, a capped run draws only the labels it reads, and the same ones
    big = open_data("synthetic:cifar:1000000000", max_samples=70)
    small = open_data("synthetic:cifar:70")
    assert big.n == 70 and torch.equal(big.labels(), small.labels())
    (xb, yb), (xs, ys) = next(big.batches(70)), next(small.batches(70))
    assert torch.equal(xb, xs) and torch.equal(yb, ys)


def test_f10_an_idx_header_far_beyond_the_file_is_truncated(tmp_path: Path) -> None:
    for prefix, kind, nd in (("t10k", "images", 3), ("t10k", "labels", 1)):
        head = struct.pack(">HBB", 0, 8, nd) + struct.pack(f">{nd}I", *([2**31] * nd))
        (tmp_path / f"{prefix}-{kind}-idx{nd}-ubyte").write_bytes(head + bytes(100))
    with pytest.raises(LayerfastError) as err:
        open_data(f"mnist:{tmp_path}")
    msg = str(err.value)
    assert "is truncated: header says shape (2147483648, 2147483648, 2147483648)" in msg
    assert f"({16 + 2**93} bytes)" in msg and "longer" not in msg


def test_f11_npz_inputs_must_be_finite(tmp_path: Path) -> None:
    x = np.zeros((10, 1, 8, 8), np.float32)
    x[3, 0, 1, 1] = np.nan
    x[7, 0, 0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(10, np.int64))
    with pytest.raises(
        LayerfastError, match=r"'x' \(as float32\): NaN or Inf values in 2 of 10 samples \(sample 3, 7\); inputs must"
    ):
        open_data(str(tmp_path / "nan.npz"))
    big = np.zeros((4, 1, 8, 8), np.float64)
    big[1, 0, 0, 0] = 1e300  # finite in float64, Inf as the float32 that is fed
    np.savez(tmp_path / "big.npz", x=big, y=np.zeros(4, np.int64))
    with pytest.raises(LayerfastError, match=r"NaN or Inf values in 1 of 4 samples \(sample 1\)"):
        open_data(str(tmp_path / "big.npz"))


def test_f9_f3_npz_that_is_not_a_zip_or_has_a_bad_num_classes(tmp_path: Path) -> None:
    (tmp_path / "t.npz").write_text("not a zip")
    with pytest.raises(LayerfastError, match=r"t\.npz is not a \.npz file \(not a zip archive\)"):
        open_data(str(tmp_path / "t.npz"))
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(LayerfastError, match=r"a single \.npy array"):
        open_data(str(tmp_path / "a.npz"))
    x, y = np.zeros((10, 1, 8, 8), "f4"), np.zeros(10, "i8")
    np.savez(tmp_path / "n.npz", x=x, y=y, num_classes=np.array([1, 2]))
    with pytest.raises(LayerfastError, match="'num_classes' must be one integer.*shape \\(2,\\)"):
        open_data(str(tmp_path / "n.npz"))
    np.savez(tmp_path / "ok.npz", x=x, y=y, num_classes=np.array([4]))
    assert open_data(str(tmp_path / "ok.npz")).num_classes == 4


# ------------------------------------------------- F4, F11, F13: train writes nothing first


def _train(out: Path, **kw) -> dict:
    args = {"arch": "fcn3x256", "data": "digits", "epochs": 1, "max_samples": 64,
            "progress": False, **kw}  # fmt: skip
    return train(out=out, **args)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 99999999999999999999, 1.5, True])
def test_f4_a_seed_outside_int64_is_refused_before_out_exists(tmp_path: Path, seed) -> None:
    with pytest.raises(LayerfastError, match=r"seed must be an integer in -2\*\*63\.\.2\*\*63-1"):
        _train(tmp_path / "o", seed=seed)
    assert not (tmp_path / "o").exists()


def test_f4_extreme_int64_seeds_train(tmp_path: Path) -> None:
    assert _train(tmp_path / "hi", seed=2**63 - 1)["seed"] == 2**63 - 1
    assert _train(tmp_path / "lo", seed=-(2**63))["complete"] is True


def test_f13_an_unknown_arch_leaves_no_out_dir(tmp_path: Path) -> None:
    with pytest.raises(LayerfastError, match="unknown arch 'nope'"):
        _train(tmp_path / "a" / "b" / "o", arch="nope")
    assert list(tmp_path.iterdir()) == []


def test_f13_undecodable_images_leave_no_out_dir(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "imgs"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / c / f"{i}.png")
    (data / "a" / "zbroken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(LayerfastError, match="cannot decode"):
        _train(tmp_path / "o", data=f"imagefolder:{data}", max_samples=None)
    assert not (tmp_path / "o").exists()


def test_f13_a_failure_before_the_first_manifest_undoes_everything(tmp_path: Path, monkeypatch):
    def broken_eval(*a, **k):  # e.g. a test image that does not decode
        raise LayerfastError("cannot decode test image")

    monkeypatch.setattr(train_mod, "evaluate", broken_eval)
    with pytest.raises(LayerfastError, match="cannot decode test image"):
        _train(tmp_path / "new" / "o")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(LayerfastError, match="cannot decode test image"):
        _train(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_f11_nan_training_data_is_blamed_not_the_learning_rate(tmp_path: Path) -> None:
    from layerfast.data import DataSource

    x = torch.rand(40, 1, 8, 8)
    src = DataSource.from_arrays("nanx", x, torch.arange(40) % 4, num_classes=4)
    # after the source's own check (from_arrays refuses it; a .beton of floats would not)
    x[5, 0, 2, 2] = float("nan")
    monkey = pytest.MonkeyPatch()
    monkey.setattr(train_mod, "open_data", lambda *a, **k: src)
    try:
        with pytest.raises(LayerfastError) as err:
            _train(tmp_path / "o", data="nanx", max_samples=None)
    finally:
        monkey.undo()
    msg = str(err.value)
    assert "the training inputs: NaN or Inf values in 1 of 40 samples (sample 5)" in msg
    assert "lr" not in msg
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- F5, F14: bench's numbers


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--naive-variants=-5"], "--naive-variants must be a positive number"),
     (["--naive-variants", "0"], "--naive-variants must be a positive number"),
     (["--batch-size", "0"], "--batch-size must be a positive integer; got 0"),
     (["--batch-size=-3"], "--batch-size must be a positive integer; got -3"),
     (["--seeds", "0"], "--seeds must be a count n >= 1"),
     (["--seeds=-1"], "--seeds must be a count n >= 1"),
     (["--seeds", "100000000"], "--seeds must be at most 1000 (as for analyze); got 100000000"),
     (["--checkpoints", "1"], "--checkpoints needs at least 2"),
     (["--checkpoints", "99999999999999999999"], "and at most 1000"),
     (["--profile-samples", "0"], "--profile-samples must be a positive integer")],
)  # fmt: skip
def test_f5_f14_bench_refuses_what_analyze_refuses(argv, needle, capsys) -> None:
    rc = main(["bench", "--device", "cpu", "--max-samples", "50", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("layerfast: error: ") and needle in err and err.count("\n") == 1


# ------------------------------------------- wiring in analyze: F8 warning, F18 results, F11


def test_analyze_warns_about_an_unfinished_run_and_refuses_an_untrained_one(
        ckpts: Path, tmp_path: Path, capsys, umask002) -> None:
    import shutil

    import layerfast

    ck = Path(shutil.copytree(ckpts, tmp_path / "ck"))
    man = json.loads((ck / "manifest.json").read_text())
    man["complete"], man["epochs"] = False, 10
    (ck / "manifest.json").write_text(json.dumps(man))
    res = layerfast.analyze("fcn3x256", ck, data="digits", max_samples=40, device="cpu",
                            out=tmp_path / "o", progress=False, figures=False)
    err = capsys.readouterr().err
    assert err.startswith("layerfast: warning: ") and "did not finish" in err
    assert "did not finish" in res.run["incomplete"]
    warned = json.loads((tmp_path / "o" / "run.json").read_text())["warnings"]
    assert len(warned) == 1 and "did not finish" in warned[0] and warned[0] in err
    for name in ("results.csv", "distances.csv", "run.json"):  # shared like any new file
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o664, name
    for f in ck.glob("epoch_*.pt"):
        if f.name != "epoch_000.pt":
            f.unlink()
    man["checkpoints"] = [c for c in man["checkpoints"] if c["epoch"] == 0]
    (ck / "manifest.json").write_text(json.dumps(man))
    assert main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--out", str(tmp_path / "p"),
                 "--device", "cpu", "--quiet"]) == 2
    assert "holds only the initialization" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_in_memory_arrays_must_be_finite() -> None:
    from layerfast.data.source import DataSource

    x = torch.zeros(6, 1, 4, 4)
    x[4, 0, 0, 0] = float("nan")
    with pytest.raises(LayerfastError, match=r"arr: x: NaN or Inf values in 1 of 6 samples \(sample 4\)"):
        DataSource.from_arrays("arr", x, torch.zeros(6, dtype=torch.long))
    DataSource.from_arrays("arr", torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))


# --------------------------------------------------- devices: one check for every command


@pytest.mark.parametrize(
    ("device", "gpus", "needle"),
    [("mps", 0, "unknown --device 'mps': use auto, cpu, cuda or cuda:N"),
     ("meta", 0, "unknown --device 'meta'"),
     ("gpu", 0, "unknown --device 'gpu'"),
     ("cuda", 0, "torch sees no CUDA GPU here"),
     ("cuda:1", 1, "--device cuda:1: torch sees 1 CUDA GPU here (cuda:0)"),
     ("cuda:4", 4, "--device cuda:4: torch sees 4 CUDA GPUs here (cuda:0..cuda:3)")],
)  # fmt: skip
def test_an_unusable_device_is_one_error_for_every_command(
    device, gpus, needle, monkeypatch, tmp_path, capsys
) -> None:
    """train, bench and the Python Evaluator took `cuda:5` on a one-GPU machine (and `mps`,
    `meta`) and failed deep inside the first allocation (a traceback, exit 1); analyze
    refused unknown types but not a missing GPU index. One check now serves them all."""
    from layerfast.engine import Evaluator
    from layerfast.engine.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(LayerfastError, match=re.escape(needle)):
        resolve_device(device)
    with pytest.raises(LayerfastError):
        Evaluator(torch.nn.Linear(2, 2), [{}], device=device)
    for argv in (["train", "--arch", "fcn1x8", "--data", "digits", "--epochs", "1", "--out",
                  str(tmp_path / "t")],
                 ["bench", "--arch", "fcn1x8", "--max-samples", "8"],
                 ["analyze", "--arch", "fcn1x8", "--ckpts", str(tmp_path), "--out",
                  str(tmp_path / "a")]):  # fmt: skip
        assert main([*argv, "--device", device]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "a").exists()
