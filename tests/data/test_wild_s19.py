"""Checkpoint directories and datasets as other tools leave them (DESIGN.md §2, §4): macOS
copies, Hugging Face Trainer and Lightning output, torchvision's download layout, idx files
whose name says the wrong thing about their compression. Each ends in the right result or one
LayerfastError that says what to do."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from layerfast.checkpoints import CheckpointDir
from layerfast.cli import main
from layerfast.data import open_data
from layerfast.errors import LayerfastError

#: What macOS writes beside every file it copies to a non-HFS volume (`._<name>`): a resource
#: fork header, not the file's data.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(32)


def _fcn_sd(seed: int) -> dict[str, torch.Tensor]:
    from layerfast.models import get_arch

    torch.manual_seed(seed)
    return dict(get_arch("fcn3x256").build(10, (1, 8, 8)).state_dict())


def _analyze(ck: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", "digits",
               "--out", str(out), "--device", "cpu", "--quiet", "--max-samples", "40",
               "--reset", "reinit"])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, out: Path) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert not out.exists()
    return lines[0]


# --- hidden files -----------------------------------------------------------------------------


def test_appledouble_and_ds_store_beside_checkpoints_are_ignored(tmp_path: Path) -> None:
    """`._epoch_3.pt` (a macOS resource fork) has label 3 by its name; it must neither clash
    with `epoch_3.pt` nor be read as a corrupt checkpoint."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for t in (0, 3):
        torch.save(_fcn_sd(t), ck / f"epoch_{t}.pt")
        (ck / f"._epoch_{t}.pt").write_bytes(APPLEDOUBLE)
    (ck / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    d = CheckpointDir(ck)
    assert d.labels == [0, 3] and d.files[3].name == "epoch_3.pt"


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_imagefolder_ignores_appledouble_files(tmp_path: Path) -> None:
    """`._0.png` beside `0.png` (a folder copied from a Mac) was read as an image and refused
    the whole data set: "cannot decode ._0.png"."""
    pytest.importorskip("PIL")
    root = tmp_path / "imf"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            _png(root / c / f"{i}.png", i)
            (root / c / f"._{i}.png").write_bytes(APPLEDOUBLE)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "._a").write_bytes(APPLEDOUBLE)  # the resource fork of the folder itself
    src = open_data(f"imagefolder:{root}")
    assert (src.n, src.num_classes) == (4, 2)
    ys = torch.cat([y for _, y in src.batches(3)])
    assert ys.tolist() == [0, 0, 1, 1]


def test_imagefolder_macosx_folder_of_only_appledouble_is_refused_as_imageless(
        tmp_path: Path) -> None:
    """A zip made on a Mac unpacks a `__MACOSX/` twin of the tree holding only `._*` files; as
    a class of "images" it shifted nothing only because decoding failed. It is an imageless
    class folder now, refused with the documented message."""
    pytest.importorskip("PIL")
    root = tmp_path / "imf"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        _png(root / c / "0.png", 0)
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(APPLEDOUBLE)
    with pytest.raises(LayerfastError, match=r"__MACOSX.*hold no images"):
        open_data(f"imagefolder:{root}")


# --- Lightning's name-clash suffix ------------------------------------------------------------


@pytest.mark.parametrize("clash", ["epoch=2-step=24-v1.ckpt", "last-v1.ckpt"])
def test_lightning_version_suffix_is_refused_not_read_as_the_label(tmp_path: Path, capsys,
                                                                   clash: str) -> None:
    """Lightning's ModelCheckpoint appends `-v1` when a name is taken. The last integer is then
    that version: `epoch=2-step=24-v1.ckpt` got label 1 beside `epoch=1-step=12.ckpt` (label
    12), so the epoch-1 model was analysed as the final one, exit 0, without a word."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "epoch=0-step=0.ckpt")
    torch.save(_fcn_sd(1), ck / "epoch=1-step=12.ckpt")
    torch.save(_fcn_sd(2), ck / clash)
    out = tmp_path / "out"
    line = _one_line(*_analyze(ck, out, capsys), out)
    assert clash in line and "-v1" in line and "manifest.json" in line


def test_version_suffix_without_an_earlier_integer_keeps_its_label(tmp_path: Path) -> None:
    """`net-v0.pt`, `net-v2.pt`, `resnet18-v3.pt`: not Lightning's names (no `last`, no
    `key=number`), so the last integer is the label, as the contract says."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "net-v0.pt")
    torch.save(_fcn_sd(2), ck / "net-v2.pt")
    torch.save(_fcn_sd(2), ck / "resnet18-v3.pt")
    assert CheckpointDir(ck).labels == [0, 2, 3]


def test_a_manifest_makes_lightning_names_fine(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_fcn_sd(0), ck / "epoch=0-step=0.ckpt")
    torch.save(_fcn_sd(2), ck / "epoch=2-step=24-v1.ckpt")
    (ck / "manifest.json").write_text(
        '{"checkpoints": [{"epoch": 0, "file": "epoch=0-step=0.ckpt"},'
        ' {"epoch": 24, "file": "epoch=2-step=24-v1.ckpt"}]}')
    assert CheckpointDir(ck).labels == [0, 24]


# --- Hugging Face Trainer: one subfolder per checkpoint --------------------------------------


def _hf_tree(tmp_path: Path, name: str = "model.safetensors") -> Path:
    root = tmp_path / "hf"
    for step in (0, 500):
        sub = root / f"checkpoint-{step}"
        sub.mkdir(parents=True)
        sd = _fcn_sd(step)
        if name.endswith(".safetensors"):
            save_file(sd, sub / name)
        else:
            torch.save(sd, sub / name)
        (sub / "trainer_state.json").write_text("{}")
        for other in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            (sub / other).write_bytes(b"not a model")
    return root


def test_checkpoints_in_subfolders_are_named_with_what_to_do(tmp_path: Path, capsys) -> None:
    """Hugging Face Trainer's `out/checkpoint-500/model.safetensors` was "no checkpoints in
    out", with no word of the subfolders."""
    root = _hf_tree(tmp_path)
    out = tmp_path / "out"
    line = _one_line(*_analyze(root, out, capsys), out)
    assert "checkpoint-500/model.safetensors" in line
    assert "ln -s checkpoint-0/model.safetensors" in line
    assert "optimizer" not in line and "training_args" not in line


def test_the_hint_s_links_load(tmp_path: Path) -> None:
    """What the hint says to do works: a link per subfolder, labelled by the folder's step."""
    root = _hf_tree(tmp_path, "pytorch_model.bin")
    with pytest.raises(LayerfastError, match=r"checkpoint-0/pytorch_model\.bin.*"
                                             r"checkpoint-0\.pt"):
        CheckpointDir(root)
    for step in (0, 500):
        (root / f"checkpoint-{step}.pt").symlink_to(f"checkpoint-{step}/pytorch_model.bin")
    d = CheckpointDir(root)
    assert d.labels == [0, 500]
    assert torch.equal(d.tensors(500, ["fc1.weight"])["fc1.weight"], _fcn_sd(500)["fc1.weight"])


def test_only_empty_subfolders_is_still_no_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    with pytest.raises(LayerfastError, match=r"^no checkpoints in .*expected files ending in"):
        CheckpointDir(root)


def test_a_manifest_path_into_a_subfolder_says_what_to_do(tmp_path: Path) -> None:
    """A manifest listing `checkpoint-500/model.safetensors` was told to name "a file inside
    the directory", which that file is."""
    root = _hf_tree(tmp_path)
    (root / "manifest.json").write_text(
        '{"checkpoints": [{"epoch": 500, "file": "checkpoint-500/model.safetensors"}]}')
    with pytest.raises(LayerfastError, match=r"directly in the directory.*ln -s"):
        CheckpointDir(root)


# --- idx files --------------------------------------------------------------------------------


def _idx(kind: str, n: int = 3) -> bytes:
    if kind == "images":
        return struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28)
    return struct.pack(">HBBI", 0, 8, 1, n) + bytes(range(n))


def _write_idx(folder: Path, gz: bool, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, nd in (("images", 3), ("labels", 1)):
        data = _idx(kind)
        (folder / f"t10k-{kind}-idx{nd}-ubyte{suffix}").write_bytes(
            gzip.compress(data) if gz else data)


def test_gzipped_idx_without_gz_suffix_says_so(tmp_path: Path) -> None:
    _write_idx(tmp_path / "d", gz=True, suffix="")
    with pytest.raises(LayerfastError, match=r"gzip-compressed.*\.gz.*gunzip"):
        open_data(f"mnist:{tmp_path / 'd'}")


def test_plain_idx_named_gz_says_so(tmp_path: Path) -> None:
    """A browser that unpacks a download but keeps its `.gz` name: the file was called
    "corrupt or truncated", which it is not."""
    _write_idx(tmp_path / "d", gz=False, suffix=".gz")
    with pytest.raises(LayerfastError, match=r"not gzip-compressed.*drop the \.gz") as exc:
        open_data(f"mnist:{tmp_path / 'd'}")
    assert "corrupt" not in str(exc.value)


def test_corrupt_gzip_idx_is_still_corrupt(tmp_path: Path) -> None:
    d = tmp_path / "d"
    _write_idx(d, gz=True, suffix=".gz")
    p = d / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(LayerfastError, match="corrupt or truncated"):
        open_data(f"mnist:{d}")


# --- torchvision's download layout ---------------------------------------------------------


@pytest.mark.parametrize(("spec", "sub"), [("mnist", "MNIST/raw"),
                                           ("fashion-mnist", "FashionMNIST/raw"),
                                           ("mnist", "raw")])
def test_torchvision_raw_layout_names_the_folder_to_give(tmp_path: Path, spec: str,
                                                         sub: str) -> None:
    """torchvision's download puts the idx files under `root/MNIST/raw/`; `mnist:root` said
    only "no t10k-images-idx3-ubyte in root"."""
    _write_idx(tmp_path / "root" / sub, gz=False, suffix="")
    with pytest.raises(LayerfastError, match=rf"{spec}:{tmp_path / 'root' / sub}"):
        open_data(f"{spec}:{tmp_path / 'root'}")
    assert open_data(f"{spec}:{tmp_path / 'root' / sub}").n == 3


@pytest.mark.parametrize("name", ["epoch_2.pt.part", "epoch_2.pt.crdownload", "epoch_2.pt.tmp"])
def test_an_unfinished_later_checkpoint_is_refused_not_skipped(tmp_path: Path, name: str) -> None:
    """A browser's `epoch_2.pt.part` beside `epoch_0.pt` and `epoch_1.pt` was skipped, and τ=1
    silently analysed as the final model (exit 0). One labelled no later is left alone."""
    from layerfast.checkpoints.discover import _from_names

    for n in ("epoch_0.pt", "epoch_1.pt", "epoch_1.pt.part", name):
        (tmp_path / n).write_bytes(b"x")
    with pytest.raises(LayerfastError, match=rf": {re.escape(name)} looks like an unfinished "
                                             r"copy .* later than epoch_1\.pt: let it finish, "
                                             r"or move it away; .*final model\.$"):
        _from_names(tmp_path)
    (tmp_path / name).unlink()
    assert sorted(_from_names(tmp_path)) == [0, 1]
