"""Session 19's engine changes, checked on a CUDA GPU (every test here is `cuda`: skipped
without one; `scripts/gpu_session.sh`'s cuda-tests step runs them).

Session 19 changed the engine's GPU default path (fan-out is on by default on CUDA only) but
its own tests run on the CPU with `device="cpu"`. The key exactness checks again, on CUDA:

1. Fan-out patterns (ConvNeXt's LayerNorm2d and permuted MLP, ShuffleNetV2's channel_shuffle,
   `h.reshape(h.shape[0], -1)`, functional relu6/hardsigmoid/hardtanh/elu) fan in each glue
   mode and count as the naive loop does on the GPU; a batch-broadcasting model falls back and
   an advanced-index model is refused, saying why, as on the CPU.
2. The registry models (resnet18, resnet50, vgg11 at 32×32; resnet20, vgg11_bn_cifar) with
   layer and block units: in bf16 and fp32 every group fans, nothing is refused or falls back,
   `Program.unseen_effects` flags nothing, and the cuts kept are the CPU's.
3. `Program.unseen_effects` finds a hidden write on CUDA, and the counts then equal the naive
   loop's.
4. In-memory `analyze` with CUDA state dicts equals the same with CPU state dicts.

Tolerances are those of the existing CUDA fan-out tests (`test_engine.py::
test_cuda_fp32_matches_naive`): fp32 with TF32 off on both sides; fanned counts equal the naive
loop's up to one near-tie flip (docs/engine.md, "Exactness"), the loss sum to rounding. The
models and data are tiny: the whole file takes seconds on an H100.

`DEVICE` and the `cuda` markers are the only GPU-specific lines: the logic was checked on the
CPU by a copy with `DEVICE = "cpu"` and no markers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from layerfast.engine import Evaluator
from layerfast.engine.fanrun import GLUE_MODES
from layerfast.engine.graph import Program, no_inplace_modules
from layerfast.engine.naive import naive_evaluate
from layerfast.engine.precision import tf32_allowed
from tests.engine.test_traceatk_s19 import _batches as _batches_64
from tests.engine.test_writeatk_s19 import _mul, _Three
from tests.fanout.test_fan_s19 import ConvNeXtish, ShuffleNetish
from tests.fanout.test_fan_s19 import _batches as _batches_1ch
from tests.fanout.test_fan_s19 import _variants as _unit_draws
from tests.fanout.test_fanatk_s19 import AdvancedIndex, SharedMean0
from tests.fanout.test_shape0_s19 import Flat, Mobile

DEVICE = "cuda"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


def _naive(model: nn.Module, variants: list, batches: list) -> torch.Tensor:
    """The naive loop on DEVICE in full float32 (cuDNN's TF32, on by default, off)."""
    with tf32_allowed(False):
        return naive_evaluate(model, variants, lambda: batches, device=DEVICE)


def _close_to_naive(got: torch.Tensor, want: torch.Tensor, exact: bool = False) -> None:
    """correct@1, correct@5 and agreement equal the naive loop's, up to one near-tie flip per
    variant unless `exact`; the loss sum to rounding."""
    diff = (got[:, [0, 1, 3]] - want[:, [0, 1, 3]]).abs().max().item()
    assert diff <= (0 if exact else 1), (diff, got, want)
    assert torch.allclose(got[:, 2], want[:, 2], rtol=1e-4, atol=1e-3), (got, want)


def _why(plan: dict, label: str = "") -> str:
    """A failed plan assertion's message: where the groups went and why, as one line that
    `scripts/gpu_session.sh`'s summary picks out of the test log (`fanout_refused`)."""
    return (f"{label} fanned {plan['fanned_variants']}, swapped {plan['swapped_variants']}, "
            f"fanout_refused {plan['fanout_refused']}, fanout_fallbacks "
            f"{plan['fanout_fallbacks']}, untraced {plan['untraced']}, cuts_kept "
            f"{plan['cuts_kept']}")


def _run(model: nn.Module, variants: list, batches: list, **kw) -> tuple[Evaluator, dict, Any]:
    ev = Evaluator(model, variants, device=DEVICE, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ev.run(batches)
    return ev, res.plan, res


# ---- 1. today's fan-out patterns, in each glue mode -------------------------------------------


def _convnext() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = ConvNeXtish()
    return model, _unit_draws(model, ["stem", "dw", "pw1", "pw2"]), _batches_1ch()


def _shufflenet() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = ShuffleNetish(minus_one=True)
    with torch.no_grad():  # BN statistics other than 0 / 1
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, _unit_draws(model, ["stem", "a", "b", "c", "d"]), _batches_1ch()


def _rgb(n: int = 14, classes: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def _conv_draws(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)} for _ in range(n)]


def _shape0() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    return Flat("shape0"), _conv_draws(), _rgb()


def _mobile() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = Mobile()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, _conv_draws(), _rgb()


def _one_conv_draws(model: nn.Module, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{f"conv.{k}": torch.randn(t.shape, generator=g) * (t.abs().mean().item() * 2 + 0.1)
             for k, t in model.conv.named_parameters()} for _ in range(n)]


def _one_channel(n: int = 6, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]


def _broadcast() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = SharedMean0()
    return model, _one_conv_draws(model), _one_channel()


def _advanced_index() -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = AdvancedIndex("two-lists")
    return model, _one_conv_draws(model), _one_channel()


#: name -> (build, what the plan must say: "fanned", or where the group went and a word of why)
PATTERNS: dict[str, tuple[Callable[[], tuple], tuple[str, str]]] = {
    "convnext": (_convnext, ("fanned", "")),
    "shufflenet": (_shufflenet, ("fanned", "")),
    "shape0-flatten": (_shape0, ("fanned", "")),
    "functional-relu6-hardsigmoid": (_mobile, ("fanned", "")),
    "broadcast-batch": (_broadcast, ("fanout_fallbacks", "broadcast")),
    "advanced-index": (_advanced_index, ("fanout_refused", "index")),
}


@pytest.mark.cuda
@pytest.mark.parametrize("glue", GLUE_MODES)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_fanout_patterns_on_cuda_count_as_the_naive_loop(name: str, glue: str) -> None:
    build, (where, word) = PATTERNS[name]
    model, variants, batches = build()
    model = model.eval().to(DEVICE)
    before = _state(model)
    want = _naive(model, variants, batches)
    assert _same_state(before, model)
    _, plan, res = _run(model, variants, batches, precision="fp32", fanout=True, glue=glue)
    msg = _why(plan, f"{name} {glue}:")
    if where == "fanned":
        assert plan["fanned_variants"] == len(variants), msg
        assert plan["swapped_variants"] == 0 and plan["fanout_refused"] == {}, msg
        assert plan["fanout_fallbacks"] == {}, msg  # a cuDNN or kernel error would hide here
    else:
        assert plan["fanned_variants"] == 0, msg
        assert len(plan[where]) == 1 and word in next(iter(plan[where].values())), msg
    _close_to_naive(res.counts, want)
    assert _same_state(before, model)
    assert all(t.device.type == torch.device(DEVICE).type for t in model.state_dict().values())


# ---- 2. the registry models: everything fans, nothing unseen, the CPU's cuts -------------------

#: (arch, input shape, granularities): the ImageNet forms at 32×32 (small, still every stage)
REGISTRY = [
    ("resnet18", (3, 32, 32), ("layer", "block")),
    ("resnet50", (3, 32, 32), ("layer", "block")),
    ("vgg11", (3, 32, 32), ("layer",)),  # a VGG's blocks are its layers
    ("resnet20", (3, 32, 32), ("layer", "block")),
    ("vgg11_bn_cifar", (3, 32, 32), ("layer",)),
]
CASES = [(a, s, g) for a, s, gs in REGISTRY for g in gs]


def _registry_case(arch: str, shape: tuple[int, ...], granularity: str):
    """The model (seed 0, BatchNorm statistics away from 0 / 1), one variant per unit and
    source (the units' tensors of two other initializations: a reinit study's shape, 2 per
    unit so that every group has members to fan) and 6 samples."""
    from layerfast.models import build_model, get_arch
    from layerfast.units import make_units

    def built(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m, _ = build_model(arch, 10, shape)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                    mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                    mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        return m.eval()

    model = built(0)
    units = make_units(model, granularity, arch=get_arch(arch))
    sources = [built(s).state_dict() for s in (1, 2)]
    variants = [{k: src[k] for k in u.keys} for u in units for src in sources]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, *shape, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    return model, variants, [(x, y)]


@pytest.mark.cuda
@pytest.mark.parametrize(("arch", "shape", "granularity"), CASES,
                         ids=[f"{a}-{g}" for a, _, g in CASES])
def test_registry_models_fan_whole_on_cuda(arch: str, shape: tuple, granularity: str) -> None:
    model, variants, batches = _registry_case(arch, shape, granularity)
    # the CPU's plan: fan-out on, fp32 (its cuts are settled by the same first-batch checks)
    cpu_plan = Evaluator(model, variants, device="cpu", precision="fp32",
                         fanout=True).run(batches).plan
    model = model.to(DEVICE)
    before = _state(model)
    x = batches[0][0].to(DEVICE)
    with no_inplace_modules(model), torch.no_grad():  # the check the pass runs on batch one
        prog = Program(model)
        assert prog.traced, prog.trace_error
        assert prog.unseen_effects(x) == (set(), set())
    for precision in ("bf16", "fp32"):
        ev, plan, res = _run(model, variants, batches, precision=precision, fanout=True)
        assert plan["fanout_refused"] == {}, _why(plan, f"{arch} {granularity} {precision}:")
        assert plan["fanout_fallbacks"] == {}, _why(plan, f"{arch} {granularity} {precision}:")
        assert plan["fanned_variants"] == len(variants), _why(plan, f"{arch} {granularity} {precision}:")
        assert plan["swapped_variants"] == 0 and plan["untraced"] is None, _why(plan, f"{arch} {granularity} {precision}:")
        assert ev._unseen == set(), f"{arch} {granularity} {precision}: unseen {ev._unseen}"
        assert plan["cuts_kept"] == cpu_plan["cuts_kept"], _why(plan, f"{arch} {granularity} {precision}: CPU cuts_kept {cpu_plan['cuts_kept']};")
        assert torch.isfinite(res.counts).all()
    want = _naive(model, variants, batches)
    _close_to_naive(res.counts, want)  # the fp32 run
    assert _same_state(before, model)


# ---- 3. a hidden write found on CUDA ---------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("fanout", [False, True])
def test_unseen_write_is_found_on_cuda_and_counts_equal_the_naive_loop(fanout: bool) -> None:
    """test_writeatk_s19's `_Three`: the replaced leaf `w` doubles a's output, the cached cut
    b's variants start from; unseen, the second variant of b read 4h."""
    torch.manual_seed(0)
    model = _Three()
    model.w.forward = _mul
    model = model.eval().to(DEVICE)
    batches = _batches_64()
    with no_inplace_modules(model), torch.no_grad():
        prog = Program(model)
        assert prog.traced, prog.trace_error
        found = prog.unseen_effects(batches[0][0].to(DEVICE))
        assert found is not None
        (w_step,) = [s.index for s in prog.steps if s.op == "call_module" and s.target == "w"]
        assert w_step in found[1], (found, w_step)
    g = torch.Generator().manual_seed(1)
    variants = [{f"{mod}.{k}": torch.randn(t.shape, generator=g) * (t.std().item() * 2 + 0.1)
                 for k, t in model.get_submodule(mod).named_parameters()}
                for mod in ("a", "b", "c") for _ in range(2)]
    before = _state(model)
    want = _naive(model, variants, batches)
    ev, plan, res = _run(model, variants, batches, precision="fp32", fanout=fanout)
    assert w_step in ev._unseen, (ev._unseen, _why(plan))
    # the swap path runs the very modules on the very tensors: the naive loop's counts
    _close_to_naive(res.counts, want, exact=not fanout)
    assert _same_state(before, model)


# ---- 4. in-memory inputs with CUDA state dicts -----------------------------------------------


@pytest.mark.cuda
def test_in_memory_cuda_state_dicts_equal_cpu_state_dicts(ckpts: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`analyze` with {τ: state_dict} whose tensors live on the GPU (as a training loop's
    `model.state_dict()` does) and (x, y) on the GPU: the same run as with CPU ones — the same
    materialised files (one content hash), the same table."""
    import tempfile

    import layerfast
    from layerfast.data import open_data

    systemp = tmp_path / "systemp"
    systemp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systemp))
    sds = {int(p.stem.split("_")[-1]): torch.load(p, weights_only=True)
           for p in sorted(ckpts.glob("epoch_*.pt"))}
    src = open_data("digits")
    x, y = src.reader.x[:96].clone(), src.reader.y[:96].clone()
    args = {"device": DEVICE, "precision": "fp32", "batch_size": 32, "progress": False,
            "figures": False, "checkpoint_every": 0}
    on_cpu = layerfast.analyze("fcn3x256", sds, data=(x, y), out=tmp_path / "cpu", **args)
    dev_sds = {t: {k: v.to(DEVICE) for k, v in sd.items()} for t, sd in sds.items()}
    on_dev = layerfast.analyze("fcn3x256", dev_sds, data=(x.to(DEVICE), y.to(DEVICE)),
                               out=tmp_path / "dev", **args)
    assert on_dev.run["ckpts"] == on_cpu.run["ckpts"] and on_dev.run["data"] == on_cpu.run["data"]
    assert on_dev.run["inputs"] == on_cpu.run["inputs"]
    assert on_dev.run["engine"]["evaluated"] > 0
    cols = [c for c in on_cpu.table.columns if c != "loss"]
    pd.testing.assert_frame_equal(on_dev.table[cols], on_cpu.table[cols], check_exact=True)
    pd.testing.assert_series_equal(on_dev.table["loss"], on_cpu.table["loss"], rtol=1e-9)
    pd.testing.assert_frame_equal(on_dev.distances, on_cpu.distances, check_exact=True)
    assert all(v.device.type == torch.device(DEVICE).type
               for sd in dev_sds.values() for v in sd.values())  # the caller's left where they were


# ---- the GPU session runs these first, and its summary names what failed and why ------------


def test_gpu_session_runs_this_file_first_and_its_summary_names_failures(tmp_path: Path) -> None:
    """scripts/gpu_session.sh: this file runs in its own step before the rest of `-m cuda
    tests/` (whose cap cuts the last files in name order), and a failed CUDA test is named in
    the summary with its fan-out plan. The test steps passed `-rs`, which replaces the `-ra` of
    pyproject's addopts: the logs had no `FAILED path::test` line, so the summary's FAILED grep
    showed none, only the counts (the failing test's name was in the 12,000-character output
    only if the log's tail was)."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    text = (root / "scripts" / "gpu_session.sh").read_text()
    func = text[text.index("cuda_tests() {"):]
    func = func[: func.index("; }\n") + 4]
    assert "tests/gpu/test_cuda_s19.py" in text[text.index("new_tests=("):text.index("cuda_tests() {")]
    assert func.index("cuda-new-tests") < func.index("step cuda-tests ")
    assert '"${new_tests[@]/#/--ignore=}"' in func
    cmds = [c for c in re.split(r"\n\s*step ", func) if "-m pytest" in c]
    assert len(cmds) == 3, func
    case = tmp_path / "test_fails_s19.py"
    case.write_text(
        "def test_refused():\n"
        "    plan = {'fanout_refused': {'3': 'conv: step 2 (.permute()): moves the batch dim'}}\n"
        "    assert plan['fanout_refused'] == {}, f\"resnet18 layer bf16: fanout_refused "
        "{plan['fanout_refused']}\"\n")
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    out.mkdir()
    for i, cmd in enumerate(cmds):
        flags = re.findall(r"(?<!\S)-r[a-zA-Z]+", cmd)
        assert flags, cmd
        p = subprocess.run([sys.executable, "-m", "pytest", "-v", str(case), "-p",
                            "no:cacheprovider", *flags], cwd=root, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
        (log / f"step{i}-tests.log").write_text(p.stdout + p.stderr)
    summary = text[text.index("summary() {"):text.index("trap summary EXIT")]
    env = {**os.environ, "LOG": str(log), "OUT": str(out), "phase": "test"}
    subprocess.run(["bash", "-c", f"{summary}\nsummary"], env=env, cwd=root, check=True,
                   capture_output=True, text=True, timeout=60)
    got = (out / "summary.txt").read_text()
    for i in range(len(cmds)):
        assert f"step{i}-tests.log:FAILED " in got and "::test_refused" in got, got
    assert "fanout_refused {'3': 'conv: step 2 (.permute()): moves the batch dim'}" in got, got
