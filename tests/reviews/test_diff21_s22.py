"""Session 22's fresh-eyes review of session 21's change (a200510..449832c): one test per
defect it introduced or left, each failing on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfast
from layerfast.cli import main
from tests.data.test_data_ffcv import require_ffcv


class _Batches:
    """Batches served by `__getitem__` and `__len__` alone (a map-style torch `Dataset` of
    batches): Python iterates it by the sequence protocol, `isinstance(_, Iterable)` is False."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]  # IndexError past the end ends the iteration


def test_a_sequence_of_batches_and_of_variants_is_evaluated_as_before():
    """9ed143f refused data and variants that are no `collections.abc.Iterable`: a sequence by
    `__getitem__` (which `for` and `list()` iterate, and which the engine evaluated until then)
    became "data must be ... an iterable of (x, y) batches; got _Batches"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    reset = {"0.weight": torch.zeros(3, 4)}
    as_list = layerfast.Evaluator(model, [{}, reset], device="cpu").run(batches)
    ev = layerfast.Evaluator(model, _Batches([{}, reset]), device="cpu")
    res = ev.run(_Batches(batches))
    assert res.n == 10 and torch.equal(res.counts, as_list.counts)


@pytest.mark.ffcv
def test_list_units_opens_the_split_it_is_given(tmp_path, capsys):
    """e8e70c3 warns when a .beton holds the other split than the run reads; `--list-units`
    opened the data as the test split whatever `--split` said, so a train beton under
    `--split train` (what analyze would read, silently) was "used here as the test split"."""
    require_ffcv()
    from layerfast.data import convert

    to = convert("digits", tmp_path / "d-train.beton", split="train")
    capsys.readouterr()
    assert main(["analyze", "--arch", "fcn3x256", "--data", str(to), "--split", "train",
                 "--list-units"]) == 0
    out = capsys.readouterr()
    assert "4 units" in out.out and "warning" not in out.err
    assert main(["analyze", "--arch", "fcn3x256", "--data", str(to), "--list-units"]) == 0
    assert "holds the train split of 'digits'" in capsys.readouterr().err  # still said


def test_the_chance_note_names_the_split_measured(ckpts, tmp_path, capsys):
    """60d640e and 82cfe86 made the summary and the heatmap say "train error" for a
    `--split train` run, but the note on a baseline at chance (stderr, run.json's
    baseline_note) still called the training set's error "the final model's test error"."""
    res = layerfast.analyze("fcn3x256", ckpts, final=0, split="train", reset="reinit",
                            checkpoints=[0], max_samples=200, device="cpu", progress=False,
                            figures=False, out=tmp_path / "init")
    note = res.run["baseline_note"]
    assert note.startswith("the final model's train error (") and "test error" not in note
    assert note in capsys.readouterr().err


def test_a_joint_entry_given_as_a_numpy_array_of_names_is_taken_again(tmp_path):
    """d212dfa refused joint entries that are no `Sequence` (for a set, whose order would name
    the unit at random), which also refused a 1-D numpy array of names (`df.unit.values[:2]`,
    ordered, and taken before as one variant per τ) with "not a ndarray"."""
    import numpy as np

    from layerfast.checkpoints import CheckpointDir
    from layerfast.errors import LayerfastError
    from layerfast.variants import make_variants
    from tests.units_variants.test_variants import UNITS, write_run

    model, ck = write_run(tmp_path), CheckpointDir(tmp_path)
    vs = make_variants(model, UNITS, ck, reset=(), joint=[np.array(["fc", "conv"])])
    assert [(v.unit, v.checkpoint) for v in vs[1:]] == [("fc+conv", t) for t in (0, 1, 5)]
    with pytest.raises(LayerfastError, match="not a set"):  # unordered: still refused
        make_variants(model, UNITS, ck, reset=(), joint=[{"fc", "conv"}])


def test_a_program_whose_own_arguments_are_dash_m_layerfast_gets_its_keyboardinterrupt(
        tmp_path):
    """e6d6a2b turns a Ctrl-C while `python -m layerfast` imports torch into one line and exit
    130, and leaves a program importing layerfast its KeyboardInterrupt; but it took any
    "-m layerfast" pair in the interpreter's command line for the command, so
    `python study.py -m layerfast` (the program's own arguments) lost its KeyboardInterrupt."""
    import subprocess
    import sys

    prog = tmp_path / "study.py"  # a Ctrl-C where `import torch` runs, made deterministic
    prog.write_text("import builtins\nreal = builtins.__import__\n"
                    "def fake(name, *a, **k):\n"
                    "    if name.split('.')[0] == 'torch':\n"
                    "        raise KeyboardInterrupt\n"
                    "    return real(name, *a, **k)\n"
                    "builtins.__import__ = fake\nimport layerfast\n")
    p = subprocess.run([sys.executable, str(prog), "-m", "layerfast"], capture_output=True,
                       text=True, timeout=120)
    assert "KeyboardInterrupt" in p.stderr and "layerfast: interrupted" not in p.stderr
    assert p.returncode in (1, -2)  # Python exits -2 on an unhandled Ctrl-C


def test_a_distance_that_rounds_to_1000_is_written_as_1000_is():
    """6570c79 chose `_two_sig`'s notation by the value as rounded for the small end only:
    999.6 was written "1000" (four digits) beside 1000.4's "1.0e3" in distances.png."""
    from layerfast.report.figures import _two_sig

    assert _two_sig(999.6) == _two_sig(1000.4) == "1.0e3"
    assert _two_sig(999.4) == "999" and _two_sig(0.00996) == _two_sig(0.0101) == "0.010"


def test_list_units_refuses_a_manifest_class_count_that_analyze_refuses(ckpts, tmp_path,
                                                                           capsys):
    """441fbb2 builds list-units' model for the manifest's num_classes, as analyze does, but
    one that is no positive integer was skipped without a word: the dry run listed units
    (exit 0) for a directory analyze then refused ("num_classes must be a positive integer")."""
    import json
    import shutil

    bad = tmp_path / "ck"
    shutil.copytree(ckpts, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "num_classes": "10"}))
    argv = ["analyze", "--arch", "fcn3x256", "--ckpts", str(bad)]
    assert main([*argv, "--list-units"]) == 2
    assert "num_classes must be a positive integer, got '10'" in capsys.readouterr().err
    assert main([*argv, "--reset", "fullmodel", "--out", str(tmp_path / "o")]) == 2
    assert "num_classes must be a positive integer, got '10'" in capsys.readouterr().err


def test_bench_profiles_the_pass_without_the_first_batch_checks(tmp_path):
    """8746211 made every `run` check the model again; `bench --profile`'s profiled run comes
    after a warm-up run on the same, unchanged model, and its op table then held the checks'
    own forwards (on CPU fcn3x256: addmm 34 calls instead of 14, median, nonzero, abs)."""
    from layerfast.bench import profile_pass
    from layerfast.data import open_data

    torch.manual_seed(0)
    src = open_data("digits", split="test", max_samples=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    ev = layerfast.Evaluator(model, [{}, {"3.weight": torch.zeros(10, 16)}], device="cpu")
    checked = []
    settle = ev._settle_cuts
    ev._settle_cuts = lambda *a: checked.append(1) or settle(*a)
    out = profile_pass(ev, src, tmp_path / "prof.txt")
    assert len(checked) == 1  # the warm-up's checks; the profiled run keeps their verdicts
    assert out["samples"] == 32 and "median" not in (tmp_path / "prof.txt").read_text()
    res = ev.run(src)  # outside the profile, a run checks the model again
    assert len(checked) == 2 and res.n == 32


def test_a_reused_evaluator_probes_the_layout_of_the_changed_model_again():
    """8746211 checks a reused Evaluator's model again on each run, but not its layout
    (`settle_layout`): a model changed to one that cannot run in channels_last failed as
    "the model fails on samples 0..3" (a fresh Evaluator says the layout is at fault, and under
    `layout="auto"` on CUDA falls back to the contiguous layout and runs)."""
    from layerfast.errors import LayerfastError

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.flat = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(256, 3), True

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.flatten(1) if self.flat else h.view(h.shape[0], -1))

    torch.manual_seed(0)
    model, data = Net(), [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    variants = [{}, {"conv.weight": torch.zeros(4, 3, 3, 3)}]
    ev = layerfast.Evaluator(model, variants, device="cpu", layout="channels_last")
    assert ev.run(data).n == 4
    model.flat = False  # `view` on a channels_last map: only the contiguous layout runs it
    with pytest.raises(LayerfastError, match="does not run with channels_last activations"):
        ev.run(data)
