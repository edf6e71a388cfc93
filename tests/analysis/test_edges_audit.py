"""Audit at the edges of scale and data (DESIGN.md §4, §5): one sample, fewer samples than the
batch, 2/3/1000 classes, labels a checkpoint cannot score, one-output models, inf/NaN logits,
verdicts exactly on the threshold. Every number is compared with a plain-torch computation.

Tests named `test_fix_*` failed before the fix they name;
`test_correct_at_5_below_5_classes_is_one_definition` failed before the naive loop's fix.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast
from layerfast.cli import main as cli_main
from layerfast.errors import LayerfastError
from layerfast.metrics import results_table
from layerfast.report import summary_table
from layerfast.report.terminal import _verdict

_Z = 1.959963984540054


# ----------------------------------------------------------------------------- helpers


class _Net(nn.Sequential):
    def __init__(self, d: int, c: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))


def make_net(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """The user factory these tests analyze (`--arch test_edges_audit:make_net`)."""
    return _Net(int(np.prod(in_shape)), num_classes)


ARCH = f"{__name__}:make_net"


def _case(tmp: Path, n: int, c: int, d: int = 6, labels=None, manifest: bool = False) -> tuple:
    """Checkpoints τ=0, 1 of a `make_net` for `c` classes and an npz of `n` samples."""
    rng = np.random.default_rng(n * 1000 + c)
    torch.manual_seed(c)
    ck = tmp / "ck"
    ck.mkdir()
    m = make_net(c, (1, 1, d))
    torch.save(m.state_dict(), ck / "epoch_000.pt")
    torch.save({k: v + torch.randn_like(v) for k, v in m.state_dict().items()}, ck / "epoch_001.pt")
    if manifest:
        (ck / "manifest.json").write_text(json.dumps({
            "num_classes": c,
            "checkpoints": [{"epoch": 0, "file": "epoch_000.pt"}, {"epoch": 1, "file": "epoch_001.pt"}],
        }))
    y = rng.integers(0, c, n) if labels is None else np.asarray(labels)
    data = tmp / "d.npz"
    np.savez(data, x=rng.standard_normal((n, d)).astype(np.float32), y=y,
             num_classes=np.array(max(c, int(y.max()) + 1)))
    return ck, data


def _wilson(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, _Z * _Z
    den = 1 + z2 / n
    c = (p + z2 / (2 * n)) / den
    h = _Z / den * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


def _by_hand(res, ck: Path, data: Path, c: int) -> None:
    """Every row of `res.table` against plain torch: load τ or the variant's own draw into a
    fresh model, forward all samples at once, count."""
    d = np.load(data)
    x = torch.from_numpy(d["x"]).view(len(d["y"]), -1)
    y = torch.from_numpy(d["y"]).long()
    n = len(y)
    final = torch.load(ck / "epoch_001.pt")
    tau = {0: torch.load(ck / "epoch_000.pt"), 1: final}
    from layerfast.variants import make_variants

    unit_keys = {"1": ("1.weight", "1.bias"), "3": ("3.weight", "3.bias")}
    model = make_net(c, (1, 1, x.shape[1])).eval()
    model.load_state_dict(final)
    base_pred = model(x).argmax(1)
    # the rerandom draws are layerfast's own (reproducible per seed); take them from variants
    from layerfast.analysis import build
    from layerfast.units import make_units

    m2, spec, ckd, _ = build(ARCH, ck, str(data))
    draws = {(v.unit, v.seed): v.overrides() for v in make_variants(
        m2, make_units(m2, arch=spec), ckd, spec, reset=["rerandom"], seeds=[1])}
    t = res.table
    assert len(t) == 1 + 2 * 3 + 2  # baseline, 2 units x (τ0, τ1, seed 1), fullmodel τ0, τ1
    with torch.no_grad():
        for _, row in t.iterrows():
            sd = dict(final)
            if row.kind == "reinit":
                sd.update({k: tau[int(row.checkpoint)][k] for k in unit_keys[row.unit]})
            elif row.kind == "rerandom":
                sd.update(draws[(row.unit, int(row.seed))])
            elif row.kind == "fullmodel":
                sd = dict(tau[int(row.checkpoint)])
            model.load_state_dict(sd)
            logits = model(x)
            pred = logits.argmax(1)
            k = int((pred != y).sum())
            assert row.n == n
            assert row.error == k / n
            assert (row.error_lo, row.error_hi) == pytest.approx(_wilson(k, n), abs=1e-12)
            assert row.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
            assert row.agreement == float((pred == base_pred).sum()) / n
            if c >= 5:
                label = logits.gather(1, y[:, None])
                assert row.top5_error == float(((logits > label).sum(1) >= 5).sum()) / n
            else:
                assert math.isnan(row.top5_error)


# ----------------------------------------------------------------------------- tiny data


@pytest.mark.parametrize(
    ("n", "c", "batch_size", "labels"),
    [
        (1, 10, None, None),  # one test sample
        (7, 10, 64, None),  # fewer samples than the batch
        (7, 10, 3, None),  # a last partial batch of one
        (40, 2, None, None),  # C = 2: top-5 empty
        (40, 3, 16, None),
        (5, 1000, 2, None),  # C = 1000, a handful of samples
        (30, 10, None, [4] * 30),  # every label one class
    ],
)
def test_tiny_data_matches_plain_torch(tmp_path, one_thread, n, c, batch_size, labels) -> None:
    ck, data = _case(tmp_path, n, c, labels=labels)
    res = layerfast.analyze(ARCH, ck, data=str(data), seeds=1, out=tmp_path / "out",
                            batch_size=batch_size, device="cpu", progress=False, figures=False)
    _by_hand(res, ck, data, c)
    written = pd_read(tmp_path / "out" / "results.csv")
    assert written.shape[0] == len(res.table)


def pd_read(path: Path):
    from layerfast.report import read_results

    return read_results(path)


def test_wilson_at_n_1_and_the_ends(tmp_path) -> None:
    """k = 0 and k = n at n = 1: [0, z²/(1+z²)] and [1/(1+z²), 1], exact at the closed end."""
    from layerfast.metrics import wilson

    z2 = _Z * _Z
    assert wilson(0, 1) == (0.0, pytest.approx(z2 / (1 + z2), abs=1e-15))
    assert wilson(1, 1) == (pytest.approx(1 / (1 + z2), abs=1e-15), 1.0)
    for k, n in [(0, 7), (7, 7), (3, 7), (0, 10**9), (10**9, 10**9)]:
        assert wilson(k, n) == pytest.approx(_wilson(k, n), abs=1e-12)


# ----------------------------------------------------------------------------- labels


def test_labels_beyond_the_models_outputs_exit_2_and_write_nothing(tmp_path, capsys) -> None:
    ck, data = _case(tmp_path, 20, 3, labels=[0, 1, 2, 4] * 5, manifest=True)
    out = tmp_path / "out"
    rc = cli_main(["analyze", "--arch", ARCH, "--ckpts", str(ck), "--data", str(data),
                   "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "0..4" in err and "3 outputs" in err and "Traceback" not in err
    assert not out.exists()


def test_fix_uint64_labels_beyond_int64_are_refused_not_wrapped_negative() -> None:
    """check_labels cast uint64 2**64-1 to int64 -1 without a word (before: no error)."""
    from layerfast.data.source import check_labels

    with pytest.raises(LayerfastError, match="does not fit int64"):
        check_labels("t", np.array([0, 2**64 - 1], dtype=np.uint64))
    assert check_labels("t", np.array([0, 2**63 - 1], dtype=np.uint64)).tolist() == [0, 2**63 - 1]


def _fcn_ckpts(tmp: Path) -> Path:
    """fcn3x256 for digits (10 classes), τ = 0, 1, without a manifest (a user's own run)."""
    from layerfast.models import build_model

    ck = tmp / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    m, _ = build_model("fcn3x256", 10, (1, 8, 8))
    torch.save(m.state_dict(), ck / "epoch_000.pt")
    torch.save({k: v * 1.01 for k, v in m.state_dict().items()}, ck / "epoch_001.pt")
    return ck


def _digits_npz(tmp: Path, last_label: int) -> Path:
    rng = np.random.default_rng(0)
    path = tmp / "d.npz"
    np.savez(path, x=rng.integers(0, 17, (10, 1, 8, 8)).astype(np.uint8),
             y=np.array([0] * 9 + [last_label]))
    return path


@pytest.mark.parametrize(("label", "why"), [(2**50, "out of memory"), (2**55, "overflows")])
def test_fix_a_huge_label_without_a_manifest_is_one_clear_error(tmp_path, capsys, label: int,
                                                                 why: str) -> None:
    """A label of 2**50 (an id, not a class index) made fcn3x256 a head of 2**50 outputs: the
    allocation failed with a traceback, exit 1 (before: RuntimeError). 2**55 fits int64, so the
    data takes it, but its head has more bytes than int64 counts: torch says "Storage size
    calculation overflowed", which the out-of-memory message did not catch at first."""
    ck, data = _fcn_ckpts(tmp_path), _digits_npz(tmp_path, label)
    out = tmp_path / "out"
    rc = cli_main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", str(data),
                   "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{label + 1:,} classes" in err and "largest label" in err and why in err
    assert not out.exists()


def test_fix_labels_beyond_a_manifestless_checkpoint_say_where_the_classes_came_from(
        tmp_path) -> None:
    """Data labelled 0..10 with a 10-class checkpoint and no manifest: the shape mismatch
    message did not say the 11 came from the data's labels (before: no hint)."""
    ck, data = _fcn_ckpts(tmp_path), _digits_npz(tmp_path, 10)
    with pytest.raises(LayerfastError) as exc:
        layerfast.analyze("fcn3x256", ck, data=str(data), out=tmp_path / "out", progress=False)
    msg = str(exc.value)
    assert "[10, 256] in the checkpoint vs [11, 256]" in msg
    assert "built for 11 classes" in msg and "largest label" in msg
    assert not (tmp_path / "out").exists()


def test_fix_a_one_output_model_is_refused(tmp_path) -> None:
    """One class: argmax is always 0, every variant scored error 0 and every unit 'robust'
    whatever its weights (before: a full run of meaningless verdicts)."""
    ck, data = _case(tmp_path, 20, 1)
    with pytest.raises(LayerfastError, match="1 output: with one class"):
        layerfast.analyze(ARCH, ck, data=str(data), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- inf/NaN logits


def _nan_inf_variants(m: nn.Module) -> list[dict]:
    sd = m.state_dict()

    def at(key, cls, value):
        b = sd[key].clone()
        b[cls] = value
        return {key: b}

    return [
        {},
        {"5.weight": torch.full_like(sd["5.weight"], math.nan)},  # every logit NaN
        {"5.bias": torch.full_like(sd["5.bias"], math.inf)},  # every logit +inf
        at("5.bias", 3, math.inf),  # one +inf class: loss inf or NaN
        at("5.bias", 3, -math.inf),  # one -inf class
        at("5.bias", 7, math.nan),  # one NaN class wins the argmax
        {"5.weight": torch.zeros_like(sd["5.weight"]), "5.bias": torch.zeros_like(sd["5.bias"])},
        {"5.weight": sd["5.weight"] * 1e30},  # overflow
        {"1.weight": torch.full_like(sd["1.weight"], math.nan)},  # NaN from the first layer
        {"3.weight": sd["3.weight"] * 0.5},  # an ordinary variant next to them
    ]


@pytest.mark.parametrize("fanout", [False, True])
def test_nan_and_inf_variants_count_as_plain_torch_and_poison_no_neighbour(one_thread,
                                                                           fanout) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                      nn.Linear(8, 10)).eval()
    x, y = torch.randn(50, 1, 1, 6), torch.randint(0, 10, (50,))
    variants = _nan_inf_variants(m)
    res = layerfast.Evaluator(m, variants, device="cpu", precision="fp32", batch_size=7,
                              fanout=fanout).run([(x[i:i + 7], y[i:i + 7]) for i in range(0, 50, 7)])
    final = m.state_dict()
    with torch.no_grad():
        ref = m(x).argmax(1)
        for i, v in enumerate(variants):
            m2 = copy.deepcopy(m)
            m2.load_state_dict({**final, **v})
            lg = m2(x)
            pred = lg.argmax(1)  # torch's tie rule: the first maximal index, NaN maximal
            want = [(pred == y).sum().item(),
                    # top-5: the label among a stable descending sort's first 5 (NaN first)
                    (torch.sort(lg, dim=1, descending=True, stable=True).indices[:, :5]
                     == y[:, None]).any(1).sum().item(),
                    F.cross_entropy(lg, y, reduction="sum").item(),
                    (pred == ref).sum().item()]
            got = res.counts[i].tolist()
            assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3], (i, got, want)
            assert (math.isnan(got[2]) and math.isnan(want[2])) or got[2] == pytest.approx(
                want[2], rel=1e-5), (i, got, want)
    # the ordinary variant alone gives the same counts as next to NaN and inf ones
    alone = layerfast.Evaluator(m, variants[-1:], device="cpu", precision="fp32",
                                batch_size=7).run([(x, y)]).counts[0]
    assert alone[[0, 1, 3]].tolist() == res.counts[-1, [0, 1, 3]].tolist()
    assert alone[2].item() == pytest.approx(res.counts[-1, 2].item(), rel=1e-6)


def test_fix_summary_prints_a_diverged_distance_compactly() -> None:
    """A τ with weights near 1e38 printed max l2_rel as 39 digits (before: '4171816...0000')."""
    table = _table([95, 60, 94, 93], n=100)
    dist = _dist({"fc1": 4.17e38, "fc2": 0.5123, "fc3": 12345.6})
    text = summary_table(table, dist)
    cells = {line.split()[0]: line.split()[-1] for line in text.splitlines()
             if line.startswith(("fc1", "fc2", "fc3"))}
    assert cells == {"fc1": "4.17e+38", "fc2": "0.5123", "fc3": "1.23e+04"}


# ----------------------------------------------------------------------------- verdicts


@dataclass
class _V:
    unit: str
    kind: str
    checkpoint: int | None = None
    seed: int | None = None


def _table(correct: list[int], n: int, threshold: float = 0.05):
    units = [f"fc{i}" for i in range(1, len(correct))]
    vs = [_V("*", "baseline")] + [_V(u, "reinit", 0) for u in units]
    c = np.array(correct, dtype=np.float64)
    return results_table(vs, np.stack([c, c, np.full(len(c), 0.1 * n), c], 1), n, 10, threshold)


def _dist(rel: dict[str, float]):
    import pandas as pd

    # at τ = 3: the summary's max l2_rel is over the τ other than 0 (θ^0 against itself is 0)
    return pd.DataFrame({"unit": list(rel), "checkpoint": [3] * len(rel), "l2": list(rel.values()),
                         "l2_rel": list(rel.values()), "linf": list(rel.values())})


@pytest.mark.parametrize("threshold", ["0", "0.01", "0.02", "0.05", "0.1", "0.15", "0.3", "1"])
def test_verdict_is_exact_at_every_boundary(threshold) -> None:
    """robust ⇔ k/n ≤ threshold in exact arithmetic, for every n ≤ 250 and every k, in the
    table and in the terminal's re-judging (e.g. 5 of 100 at 0.05: robust; 6: critical)."""
    thr, exact = float(threshold), Fraction(threshold)
    for n in range(1, 251):
        base = n - n // 4
        ks = np.arange(-(n - base), base + 1)
        t = _table([base, *(base - ks)], n, thr)
        want = [Fraction(int(k), n) <= exact for k in ks]
        assert (t.verdict.iloc[1:] == "robust").tolist() == want, n
        assert [_verdict(float(d), thr) == "robust" for d in t.delta_error.iloc[1:]] == want, n


# ----------------------------------------------------------------------------- engine (not ours)


def test_an_empty_first_batch_is_skipped_or_refused_clearly() -> None:
    """Found by this audit (ZeroDivisionError in plan.choose_kmax, sizing K from the empty
    batch); fixed in the engine by 76710ad (K sized from the planned B). Kept as a guard."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(6, 10)).eval()
    x, y = torch.randn(5, 1, 1, 6), torch.randint(0, 10, (5,))
    try:
        res = layerfast.Evaluator(m, [{"1.bias": torch.zeros(10)}], device="cpu",
                                  precision="fp32").run(
            [(x[:0], y[:0]), (x, y)])
    except LayerfastError:
        return
    assert res.n == 5


def test_correct_at_5_below_5_classes_is_one_definition() -> None:
    from layerfast.engine.naive import naive_evaluate

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(40, 1, 1, 6), torch.randint(0, 3, (40,))
    vs = [{"1.weight": torch.randn(3, 6)}]
    got = layerfast.Evaluator(m, vs, device="cpu", precision="fp32").run([(x, y)]).counts
    want = naive_evaluate(m, vs, lambda: [(x, y)])
    assert got[0, 1].item() == want[0, 1].item() == got[0, 0].item() < 40  # correct@1, not all



@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--arch", "fcn1x99999999999", "--data", "digits", "--epochs", "1", "--out", "t"],
        ["analyze", "--arch", "fcn1x99999999999", "--list-units"],
        ["bench", "--arch", "fcn1x99999999999", "--max-samples", "8"],
    ],
)
def test_a_model_too_large_to_build_is_one_clear_error_everywhere(tmp_path, monkeypatch, capsys,
                                                                  argv) -> None:
    """The out-of-memory message lived in analyze's build only: train, bench and --list-units
    ended in the allocator's traceback (exit 1). It is build_model's now."""
    monkeypatch.chdir(tmp_path)
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot build fcn1x99999999999 for 10 classes" in err and "out of memory" in err
    assert not (tmp_path / "t").exists()


def test_a_manifest_class_count_past_int64_is_one_clear_error(tmp_path, capsys) -> None:
    """num_classes 2**70 in manifest.json failed to unpack inside torch (TypeError, exit 1)."""
    ck = _fcn_ckpts(tmp_path)
    (ck / "manifest.json").write_text(json.dumps(
        {"checkpoints": [{"epoch": t, "file": f.name} for t, f in
                         enumerate(sorted(ck.glob("*.pt")))], "num_classes": 2**70}))
    rc = cli_main(["analyze", "--arch", "fcn3x256", "--ckpts", str(ck), "--data", "digits",
                   "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "its size overflows" in err
    assert "manifest.json's num_classes" in err and not (tmp_path / "o").exists()
