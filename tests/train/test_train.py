"""`layerfast.train`: the §2 checkpoint layout, the schedule rules, and the promises the analysis
relies on (θ⁰ reproducible, recorded test errors equal a fresh evaluation, atomic files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from layerfast.analysis import analyze
from layerfast.checkpoints import CheckpointDir
from layerfast.data import open_data
from layerfast.engine.naive import naive_evaluate
from layerfast.errors import LayerfastError
from layerfast.models import build_model
from layerfast.train import PAPER_CHECKPOINTS, checkpoint_schedule, lr_at, train

ARCH, DATA, EPOCHS = "fcn3x256", "digits", 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One short digits run shared by the read-only tests (about 2 s on 2 idle cores)."""
    out = tmp_path_factory.mktemp("run")
    return out, train(ARCH, DATA, EPOCHS, out, progress=False)


def _tiny(out: Path, **kw) -> dict:
    """A run small enough to repeat freely: 1 epoch over 64 training samples."""
    args = {"arch": ARCH, "data": DATA, "epochs": 1, "max_samples": 64, "progress": False, **kw}
    return train(out=out, **args)


# -- schedule rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        (100, list(PAPER_CHECKPOINTS)),
        (200, [0, 1, 2, 3, 16, 80, 180, 200]),
        (20, [0, 1, 2, 3, 8, 18, 20]),
        (10, [0, 1, 2, 3, 4, 9, 10]),
        (5, [0, 1, 2, 3, 5]),  # 4.5 rounds half up to 5 and merges with the final epoch
        (4, [0, 1, 2, 3, 4]),
        (3, [0, 1, 2, 3]),
        (1, [0, 1]),
    ],
)
def test_default_schedule_keeps_early_epochs_and_scales_late_ones(epochs, expected):
    assert checkpoint_schedule(epochs) == expected


def test_explicit_schedule_is_sorted_deduplicated_and_gets_0_and_final():
    assert checkpoint_schedule(10, [5, 2, 5]) == [0, 2, 5, 10]
    assert checkpoint_schedule(10, []) == [0, 10]


@pytest.mark.parametrize(("epochs", "taus"), [(0, None), (-1, None), (10, [11]), (10, [-1]),
                                              (10, [1.5]), (10, [True])])  # fmt: skip
def test_bad_schedule_is_refused(epochs, taus):
    with pytest.raises(LayerfastError):
        checkpoint_schedule(epochs, taus)


def test_lr_schedules():
    assert lr_at("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 0.5) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 0.999) < 1e-5
    assert [lr_at("step", 0.1, p) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert lr_at("constant", 0.1, 0.9) == 0.1


# -- the run's layout and manifest ---------------------------------------------------------------


def test_files_and_manifest_are_exactly_the_design_layout(run):
    out, manifest = run
    names = [f"epoch_{t:03d}.pt" for t in range(EPOCHS + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    entries = manifest["checkpoints"]
    assert [(e["epoch"], e["file"]) for e in entries] == list(enumerate(names))
    for e in entries:
        assert e["test_n"] == 360 and e["test_error"] == (360 - e["test_correct"]) / 360
        assert math.isfinite(e["test_loss"])
    meta = {k: manifest[k] for k in ("arch", "data", "num_classes", "in_shape", "seed", "epochs",
                                     "lr", "momentum", "weight_decay", "batch_size", "schedule",
                                     "device")}  # fmt: skip
    assert meta == {"arch": ARCH, "data": DATA, "num_classes": 10, "in_shape": [1, 8, 8],
                    "seed": 0, "epochs": EPOCHS, "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 5e-4, "batch_size": 128, "schedule": "cosine",
                    "device": "cpu"}  # fmt: skip
    assert manifest["torch"] == torch.__version__ and manifest["layerfast"]
    assert manifest["complete"] is True and manifest["train_n"] == 1437


def test_checkpoints_are_plain_state_dicts_loadable_without_pickle(run):
    out, _ = run
    model, _ = build_model(ARCH, 10, (1, 8, 8))
    for t in range(EPOCHS + 1):
        sd = torch.load(out / f"epoch_{t:03d}.pt", weights_only=True)
        assert type(sd) is dict and list(sd) == list(model.state_dict())
        assert all(v.device.type == "cpu" for v in sd.values())
        model.load_state_dict(sd)  # strict: same keys, same shapes


def test_checkpoint_dir_discovers_the_labels(run):
    out, _ = run
    ck = CheckpointDir(out)
    assert ck.labels == list(range(EPOCHS + 1)) and ck.final == EPOCHS
    assert ck.manifest is not None and ck.manifest["arch"] == ARCH


def test_tau0_is_the_seeded_initialization(run):
    out, _ = run
    torch.manual_seed(0)
    model, _ = build_model(ARCH, 10, (1, 8, 8))
    saved = torch.load(out / "epoch_000.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    later = torch.load(out / f"epoch_{EPOCHS:03d}.pt", weights_only=True)
    assert not torch.equal(later["fc1.weight"], saved["fc1.weight"])


def test_recorded_errors_equal_a_fresh_evaluation_exactly(run):
    out, manifest = run
    test = open_data(DATA, split="test")
    model, _ = build_model(ARCH, 10, (1, 8, 8))
    ck = CheckpointDir(out)
    states = [ck.tensors(e["epoch"]) for e in manifest["checkpoints"]]

    def batches():  # another batch size than train's evaluation, raw data normalised the same
        from layerfast.data import to_device

        return (to_device(x, y, test, "cpu") for x, y in test.batches(97))

    counts = naive_evaluate(model, states, batches)
    for e, row in zip(manifest["checkpoints"], counts, strict=True):
        assert int(row[0]) == e["test_correct"]
        assert e["test_error"] == (test.n - int(row[0])) / test.n
        assert e["test_loss"] == pytest.approx(float(row[2]) / test.n, rel=1e-6)


def test_training_reduces_test_error(run):
    errors = [e["test_error"] for e in run[1]["checkpoints"]]
    assert errors[0] > 0.8  # chance on 10 balanced classes
    assert errors[-1] < 0.2 and errors[-1] < errors[1]


# -- behaviour ------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    a = _tiny(tmp_path / "a", epochs=2, max_samples=300)
    b = _tiny(tmp_path / "b", epochs=2, max_samples=300)
    c = _tiny(tmp_path / "c", epochs=2, max_samples=300, seed=1)
    sa, sb, sc = (torch.load(tmp_path / d / "epoch_002.pt", weights_only=True) for d in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc1.weight"], sc["fc1.weight"])
    assert [e["test_correct"] for e in a["checkpoints"]] == [
        e["test_correct"] for e in b["checkpoints"]
    ]
    assert c["seed"] == 1


def test_the_callers_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    _tiny(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_max_samples_caps_training_only(tmp_path):
    m = _tiny(tmp_path)
    assert m["train_n"] == 64 and m["max_samples"] == 64
    assert all(e["test_n"] == 360 for e in m["checkpoints"])


@pytest.mark.parametrize("existing", ["epoch_000.pt", "model_7.pth", "manifest.json"])
def test_refuses_a_directory_that_holds_checkpoints(tmp_path, existing):
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(LayerfastError, match="already holds checkpoints"):
        _tiny(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_overwrite_replaces_an_old_run(tmp_path):
    _tiny(tmp_path, epochs=2)
    (tmp_path / "notes.txt").write_text("kept")
    m = _tiny(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_000.pt", "epoch_001.pt", "manifest.json", "notes.txt"
    ]  # fmt: skip
    assert CheckpointDir(tmp_path).labels == [0, 1] and m["epochs"] == 1


def test_other_files_do_not_block_a_run(tmp_path):
    (tmp_path / "README.txt").write_text("hello")
    assert _tiny(tmp_path)["complete"] is True


@pytest.mark.parametrize(
    "kw",
    [{"schedule": "linear"}, {"batch_size": 0}, {"lr": float("nan")}, {"epochs": 0},
     {"momentum": -0.1}, {"arch": "nosuchnet"}, {"data": "nosuchdata"}],
)  # fmt: skip
def test_bad_arguments_are_layerfast_errors(tmp_path, kw):
    args = {"arch": ARCH, "data": DATA, "epochs": 1, "out": tmp_path / "o", "progress": False}
    with pytest.raises(LayerfastError):
        train(**{**args, **kw})


@pytest.mark.parametrize("momentum", [1.0, 1.5])
def test_momentum_of_one_or_more_is_refused_up_front_not_blamed_on_the_lr(tmp_path, momentum):
    out = tmp_path / "o"
    with pytest.raises(LayerfastError, match="momentum must be below 1"):
        train(arch=ARCH, data=DATA, epochs=1, out=out, progress=False, momentum=momentum)
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LayerfastError, match="not a directory"):
        _tiny(tmp_path / "f")


def test_a_failed_save_leaves_no_partial_file_and_a_readable_manifest(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **k):  # the third checkpoint dies half-way through its write
        calls.append(1)
        if len(calls) == 3:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        _tiny(tmp_path, epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_000.pt", "epoch_001.pt", "manifest.json"
    ]  # fmt: skip
    ck = CheckpointDir(tmp_path)
    assert ck.labels == [0, 1] and ck.manifest["complete"] is False
    monkeypatch.setattr(torch, "save", real_save)
    with pytest.raises(LayerfastError) as info:  # the same command again: say what is there
        _tiny(tmp_path, epochs=3)
    assert str(info.value) == (
        f"--out {tmp_path} already holds checkpoints (epoch_000.pt, epoch_001.pt, manifest.json) "
        "of a run that did not finish (manifest.json: complete false; training does not resume, "
        "it starts over); pass --overwrite to replace them (overwrite=True from Python), or "
        "choose another directory"
    )


def test_a_full_disk_is_one_line_naming_the_file_not_torchs_writer_error(tmp_path, monkeypatch):
    """torch's zip writer swallows the file's OSError and fails at its end with "[enforce fail
    at inline_container.cc] unexpected pos" (a RuntimeError traceback from `layerfast train`).
    The disk's own error is kept and said; the run dir it created is gone again."""
    import errno
    import os

    real_fdopen = os.fdopen

    class Full:  # a file on a disk with 4 KiB left
        def __init__(self, f):
            self.f, self.left = f, 4096

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(LayerfastError) as info:
        _tiny(tmp_path / "run")
    assert str(info.value) == (
        f"--out {tmp_path / 'run'}: cannot write epoch_000.pt (No space left on device)"
    )
    assert not (tmp_path / "run").exists()


def test_progress_bar_only_when_asked(tmp_path, capsys):
    _tiny(tmp_path / "quiet")
    # no bar (a tiny run may warn that it ended at chance: not a progress line)
    assert "train fcn3x256" not in capsys.readouterr().err
    _tiny(tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert "train fcn3x256" in err and "test_err" in err


@pytest.mark.parametrize("schedule", ["step", "constant"])
def test_other_schedules_train(tmp_path, schedule):
    m = _tiny(tmp_path, epochs=2, max_samples=512, schedule=schedule)
    assert m["schedule"] == schedule
    assert m["checkpoints"][-1]["test_error"] < m["checkpoints"][0]["test_error"]


@pytest.mark.cuda
@needs_cuda
def test_cuda_run_matches_cpu_init_and_its_own_fresh_evaluation(tmp_path):
    m = _tiny(tmp_path, device="cuda", epochs=2, max_samples=512)
    assert m["device"].startswith("cuda")
    torch.manual_seed(0)
    model, _ = build_model(ARCH, 10, (1, 8, 8))
    sd0 = torch.load(tmp_path / "epoch_000.pt", weights_only=True)
    assert all(torch.equal(sd0[k], v) for k, v in model.state_dict().items())
    test = open_data(DATA, split="test")
    states = [CheckpointDir(tmp_path).tensors(e["epoch"]) for e in m["checkpoints"]]

    def batches():
        from layerfast.data import to_device

        return (to_device(x, y, test, "cuda") for x, y in test.batches(1024))

    counts = naive_evaluate(model, states, batches, device="cuda")
    assert [int(r[0]) for r in counts] == [e["test_correct"] for e in m["checkpoints"]]


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing"
)
def test_fashion_mnist_learns_and_records_errors_on_the_full_test_split(tmp_path):
    m = _tiny(tmp_path, data="fashion-mnist", max_samples=20000)
    first, last = m["checkpoints"]
    assert m["in_shape"] == [1, 28, 28] and last["test_n"] == 10000
    assert first["test_error"] > 0.8 and last["test_error"] < 0.25


@pytest.mark.parametrize("splits", [False, True])
def test_a_one_split_file_is_trained_on_with_a_warning(tmp_path, capsys, splits):
    """An .npz with only x/y serves the same samples as train and test: the manifest's 'test'
    errors would be training errors. The run goes on (it is the user's data) but says so, on
    stderr and in the manifest's `warnings`, which is read when the run is analysed later."""
    import numpy as np

    g = np.random.default_rng(0)
    x, y = g.integers(0, 256, (48, 8, 8), dtype=np.uint8), np.arange(48) % 3
    path = tmp_path / "d.npz"
    if splits:
        np.savez(path, x_train=x, y_train=y, x_test=x[::-1].copy(), y_test=y[::-1].copy())
    else:
        np.savez(path, x=x, y=y)
    capsys.readouterr()
    train(arch=ARCH, data=str(path), epochs=1, out=tmp_path / "o", progress=False)
    err = capsys.readouterr().err
    assert ("train and test splits begin with the same 48 samples" in err) is (not splits), err
    warned = json.loads((tmp_path / "o" / "manifest.json").read_text())["warnings"]
    # (random labels: the run also ends at chance, and says that too)
    one_split = [w for w in warned if "begin with the same" in w]
    assert len(one_split) == (not splits) and all(f"layerfast: warning: {w}" in err
                                                  for w in warned)
    # and the analysis of those checkpoints says it again, in its own run.json
    res = analyze(ARCH, tmp_path / "o", data=str(path), out=tmp_path / "a", reset="fullmodel",
                  device="cpu", progress=False, figures=False)  # fmt: skip
    again = [w for w in res.run["warnings"] if "its training run warned: " in w]
    assert [w.split("its training run warned: ", 1)[1] for w in again] == warned


def test_a_training_set_too_big_for_the_gpu_is_not_pinned_whole(monkeypatch):
    """Past the GPU staging limit the split stayed on the host, pinned whole: but every batch
    is a fresh gather (`x_all[idx]`) that `to_device` pins again, so the whole-split pin only
    locked that much RAM. It is plain host memory now (on this GPU-less machine pin_memory
    itself raises, so the old code fails here)."""
    import layerfast.train as train_mod

    monkeypatch.setattr(train_mod, "_STAGE_ON_GPU_BYTES", 0)
    src = open_data("digits", split="train", max_samples=64)
    x, y = train_mod._gather(src, torch.device("cuda"))
    assert x.device.type == y.device.type == "cpu" and x.shape[0] == y.shape[0] == 64
    if torch.cuda.is_available():  # is_pinned asks the CUDA host allocator
        assert not x.is_pinned() and not y.is_pinned()
