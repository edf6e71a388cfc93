"""Mutation testing of session 23's new code (session 24): each test here kills a small change
to that code (a dropped branch, a flipped comparison, a constant) that every existing test let
through. The mutant each one kills is named in its docstring."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerfast
import layerfast.engine.flops as flops
import layerfast.info as info
from layerfast.bench import naive_pass
from layerfast.data import open_data
from layerfast.engine.graph import Program
from layerfast.engine.plan import make_plan
from layerfast.engine.precision import parse_device, resolve_device
from layerfast.errors import LayerfastError
from layerfast.report import summary_table
from layerfast.store import FILENAME, ResumeStore
from layerfast.train import _check_step_sizes
from tests.analysis.test_inmem_names_s23 import ARGS, _states
from tests.analysis.test_inmem_names_s23 import Net as _Net
from tests.analysis.test_inmem_s19 import _own_tempdir  # noqa: F401 - autouse: inputs under tmp_path
from tests.engine.test_autocast_regions_s23 import Bf16Middle, _case, _engine
from tests.engine.test_bf16_s18 import _plain_loop
from tests.report.test_report import FCN, make_table

CPU = torch.device("cpu")


# ---- tracing.trace_for_pass, _steps, _Tracer.create_node -------------------------------------


def test_a_bf16_region_under_fp32_is_replayed_from_its_first_op() -> None:
    """Mutant (s23): `create_node` recorded every switched op, not the first. Since the s24
    replay (`Program.regions_here`) the region is kept on its steps instead: under an fp32
    pass the model's own bf16 middle layer is traced, its steps (from `b`, the first) carry
    the region's state, and the logits are the eager forward's bit for bit."""
    model, variants, batches = _case(Bf16Middle)
    res, got = _engine(model, variants, batches, "fp32", False)
    assert res.plan["untraced"] is None, res.plan["untraced"]
    prog = Program(model, True, ("fp32", CPU))
    regions = [s for s in prog.steps if s.autocast is not None]
    assert regions and regions[0].target == "b", [s.target for s in regions]
    assert all(s.autocast == (True, torch.bfloat16) for s in regions)
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=False))


class Fp16Middle(nn.Module):
    """A middle layer the model runs under float16 autocast: a region with autocast on, as the
    bf16 pass has it, but in another dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        with torch.autocast("cpu", dtype=torch.float16):
            h = F.relu(self.b(h))
        return self.fc(h.float())


def test_a_region_in_another_autocast_dtype_runs_in_its_own_dtype() -> None:
    """Mutant: `autocast_state` compares only whether autocast is on, not its dtype. Under the
    bf16 pass a float16 region of the model's own then looked like the pass's state: s23 traced
    it (a first-batch logit difference instead of the real reason), s24's replay would run it
    in bf16. It is a region of its own (float16), traced, and equals the eager forward."""
    model, variants, batches = _case(Fp16Middle)
    res, got = _engine(model, variants, batches, "bf16", False)
    assert res.plan["untraced"] is None, res.plan["untraced"]
    prog = Program(model, True, ("bf16", CPU))
    assert {s.autocast for s in prog.steps} == {None, (True, torch.float16)}
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=True))


class Bf16ReluRegion(nn.Module):
    """A bf16 autocast region of the model's own around ops autocast does not cast (a relu):
    the region is the bf16 pass's own state, and changes nothing in fp32 either."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.flatten(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.relu(h)
        return self.fc(F.relu(self.b(h)))


def test_a_region_that_sets_the_passs_own_autocast_keeps_the_trace() -> None:
    """Mutant: the program's trace (with autocast off) also checks for regions under a bf16
    pass (`trace(model, kind)` for the second trace): a region setting just what the pass sets
    ran untraced, without prefix sharing, where `trace_for_pass` keeps it traced."""
    model, variants, batches = _case(Bf16ReluRegion)
    res, got = _engine(model, variants, batches, "bf16", False)
    assert res.plan["untraced"] is None, res.plan["untraced"]
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=True))


class AutocastScale(nn.Module):
    """A forward whose path under autocast differs in an argument only (the same ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        h = h * (4.0 if torch.is_autocast_enabled("cpu") else 1.0)
        return self.fc(F.relu(self.b(h)))


def test_a_path_that_differs_under_autocast_in_an_argument_runs_untraced() -> None:
    """Mutant: `_steps` shows a node's op and target only, not its arguments: the program
    recorded with autocast off (`h * 1.0`) ran in the bf16 pass, where the forward scales by 4,
    and every variant's logits were another model's."""
    model, variants, batches = _case(AutocastScale)
    res, got = _engine(model, variants, batches, "bf16", False)
    assert "another path under cpu autocast" in (res.plan["untraced"] or ""), res.plan["untraced"]
    assert torch.equal(got, _plain_loop(model, variants, batches, autocast=True))


# ---- flops: the floor's GEMM and datasheet rates ---------------------------------------------


def _floor(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, precision: str,
           batch_size: int | None = None) -> dict[str, list[str]]:
    asked: dict[str, list[str]] = {"gemm": [], "sheet": [], "forward": []}
    monkeypatch.setattr(flops, "measure_rate", lambda device, precision, seconds=0.5:
                        asked["gemm"].append(precision) or 1e10)
    monkeypatch.setattr(flops, "datasheet_rate", lambda device, precision:
                        asked["sheet"].append(precision) or 1e15)
    monkeypatch.setattr(flops, "forward_rate", lambda model, shape, device, precision, *a, **k:
                        asked["forward"].append(precision) or 1e9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    keysets = [{"1.weight"}, {"3.weight"}]
    plan = make_plan(Program(model), keysets, False, 1)
    flops.floor_report(model, plan, (1, 8, 8), 100, CPU, precision, keysets=keysets,
                       batch_size=batch_size)
    return asked


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_a_float32_models_floor_is_at_the_passs_precision(monkeypatch, precision) -> None:
    """Mutant: `math` is "bf16" for a bfloat16 model, else "fp32" (not the pass's precision):
    a bf16 or tf32 pass of a float32 model was floored at the fp32 GEMM and datasheet rate."""
    asked = _floor(monkeypatch, torch.float32, precision)
    assert asked["gemm"] == asked["sheet"] == [precision], asked


def test_the_models_own_forward_is_timed_at_the_passs_precision(monkeypatch) -> None:
    """Mutant: `forward_rate` given the floor's math ("bf16" for a bfloat16 model) instead of
    the pass's precision: the model's forward was timed under a bf16 autocast the pass (fp32,
    the model's own bfloat16 forward) never runs."""
    asked = _floor(monkeypatch, torch.bfloat16, "fp32", batch_size=16)
    assert asked["forward"] == ["fp32"] and asked["gemm"] == ["bf16"], asked


@pytest.mark.parametrize(("precision", "tflops"), [("bf16", 989.4), ("tf32", 494.7),
                                                   ("fp32", 66.9), ("fp64", 66.9)])
def test_the_datasheet_rate_is_the_precisions_own(monkeypatch, precision, tflops) -> None:
    """Mutant: `datasheet_rate` reads the fp32 peak whatever the precision: a bf16 floor on an
    H100 used 66.9 TFLOP/s, not the 989.4 the bf16 tensor cores do."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.datasheet_rate(torch.device("cuda"), precision) == tflops * 1e12
    assert flops.datasheet_rate(CPU, precision) is None


# ---- info.cpu_bf16 ---------------------------------------------------------------------------


def test_cpu_bf16_reads_proc_cpuinfo_by_default() -> None:
    """Mutant: the default path is not /proc/cpuinfo: every Linux CPU read as 'unknown'."""
    proc = Path("/proc/cpuinfo")
    if not proc.exists():
        pytest.skip("no /proc/cpuinfo here")
    want = info.cpu_bf16(proc.read_text(errors="replace"))
    if want["native"] is None:
        pytest.skip("this /proc/cpuinfo has no flags line")
    assert info.cpu_bf16() == want


def test_cpu_bf16_without_a_readable_cpuinfo_is_unknown(monkeypatch) -> None:
    """Mutant: the OSError of reading /proc/cpuinfo is not caught (macOS has none): `layerfast
    info` died with a traceback instead of saying 'unknown'."""

    def unreadable(self: Path, *a: object, **k: object) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert info.cpu_bf16() == {"native": None, "flags": []}


# ---- bench.naive_pass: the autocast cache and the model's dtype ------------------------------


def _digits_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    head = torch.zeros(10)
    head[2] = 9.0  # every sample predicted as class 2
    variant = types.SimpleNamespace(overrides=lambda: {"3.weight": torch.zeros(10, 64),
                                                       "3.bias": head})
    return model, variant, open_data("digits", split="test", max_samples=200)


def test_bench_naive_pass_clears_casts_a_callers_forward_made() -> None:
    """Mutant: no clear of the autocast cache after a variant's load (only after its restore):
    under a caller's autocast region that had already run the model, the first variant read the
    casts of the caller's weights (a zero head counted as the final model's)."""
    model, _, src = _digits_case()
    zero = types.SimpleNamespace(overrides=lambda: {"3.weight": torch.zeros(10, 64)})
    top = int(model[3].bias.argmax())  # a zero head predicts its bias's top class everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(torch.zeros(4, 1, 8, 8))  # the caller's forward: autocast keeps its weights' casts
        got = naive_pass(model, [zero], src, CPU, 64)[2]
    assert got == [int((src.labels() == top).sum())]


def test_bench_naive_pass_leaves_the_callers_model_its_own_casts() -> None:
    """Mutant: no clear after the last variant's restore: the caller's next forward in the
    same autocast region read that variant's casts (every sample class 2)."""
    model, variant, src = _digits_case()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        naive_pass(model, [variant], src, CPU, 64)
        assert torch.equal(model(x), want)


def test_bench_naive_pass_normalises_a_float64_models_input_in_float64() -> None:
    """Mutant: the normalisation is float32 for every model (`wide`): a float64 model's input
    was float32's rounding of (x / scale - mean) / std, not the engine's float64 one."""
    digits = open_data("digits", split="test", max_samples=16)
    src = types.SimpleNamespace(batches=digits.batches, scale=digits.scale,
                                mean=(0.1307,), std=(0.3081,))
    seen: list[torch.Tensor] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(torch.float64)
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    naive_pass(model, [], src, CPU, 16, warmup=True)
    x = torch.cat([b[0] for b in digits.batches(4096)])
    want = (x.to(torch.float64) / digits.scale - 0.1307) / 0.3081
    assert seen[0].dtype == torch.float64 and torch.equal(seen[0], want)


def test_naive_evaluate_reads_the_first_variants_own_weights_under_autocast() -> None:
    """Mutant: `naive_evaluate` clears the autocast cache before its reference pass and after
    each restore, but not after a variant's load: the first variant then read the casts the
    reference pass made of the final model's weights (tests whose first variant is the
    baseline, {}, could not see it)."""
    from layerfast.engine.naive import naive_evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 4, (64,), generator=g)
    zero = {"3.weight": torch.zeros(4, 32)}  # a zero head: its bias's top class everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = naive_evaluate(model, [zero], lambda: [(x, y)])
    assert got[0, 0] == int((y == int(model[3].bias.argmax())).sum())


# ---- report: the precision footer ------------------------------------------------------------


def test_a_tf32_summary_says_its_precision() -> None:
    """Mutant: the footer only for bf16: a tf32 run's table read as fp32's."""
    table = make_table(FCN)
    assert "precision: tf32: its rounding" in summary_table(table, precision="tf32")
    assert "precision:" not in summary_table(table, precision="fp32")


# ---- inputs.named_as_passed ------------------------------------------------------------------


def test_num_classes_given_is_not_told_to_pass_num_classes(tmp_path) -> None:
    """Mutant: the advice "pass data=(x, y, num_classes)" without checking that the caller had
    not passed it already: data=(x, y, 9) for 10-class state dicts was told to do what it did."""
    x = torch.randn(40, 64)
    with pytest.raises(LayerfastError) as exc:
        layerfast.analyze(_Net, _states(), data=(x, torch.arange(40) % 9, 9), out=tmp_path / "a",
                          **ARGS)
    msg = str(exc.value)
    # since c905c14 the message says where the 9 came from, and the count that would fit
    assert "built for 9 classes, passed as num_classes" in msg, msg
    assert "pass data=(x, y, num_classes)" not in msg, msg


# ---- train: the step-size range ---------------------------------------------------------------


def test_a_step_size_equal_to_the_dtypes_largest_is_not_refused() -> None:
    """Mutant: `v >= top`: the largest float32 itself refused, where the message says 'at
    most'."""
    _check_step_sizes(nn.Linear(2, 2), torch.finfo(torch.float32).max, 0.0)


def test_the_step_size_range_is_each_parameter_dtypes_own() -> None:
    """Mutants: the bound is float32's whatever the weights' dtype, or only the first dtype
    (by name) is checked: a float16 model took --lr 1e5 (float16's largest is 65504) and failed
    at its first step, and a float64 model was refused 1e308, which it holds."""
    with pytest.raises(LayerfastError, match="--lr must be at most 6.55e\\+04, the largest "
                                             "float16"):
        _check_step_sizes(nn.Linear(2, 2).half(), 1e5, 0.0)
    _check_step_sizes(nn.Linear(2, 2).double(), 1e308, 0.0)
    mixed = nn.Sequential(nn.Linear(2, 2).to(torch.bfloat16), nn.Linear(2, 2).half())
    with pytest.raises(LayerfastError, match="float16"):
        _check_step_sizes(mixed, 1e5, 0.0)


def test_an_integer_parameter_is_no_bound_on_the_step_size() -> None:
    """Mutant: every parameter's dtype is read, not only floating ones: a model holding an
    integer parameter (a frozen count, `requires_grad=False`) died in `torch.finfo` with a
    TypeError traceback; SGD skips it, and so does the check."""
    model = nn.Linear(2, 2)
    model.steps = nn.Parameter(torch.tensor([3]), requires_grad=False)
    _check_step_sizes(model, 0.1, 0.0)
    with pytest.raises(LayerfastError, match="--weight-decay must be at most"):
        _check_step_sizes(model, 0.1, 1e39)


# ---- precision.parse_device ------------------------------------------------------------------


def test_auto_is_left_to_resolve_device(monkeypatch) -> None:
    """Mutant: `parse_device("auto")` is the CPU, not None: `resolve_device("auto")` then ran on
    the CPU on a machine with a GPU."""
    assert parse_device("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


# ---- store: a store that cannot be opened at all ---------------------------------------------


def test_a_store_that_cannot_be_opened_is_one_clear_error(tmp_path) -> None:
    """Mutants: `db` not set before `connect`, or closed whether or not `connect` returned one:
    a store path sqlite cannot open (a directory) raised UnboundLocalError or AttributeError
    instead of the store's own error."""
    out = tmp_path / "out"
    out.mkdir()
    (out / FILENAME).mkdir()
    with pytest.raises(LayerfastError, match="cannot use the resume store .*unable to open"):
        ResumeStore(out, {"arch": "fcn3x256", "data": "digits"}, num_variants=3)
