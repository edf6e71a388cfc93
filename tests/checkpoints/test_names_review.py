"""Review of unusual module names, parametrized layers, mixed owners and legacy checkpoints.

Checked against a plain-torch loop written outside the suite (torch.load the files, set the
unit's tensors, full forward, count), all exact in fp32 and so not repeated here: ModuleDict
keys with commas, brackets, spaces, `*`, `?`, `re:`, quotes, a newline and unicode through
`--units` (`a[,]b`, `x[[]0]`, `re:^d\\.re:y$`), layer/block/stage, results.csv and
distances.csv quoting, resume and `layerfast report`; weight_norm / spectral_norm / orthogonal
and user parametrizations with one and two originals (reinit, fullmodel); a module owning a
parameter next to children that own theirs, root parameters, a parameter on a Sequential,
under --bn with-layer/keep/separate and block granularity (reinit, rerandom, fullmodel).

The tests below are the defects that review found.
"""

from __future__ import annotations

import collections
import fractions

import pandas as pd
import pytest
import torch
from torch import nn

from layerfast.checkpoints.safeload import open_file
from layerfast.errors import LayerfastError
from layerfast.report.figures import distance_figure, heatmap_figure
from layerfast.units import make_units

# ---- unit names drawn as figure labels ----------------------------------------------------

#: Module names may hold `$` (`nn.ModuleDict({"cost$": ...})`, `add_module("$x^2$", ...)`):
#: matplotlib reads a `$...$` pair as mathtext, so `ü$x^2$` was drawn as "üx²", and a pair
#: that is not valid mathtext made savefig raise, after the whole pass (analyze exit 1, with a
#: traceback and no run.json; `layerfast report` the same).
_MATH_NAMES = ["ü$x^2$", "$\\q$", "plain"]


def _table(units: list[str]) -> pd.DataFrame:
    rows = [dict(unit="*", kind="baseline", checkpoint=pd.NA, seed=pd.NA, error=0.1, n=100)]
    for u in units:
        rows.append(dict(unit=u, kind="reinit", checkpoint=0, seed=pd.NA, error=0.5, n=100))
        rows.append(dict(unit=u, kind="rerandom", checkpoint=pd.NA, seed=1, error=0.9, n=100))
    rows.append(dict(unit="*", kind="fullmodel", checkpoint=0, seed=pd.NA, error=0.9, n=100))
    t = pd.DataFrame(rows)
    t["checkpoint"] = t["checkpoint"].astype("Int64")
    t["seed"] = t["seed"].astype("Int64")
    return t


def _labels_literal(fig) -> list[tuple[str, bool]]:
    fig.canvas.draw()  # raised ValueError (mathtext ParseFatalException) for "$\\q$"
    out = []
    for ax in fig.axes:
        for lab in ax.get_yticklabels():
            if lab.get_text():
                out.append((lab.get_text(), lab._preprocess_math(lab.get_text())[1] is False))
    return out


def test_heatmap_draws_unit_names_with_dollars_literally():
    labels = _labels_literal(heatmap_figure(_table(_MATH_NAMES)))
    assert {t for t, _ in labels} >= set(_MATH_NAMES)
    assert all(literal for t, literal in labels if t in _MATH_NAMES), labels


def test_distance_figure_draws_unit_names_with_dollars_literally():
    rows = [dict(unit=u, checkpoint=c, l2=0.5, l2_rel=0.1, linf=0.2)
            for u in _MATH_NAMES for c in ("0", "1", "rerandom:1")]
    labels = _labels_literal(distance_figure(pd.DataFrame(rows)))
    assert {t for t, _ in labels} >= set(_MATH_NAMES)
    assert all(literal for t, literal in labels if t in _MATH_NAMES), labels


# ---- a module named "*" ---------------------------------------------------------------------


class _Star(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module("*", nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, "*")(x))


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_a_module_named_star_is_no_unit_named_star(granularity):
    """results.csv marks the baseline and fullmodel rows with unit `*` (DESIGN §5), which is why
    the pattern `*` is refused; a top-level module named `*` made a unit `*` all the same, whose
    reinit and rerandom rows then shared the mark (a reader taking `unit == "*"` for the
    baseline and fullmodel rows got them too). Refused, naming the pattern that selects it."""
    with pytest.raises(LayerfastError, match=r"\[\*\]"):
        make_units(_Star(), granularity=granularity)
    (u,) = make_units(_Star(), patterns=["[*]"])  # the way round it works
    assert u.name == "[*]" and u.keys == ("*.weight", "*.bias")


# ---- --units and module names that are not globs --------------------------------------------


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"a,b": nn.Linear(4, 4), "x[0]": nn.Linear(4, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d["x[0]"](self.d["a,b"](x))


def test_units_hint_for_a_literal_name_with_brackets_works():
    """`--units 'd.x[0]'` (the module's exact name) matches nothing, since `[0]` is a glob
    class; the error suggested `re:d.x[0]`, a regex that does not match either. It should give
    a pattern that does."""
    with pytest.raises(LayerfastError) as err:
        make_units(_Odd(), patterns=["d.x[0]"])
    assert "d.x[[]0]" in str(err.value)
    (u,) = make_units(_Odd(), patterns=["d.x[[]0]"])
    assert u.modules == ("d.x[0]",)


def test_units_hint_for_a_name_with_a_comma():
    """`--units 'd.a,b'` is split into `d.a` and `b`; the error only said `d.a` matched nothing
    (and suggested `re:d.a`). It should say that commas split and how to write one."""
    with pytest.raises(LayerfastError) as err:
        make_units(_Odd(), patterns="d.a,b")
    assert "[,]" in str(err.value)
    (u,) = make_units(_Odd(), patterns="d.a[,]b")
    assert u.modules == ("d.a,b",)


# ---- legacy (non-zip) checkpoints with a damaged byte --------------------------------------


def _legacy(tmp_path, obj) -> bytes:
    p = tmp_path / "src.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=False)
    return p.read_bytes()


def _flipped(tmp_path, data: bytes, needle: bytes, offset: int, mask: int = 1):
    i = data.index(needle) + offset
    bad = bytearray(data)
    bad[i] ^= mask
    p = tmp_path / "epoch_003.pt"
    p.write_bytes(bytes(bad))
    return p


_SD = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))


@pytest.mark.parametrize(
    ("needle", "offset"),
    [
        (b"collections", 10),  # collections.OrderedDict -> collectionr.OrderedDict
        (b"OrderedDict", 0),  # -> collections.NrderedDict
        (b"_rebuild_tensor_v2", 1),  # torch._utils._rebuild_tensor_v2 -> _sebuild_tensor_v2
        (b"FloatStorage", 0),  # torch.FloatStorage -> torch.GloatStorage
        (b"collections", 11),  # the newline ending the module name: the name runs on
    ],
)
def test_legacy_bit_flip_in_a_global_says_the_file_may_be_damaged(tmp_path, needle, offset):
    """A legacy torch file has no checksum. One flipped bit in a GLOBAL name was reported only
    as "refused: loading this file would run code (it asks for collectionr.OrderedDict)",
    sending the user hunting a payload in a broken copy. (78 of 4,000 single-bit flips of a
    small file's first 2,000 bytes read as code; zip files are checked by CRC-32.) The name
    cannot tell damage from a request (a script's `__main__.Net` names nothing here either),
    so a legacy file's refusal says it may be damaged; a flip in a torch name is corrupt."""
    p = _flipped(tmp_path, _legacy(tmp_path, _SD), needle, offset)
    with pytest.raises(LayerfastError) as err:
        f = open_file(p)
        [f.get(k) for k in f.keys()]
    msg = str(err.value)
    assert "truncated or corrupt" in msg and len(msg.splitlines()) == 1
    assert "would run code" not in msg or "no checksum" in msg


def test_legacy_file_asking_for_real_code_is_still_refused_as_code(tmp_path):
    """The control: an intact legacy pickle asking for a real callable outside the allow-list."""
    p = tmp_path / "epoch_003.pt"
    p.write_bytes(_legacy(tmp_path, {"state_dict": dict(_SD), "f": fractions.Fraction(1, 3)}))
    with pytest.raises(LayerfastError, match="would run code.*fractions.Fraction"):
        open_file(p)


@pytest.mark.parametrize("where", ["data", "local name length"])
def test_zip_bit_flip_in_tensor_data_is_corrupt(tmp_path, where):
    """A zip checkpoint stores a CRC-32 per record, but torch checks none and layerfast only
    checked `data.pkl`'s, after a refusal: one flipped bit in a tensor's bytes loaded as a
    silently different weight and the analysis ran on it. A flip in the record's local header
    name length passes `zipfile.testzip` while torch reads the tensor from shifted bytes."""
    import struct
    import zipfile

    src = tmp_path / "src.pt"
    torch.save(_SD, src)
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    n, e = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    if where == "data":
        data[info.header_offset + 30 + n + e + 5] ^= 0x04  # inside w's float bytes
    else:
        data[info.header_offset + 26] ^= 0x80
    p = tmp_path / "epoch_003.pt"
    p.write_bytes(bytes(data))
    with pytest.raises(LayerfastError, match="corrupt"):
        f = open_file(p)
        [f.get(k) for k in f.keys()]
