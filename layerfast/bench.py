"""`layerfast bench`: layerfast against the naive loop on the same variants and data, in one run.

"Naive" is how public reproductions work: for each variant, load its weights (read from the
checkpoint file, or drawn) into the model, make a DataLoader pass over the test set (normalising
on the host; batch 256 unless --batch-size), fp32, and read the count back with `.item()` every
batch. It is, if anything, favoured: it counts correct@1 only (layerfast also top-5, loss and
agreement), its data are in memory before its clock starts (layerfast's clock includes reading
the DataSource), and on CUDA torch's default lets its convolutions use TF32. It may be timed on
a subset of the variants (`--naive-variants`; a sample spread over the kinds and units,
`naive_sample`) and scaled to all of them; the output says so and names the variants timed.
Beside the default mode the other fan-out setting is timed: prefix sharing alone on CUDA
(`prefix_only`), fan-out on the CPU (`fanout`).

Every approach is timed warm (`warm_up`): before any is timed, each layerfast mode runs once,
untimed, over the first batch of the data at the batch size it plans, in an Evaluator of its
own (the timed one plans again, so its seconds keep the probes), and the naive loop runs one
batch through the final model. A pass leaves the process changed for later ones (kernels
chosen per shape, malloc's thresholds raised): left in, that favoured the modes timed later.

Checkpoints are synthetic (the initialization plus growing noise, saved to a temp dir): timing
does not depend on what the weights are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from layerfast.engine.fanrun import GLUE_MODES
from layerfast.engine.precision import LAYOUTS
from layerfast.errors import LayerfastError, collect_warnings, say, warn, warnings_once

#: `--glue`'s default: the fold form with the fused BN + add + ReLU kernel.
GLUE_DEFAULT = "fused"
#: The engine's timings in the order a pass runs them (EvalResult.timings).
PHASES = ("setup", "data", "baseline", "fanned", "swapped", "total")
#: `--profile-samples`' default.
PROFILE_SAMPLES = 2048
#: `layerfast bench --help`'s description: what is timed, and how.
DESCRIPTION = (
    "Time layerfast (its default mode and the other fan-out setting) and the naive loop (load "
    "each variant's weights, a DataLoader pass, fp32, .item() per batch) on the same variants "
    "and data, in one run. Every approach is timed warm: before any is timed, each layerfast "
    "mode runs once, untimed, over the first batch at the batch size it plans (the timed pass "
    "plans again, and its seconds include that), and the naive loop runs one batch through "
    "the final model; so no timed pass gains or loses from the order. See BENCHMARKS.md."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="fcn3x256", help="as for analyze (default: fcn3x256)")
    p.add_argument("--data", default="digits",
                   help="data spec (default: digits, whatever the arch; pass synthetic:imagenet "
                        "for ResNet-50 at 224²)")
    p.add_argument("--granularity", default="layer", choices=["layer", "block", "stage"],
                   help="as for analyze (default: layer)")
    p.add_argument("--checkpoints", type=int, default=5,
                   help="synthetic checkpoints, τ = 0..N-1 (default: 5)")
    p.add_argument("--seeds", type=int, default=2, help="re-randomizations per unit (default: 2)")
    p.add_argument("--naive-variants", type=int, default=None,
                   help="time the naive loop on this many variants and scale (default: all)")
    p.add_argument("--no-prefix-only", action="store_true",
                   help="time only the default mode, not the other fan-out setting beside it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                   help="layerfast's precision, as for analyze (default: auto); the naive loop "
                        "runs fp32 (a model built in bfloat16, float16 or float64: its own "
                        "dtype, as analyze runs it)")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="layerfast's activation layout (default: auto; see "
                        "`layerfast analyze --help`)")
    p.add_argument("--glue", default=GLUE_DEFAULT, choices=GLUE_MODES,
                   help="how fanned groups move their values: fold form with BN+add+ReLU fused "
                        "(default), fold form with torch ops, or unfolded after every conv")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch for both (default: layerfast plans its own, naive 256)")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="also profile the default mode on up to --profile-samples samples "
                        "(torch.profiler) and write the op table, by self device time, to FILE")
    p.add_argument("--profile-samples", type=int, default=PROFILE_SAMPLES,
                   help="samples the --profile pass runs on (default: 2048)")


def _synthetic_ckpts(model: torch.nn.Module, n: int, where: Path) -> None:
    from layerfast.checkpoints.save import save_atomic

    g = torch.Generator().manual_seed(0)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for tau in range(n):
        sd = {k: (v + 0.02 * tau * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
              for k, v in init.items()}
        try:
            save_atomic(sd, where / f"epoch_{tau:03d}.pt")
        except OSError as exc:
            raise LayerfastError(f"cannot write bench's synthetic checkpoints in {where} "
                                 f"({exc.strerror or exc}): set TMPDIR to a disk with room"
                                 ) from None


def naive_sample(variants, k: int) -> list[int]:
    """Indices of `k` of `variants` to time the naive loop on, a fair sample of all of them.

    What a variant costs the naive loop besides its data pass depends on its kind (reinit reads
    the unit's tensors from a checkpoint file, rerandom draws them, the baseline loads nothing)
    and on its unit's size, so the k are split over the kinds in proportion to their counts
    (largest remainders) and, within a kind, spread evenly from its first unit to its last.
    Evenly spaced indices over the whole list could alias with the per-unit pattern: ResNet-50
    at block granularity (127 variants, 7 per unit) with k = 4 timed the baseline and three
    `rerandom seed 2` variants, never a checkpoint read."""
    V = len(variants)
    if k >= V:
        return list(range(V))
    by_kind: dict[str, list[int]] = {}
    for i, v in enumerate(variants):
        by_kind.setdefault(str(getattr(v, "kind", "")), []).append(i)
    quota = {kind: k * len(idx) / V for kind, idx in by_kind.items()}
    take = {kind: int(q) for kind, q in quota.items()}
    for kind in sorted(quota, key=lambda c: take[c] - quota[c])[: k - sum(take.values())]:
        take[kind] += 1
    out: list[int] = []
    for kind, idx in by_kind.items():
        m = take[kind]
        if m == 1:
            out.append(idx[(len(idx) - 1) // 2])
        elif m > 1:
            out += [idx[round(j * (len(idx) - 1) / (m - 1))] for j in range(m)]
    return sorted(out)


def _variant_keys(v) -> tuple[str, ...]:
    """The state keys a variant overrides, without reading its tensors when it names them."""
    keys = getattr(v, "keys", None)
    if isinstance(keys, tuple):
        return keys
    return tuple((v if isinstance(v, dict) else v.overrides()).keys())


def _status(what: str) -> None:
    """A line on stderr as each approach starts: a bench of a large model runs for minutes and
    printed nothing until its table."""
    say(f"layerfast bench: {what} ...")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(ev, src) -> None:
    """One untimed run of `ev` over the first batch of `src`, at the batch size `ev` plans, with
    every variant: the warm-up each layerfast mode gets (in an Evaluator of its own, built as
    the timed one) before any approach is timed; the naive loop gets one batch likewise.

    A pass leaves the process changed for the passes after it: kernels chosen and built per
    shape (oneDNN, cuDNN), and glibc's malloc, whose mmap and trim thresholds only rise, to the
    largest block freed so far. Untimed for none of the modes, that fell on whichever was timed
    first: ResNet-20 block on 64 images, one thread, prefix sharing took 3.7-4.6 s timed first
    against 2.7-3.3 s after fan-out, ~1 s of it system time (page faults: its blocks were
    mapped and unmapped anew) that fan-out's larger blocks had removed for it. A warm-up of
    the mode itself just before its timed pass did not remove it; warming every approach up
    first does, whatever the order."""
    batch = ev.plan_batch(src)
    ev.run(dataclasses.replace(src, n=min(src.n, batch)))


def naive_pass(model, variants, src, device, batch_size: int,
               warmup: bool = False) -> tuple[float, float, list[int]]:
    """(warm-up seconds, loop seconds, correct@1 per variant) of the naive loop over
    `variants`: for each, its weights loaded (read from the checkpoint file, or drawn), a
    DataLoader pass normalising on the host, fp32, correct@1 read back with `.item()` every
    batch. The counts let `run` check that both approaches measured the same thing.

    The batches are fed in the model's own dtype (`models.input_dtype`), as the engine feeds
    them: a model built in bfloat16, float16 or float64 runs its own forward in both (float32
    batches made its first layer raise "Input type (float) and bias type (c10::BFloat16)
    should be the same", a traceback before anything was timed).

    Run with autocast off for `device`'s type (fp32 under a caller's `torch.autocast` too),
    and the model's tensors are its own again after each variant, on an exception too.

    `warmup`: first one batch through the final model, outside the loop's clock and timed apart
    (else 0.0): the naive loop's share of `warm_up`, which `run` asks for with no variants
    before any approach is timed. The costs a first forward at its batch shape pays (kernel
    selection for fp32, the allocator's growth) then stay out of its figure, as out of
    layerfast's, and are not multiplied by V/k when it is timed on k of V variants."""
    from torch.utils.data import DataLoader, TensorDataset

    from layerfast.models import input_dtype, load_tensors

    xs, ys = zip(*src.batches(4096), strict=True)
    ds = TensorDataset(torch.cat(xs), torch.cat(ys))
    # DataLoader's sampler cuts batches with itertools.islice, which refuses a size above
    # sys.maxsize (`--batch-size 99999999999999999999`: a ValueError traceback); any size
    # from n up gives the same one batch of all n samples.
    batch_size = min(batch_size, len(ds))
    dtype = input_dtype(model)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # to_device's constants
    mean = torch.tensor(src.mean or (0.0,), dtype=wide).view(1, -1, 1, 1)
    std = torch.tensor(src.std or (1.0,), dtype=wide).view(1, -1, 1, 1)
    model.eval().to(device)
    state = model.state_dict()
    warm, counts = 0.0, []
    # fp32 as documented, also under a caller's torch.autocast (which ran its bf16 here); so no
    # autocast cache is read or filled either, and each variant's forward reads its own weights
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        if warmup:
            _sync(device)
            t = time.perf_counter()
            x, y = next(iter(DataLoader(ds, batch_size=batch_size, shuffle=False)))
            x = ((x.to(wide) / src.scale - mean) / std).to(device, dtype)
            (model(x).argmax(1) == y.to(device)).sum().item()
            _sync(device)
            warm = time.perf_counter() - t
        _sync(device)
        t = time.perf_counter()
        for v in variants:
            ov = v.overrides()
            saved = {k: state[k].clone() for k in ov}
            # the caller's model is given back with its own tensors whatever happens: a forward
            # that raises, or a load that copied the tensors that fit before refusing one
            try:
                load_tensors(model, ov, strict=False)
                correct = 0
                for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
                    x = ((x.to(wide) / src.scale - mean) / std).to(device, dtype)
                    correct += (model(x).argmax(1) == y.to(device)).sum().item()
            finally:
                load_tensors(model, saved, strict=False)
            counts.append(int(correct))
        _sync(device)
        loop = time.perf_counter() - t
    return warm, loop, counts


def profile_pass(ev, src, path: Path, rows: int = 40) -> dict:
    """Run `ev` over `src` under torch.profiler (after one warm-up pass), write the op table
    sorted by self time on the device (the CPU's when there is no GPU) to `path`, and return
    the top ops with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ev.device.type == "cuda"
    ev.run(src)  # warm-up: planning, the first-batch checks, cuDNN autotuning, allocator
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the same model: its checks' forwards are no part of the pass the table is of
    with ev._checks_kept(), profile(activities=acts) as prof:
        ev.run(src)
        _sync(ev.device)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda and events and not hasattr(events[0], attr):
        attr = "self_cuda_time_total"
    try:
        path.write_text(events.table(sort_by=attr, row_limit=rows))
    except OSError as exc:
        raise LayerfastError(f"--profile {path}: cannot write the table ({exc.strerror})") from None
    total = sum(getattr(e, attr) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:15]
    return {"file": str(path), "samples": src.n, "time": attr, "total_ms": total / 1e3,
            "top": [{"op": e.key, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                     "calls": e.count} for e in top]}


#: Upper bound of --checkpoints: each is a file of the model's size in a temp dir.
MAX_CHECKPOINTS = 1000


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything is built, with the flag's name, as `analyze` does:
    otherwise --batch-size 0 silently meant "auto", --seeds 0 silently meant no re-randomization
    and a negative --naive-variants ended in a ZeroDivisionError after the timed passes."""

    def positive(flag: str, value: object, what: str = "a positive integer") -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerfastError(f"{flag} must be {what}; got {value!r}")

    if isinstance(args.checkpoints, bool) or not isinstance(args.checkpoints, int) \
            or not 2 <= args.checkpoints <= MAX_CHECKPOINTS:  # fmt: skip
        raise LayerfastError(
            f"--checkpoints needs at least 2 (τ0 and a final model) and at most "
            f"{MAX_CHECKPOINTS}; got {args.checkpoints!r}"
        )
    positive("--seeds", args.seeds, "a count n >= 1 (re-randomizations per unit)")
    from layerfast.options import MAX_SEEDS

    if args.seeds > MAX_SEEDS:  # else --seeds 100000000 builds variants until memory runs out
        raise LayerfastError(f"--seeds must be at most {MAX_SEEDS} (as for analyze); got "
                             f"{args.seeds}")  # fmt: skip
    if args.naive_variants is not None:
        positive("--naive-variants", args.naive_variants, "a positive number of variants")
    if args.batch_size is not None:
        positive("--batch-size", args.batch_size)
    positive("--profile-samples", args.profile_samples)


def run(args: argparse.Namespace) -> dict:
    """The benchmark's figures (what `--json` prints) for the options in `args`: the
    `layerfast bench` namespace (`layerfast.cli.parser().parse_args(["bench", ...])`).

    Torch's global (CPU) random state is the caller's again afterwards: the model is built
    from seed 0, and the naive loop's DataLoader draws a seed for its iterator. Each warning
    is said once (`warnings_once`): every warm-up and timed mode builds its own Evaluator, and
    one that warns on construction (tf32 on the CPU) would say it for each. The model is
    built and run with float32 as torch's default dtype (`precision.float32_default`), as
    `analyze` runs it: a caller's float64 default built a float64 model, timed as "fp32"."""
    from layerfast.engine.precision import float32_default

    with torch.random.fork_rng(devices=[]), warnings_once(), float32_default():
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    check_args(args)
    created = _probe_profile(args.profile) if args.profile is not None else None
    try:
        return _timed(args)
    except BaseException:
        if created is not None:  # the probe's file, empty or a table cut short by the error
            with contextlib.suppress(OSError):
                created.unlink()
        raise


def _probe_profile(prof: Path) -> Path | None:
    """Open `--profile` for writing now, not after minutes of timing: `os.access` passed, for
    root, a symlink loop, a file under /sys or /proc, and a path under a regular file, all of
    which failed at the table's write, after every approach was timed. Opened to append
    (nothing of an existing file changes) and non-blocking (a FIFO with no reader is refused,
    not waited on). Returns the file the probe created (the link's target, for a symlink), which
    the caller removes if the run then fails; None when the file was there already."""
    if prof.is_dir():
        raise LayerfastError(f"--profile {prof}: is a directory; name a file for the table")
    target = Path(os.path.realpath(prof))
    existed = target.exists()
    try:
        os.close(os.open(prof, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
    except OSError as exc:
        if not os.path.lexists(prof.parent):
            raise LayerfastError(
                f"--profile {prof}: the directory {prof.parent} does not exist"
            ) from None
        raise LayerfastError(f"--profile {prof}: cannot be written ({exc.strerror or exc}); "
                             "name a file for the table") from None
    return None if existed else target


def _timed(args: argparse.Namespace) -> dict:
    """`_run` once the options are checked and `--profile` is known to be writable."""
    from layerfast.checkpoints import CheckpointDir
    from layerfast.data import open_data
    from layerfast.engine import Evaluator
    from layerfast.engine.flops import floor_report
    from layerfast.engine.plan import warn_plan
    from layerfast.engine.precision import model_dtype, resolve_device
    from layerfast.models import build_model, load_tensors
    from layerfast.units import make_units
    from layerfast.variants import make_variants

    # every `layerfast: warning:` of the run also goes into the JSON (as analyze's run.json):
    # a figure is judged later from the JSON, when the stderr beside it is gone. Opening the
    # data is part of the run: it warns too (a .beton holding the other split).
    with collect_warnings() as opening:
        device = resolve_device(args.device)
        src = open_data(args.data, split="test", max_samples=args.max_samples, split_flag=None)
        torch.random.default_generator.manual_seed(0)  # the same model every run (`run` forks)
        model, spec = build_model(args.arch, src.num_classes, tuple(src.shape))
    with collect_warnings() as warned, tempfile.TemporaryDirectory(prefix="layerfast-bench-") as tmp:
        warned[:0] = opening
        if args.profile is None and args.profile_samples != PROFILE_SAMPLES:
            # options that would do nothing are said (docs/decisions.md), as --glue is below
            warn(f"--profile-samples {args.profile_samples} has no effect without --profile")
        _synthetic_ckpts(model, args.checkpoints, Path(tmp))
        ck = CheckpointDir(tmp)
        load_tensors(model, ck.tensors(ck.final))
        units = make_units(model, granularity=args.granularity, arch=spec)
        variants = make_variants(model, units, ck, spec, reset=("reinit", "rerandom"),
                                 seeds=range(1, args.seeds + 1))
        V, n = len(variants), src.n
        out: dict = {"arch": args.arch, "data": args.data, "n": n, "variants": V,
                     "units": len(units), "device": str(device), "glue": args.glue}
        timings, correct1 = {}, {}
        # "layerfast" is the default mode (fan-out on CUDA, prefix sharing alone on the CPU);
        # the other setting is timed beside it: "prefix_only" on CUDA, "fanout" on the CPU.
        other = ("prefix_only", False) if device.type == "cuda" else ("fanout", True)
        modes = [(name, fan) for name, fan in (("layerfast", None), other)
                 if name == "layerfast" or not args.no_prefix_only]
        out["naive_batch_size"] = naive_batch = args.batch_size or 256
        out["naive_batch_size_used"] = min(naive_batch, n)

        def evaluator(fan: bool | None) -> Evaluator:
            return Evaluator(model, variants, device=device, precision=args.precision,
                             batch_size=args.batch_size, fanout=fan, layout=args.layout,
                             glue=args.glue)

        # Every approach warms up before any is timed (`warm_up`): then no timed pass finds
        # the process in a state another approach's pass left it in, whatever the order.
        _status("warming up each approach on one batch (untimed)")
        for _name, fan in modes:
            warm_up(evaluator(fan), src)
        t_warm = naive_pass(model, [], src, device, naive_batch, warmup=True)[0]
        for name, fan in modes:
            _status(f"timing {name} on {V} variants × {n} samples")
            ev = evaluator(fan)  # plans again: the timed seconds keep the probes
            out[f"{name}_fanout"] = ev.fanout
            _sync(device)
            t = time.perf_counter()
            res = ev.run(src)
            _sync(device)
            timings[name] = time.perf_counter() - t
            correct1[name] = res.counts[:, 0]
            if name == "layerfast" and not torch.isfinite(res.counts[0, 2]):  # variant 0: baseline
                warn("the final model gives NaN or Inf logits on this data: the figures time a "
                     "model whose errors mean nothing (analyze refuses it)")
            out["precision"], out["model_dtype"] = res.precision, model_dtype(model)
            # the layout the pass ran in: `run` may have turned channels_last off (a model that
            # cannot run in it, layout auto), so it is read after the pass, not before
            # batch_size as planned (or --batch-size); batch_size_used, what the pass's batches
            # held: at most the n samples (B=1000 planned on 32 samples ran one batch of 32)
            out[f"{name}_plan"] = {**res.plan, "batch_size": ev.batch_size,
                                   "batch_size_used": min(ev.batch_size, n),
                                   "channels_last": ev.channels_last}
            if name == "layerfast":
                out["channels_last"] = ev.channels_last
            out[f"{name}_phases"] = {k: round(v, 4) for k, v in res.timings.items()}
            # The pass's own clock (timings' total) starts after `run` has planned the batch size
            # and checked the layout (probe forwards, a trace, the plan): timed here, not there.
            out[f"{name}_probes"] = round(timings[name] - res.timings["total"], 4)
            if name == "layerfast":
                plan = ev.last_plan
                warn_plan(res.plan)  # untraced: its figure is the naive loop's speed
        if args.glue != GLUE_DEFAULT and not any(out.get(f"{name}_fanout") for name in
                                                 ("layerfast", other[0])):
            # options that would do nothing are said (docs/decisions.md): glue is how fanned
            # groups run, and no timed mode fanned out (the CPU's default with --no-prefix-only)
            warn(f"--glue {args.glue} has no effect: no timed mode fans out (on the CPU only the "
                 "'fanout' row does, which --no-prefix-only leaves out)")
        idx = naive_sample(variants, min(args.naive_variants or V, V))  # None: all of them
        sub = [variants[i] for i in idx]
        out["naive_timed"] = [getattr(variants[i], "label", str(i)) for i in idx]
        scaled = len(sub) < V
        _status(f"timing the naive loop on {len(sub)} of {V} variants × {n} samples")
        _, t_naive, naive_correct = naive_pass(model, sub, src, device, naive_batch)
        out["agreement_with_naive"] = _agreement(correct1, idx, naive_correct, n,
                                                 out["precision"], device)
        timings["naive"] = t_naive * V / len(sub)
        out["naive_warmup_s"] = round(t_warm, 4)
        out["naive_timed_variants"] = len(sub)
        out["naive_scaled"] = scaled
        out["seconds"] = {k: round(v, 4) for k, v in timings.items()}
        out["variant_images_per_s"] = {k: V * n / v for k, v in timings.items()}
        out["speedup_vs_naive"] = {k: timings["naive"] / v for k, v in timings.items() if k != "naive"}
        if args.profile is not None:
            sub_src = open_data(args.data, split="test", max_samples=min(n, args.profile_samples),
                                split_flag=None)
            ev = Evaluator(model, variants, device=device, precision=args.precision,
                           batch_size=args.batch_size, layout=args.layout, glue=args.glue)
            out["profile"] = profile_pass(ev, sub_src, args.profile)
        keysets = [_variant_keys(v) for v in variants]
        # the forward's rate at the batch the pass ran: at most n samples, whatever B was asked
        # (--batch-size 10**12 on 40 samples ran; a forward on 10**12 zero samples cannot)
        floor = floor_report(model, plan, tuple(src.shape), n, device, out["precision"],
                             keysets=keysets,
                             batch_size=out["layerfast_plan"]["batch_size_used"],
                             channels_last=out["channels_last"])
        out["floor"] = floor
        # a model without a conv or matmul needs 0 matrix FLOPs: no floor (null), not a
        # ZeroDivisionError after every approach has been timed
        floor_s = floor["seconds_measured_rate"]
        out["times_floor"] = {k: v / floor_s if floor_s > 0 else None for k, v in timings.items()}
        below = {k: x for k, x in out["times_floor"].items() if x is not None and x < 1}
        if below:  # the rate was measured while something else had the machine
            name, x = min(below.items(), key=lambda kv: kv[1])
            warn(f"{name} ran at {x:.2f}× the compute floor, faster than the rate measured for "
                 f"it ({floor['rate_tflops_measured']:.3g} TFLOP/s) allows: that measurement "
                 "was low (a busy machine?), so the floor is no lower bound in this run")
        out["warnings"] = list(warned)  # once each, as on stderr: `run` says each once
    return out


def _agreement(correct1: dict, idx: list[int], naive: list[int], n: int, precision: str,
               device: torch.device) -> dict:
    """How far each approach's correct@1 is from the naive loop's on the variants the loop ran:
    a speed figure means something only if both measured the same thing. fp32 on the CPU may
    flip one near-tie (the naive loop normalises on the host, in another order); bf16, TF32 and
    any CUDA run (the naive loop's convolutions take TF32 there by torch's default) are held to
    0.5 percentage points of error (README). Beyond that it is a warning, kept in the JSON."""
    diff = {name: max((abs(float(c[i]) - nc) for i, nc in zip(idx, naive, strict=True)),
                      default=0.0) for name, c in correct1.items()}
    worst = max(diff.values(), default=0.0)
    bound = 1.0 if precision == "fp32" and device.type == "cpu" else max(1.0, 0.005 * n)
    if worst > bound:
        warn(f"correct@1 differs from the naive loop's by up to {worst:.0f} of {n} samples on "
             f"the {len(idx)} variants both ran ({precision}): the figures may not compare "
             "like with like")
    return {"variants": len(idx), "max_abs_diff_correct1": diff, "bound": bound}


def _batch(used: int, asked: int, how: str) -> str:
    """`B=` as the text prints it: the batch the pass ran, and the larger one planned or asked
    for when the data held fewer samples (it said B=1000 for a pass over 32 samples)."""
    return f"B={used}" if used == asked else f"B={used}, all the samples ({asked} {how})"


def main(args: argparse.Namespace) -> int:
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    scaled = (f" (timed on {out['naive_timed_variants']} of {out['variants']} variants, scaled)"
              if out["naive_scaled"] else "")
    # what math ran: a model built in another dtype runs its own forward (analyze's wording)
    dt = out.get("model_dtype", "float32")
    ran = f"{out['precision']}{'' if dt == 'float32' else f' on a {dt} model'}"
    print(f"{out['arch']} on {out['data']}: {out['variants']} variants × {out['n']} samples, "
          f"{out['device']}, {ran}{', channels_last' if out['channels_last'] else ''}")
    print(f"{'approach':14s} {'seconds':>10s} {'variant·img/s':>15s} {'× naive':>8s}")
    for name, secs in out["seconds"].items():
        speed = out["variant_images_per_s"][name]
        ratio = out["speedup_vs_naive"].get(name, 1.0)
        plan = out.get(f"{name}_plan")
        how = ""
        if plan:
            fan = f"on, glue {out['glue']}" if out[f"{name}_fanout"] else "off"
            batch = _batch(plan["batch_size_used"], plan["batch_size"], "planned")
            how = f"  (fan-out {fan}, {batch})"
        print(f"{name:14s} {secs:10.3f} {speed:15.0f} {ratio:8.1f}{how}")
    for name in out["seconds"]:  # groups that ran swapped although fan-out was on, and why
        plan = out.get(f"{name}_plan") or {}
        for what, key in (("refused", "fanout_refused"), ("fell back", "fanout_fallbacks")):
            for k, why in plan.get(key, {}).items():
                print(f"{name}: fan-out {what} at step {k}: {why[:200]}")
    ph = out["layerfast_phases"]
    clock = "CUDA-event" if out["device"].startswith("cuda") else "wall"
    print("layerfast's time: " + ", ".join(f"{k} {ph[k]:.3f}" for k in PHASES if k in ph)
          + f" s (setup and total wall time, the phases {clock} time), after "
          f"{out['layerfast_probes']:.3f} s of batch-size and layout probes before the pass")
    naive_b = _batch(out["naive_batch_size_used"], out["naive_batch_size"], "asked")
    naive_math = "fp32" if dt == "float32" else f"fp32 on a {dt} model"
    print(f"naive = load weights, DataLoader pass at {naive_b}, {naive_math}, correct@1 "
          f"by .item() per batch{scaled}")
    agree = out["agreement_with_naive"]
    worst = max(agree["max_abs_diff_correct1"].values(), default=0.0)
    print(f"results: correct@1 on the {agree['variants']} variants the naive loop ran "
          + ("equals its count on each" if worst == 0 else
             f"differs from its count by at most {worst:.0f} of {out['n']} samples"))
    f = out["floor"]
    g = f["gflop_per_sample"]
    sheet = (f"; {f['seconds_datasheet_rate']:.3g} s at the datasheet's {f['rate_tflops_datasheet']:.0f}"
             if f["rate_tflops_datasheet"] else "")
    print(f"compute floor: {g['needed']:.3g} GFLOP/sample (forward {g['forward']:.3g} + the "
          f"variants' dependent steps {g['suffixes']:.3g}; whole suffixes from their cuts "
          f"{g['suffixes_from_cut']:.3g}; naive computes {g['naive']:.3g}) = "
          f"{f['seconds_measured_rate']:.3g} s "
          f"at the measured {f['rate_tflops_measured']:.3g} TFLOP/s (the best of a large GEMM's "
          f"{f['rate_tflops_gemm']:.3g} and the model's own forward's "
          f"{f['rate_tflops_forward'] or 0:.3g}){sheet}; "
          + (f"layerfast at {x:.1f}× the floor" if (x := out["times_floor"]["layerfast"])
             is not None else "no matrix FLOPs to floor layerfast's time"))
    if "profile" in out:
        p = out["profile"]
        print(f"profile of {p['samples']} samples ({p['time']}, total {p['total_ms']:.0f} ms; "
              f"table in {p['file']}):")
        for e in p["top"][:8]:
            print(f"  {e['share']:6.1%} {e['ms']:9.1f} ms {e['calls']:7d}× {e['op'][:70]}")
    if out["warnings"]:  # printed before the table, which a reader copies without them
        n = len(out["warnings"])
        print(f"{n} warning{'s' if n > 1 else ''} (stderr, above; also in --json's warnings)")
    return 0
