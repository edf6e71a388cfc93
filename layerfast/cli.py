"""`layerfast` command line: a thin layer over the Python API (DESIGN.md §6).

Exit status: 0 done; 2 bad input or usage (one line on stderr, no traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import difflib
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import layerfast
from layerfast.errors import LayerfastError, output_failed, say
from layerfast.options import int_list


def _int_list(text: str) -> list[int]:
    """`--checkpoints 0,1,10` (`options.int_list`), as argparse's error."""
    try:
        return int_list(text, "checkpoints")
    except LayerfastError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _seeds(text: str) -> int | list[int]:
    """`--seeds 3` means seeds 1..3; `--seeds 1,7,9` names them (`flags.parse_seeds`, which
    `analyze(seeds="...")` uses too); checked here so the error comes before other flags'."""
    from layerfast.flags import parse_seeds

    try:
        return parse_seeds(text)
    except LayerfastError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--seeds takes", "expected")) from None


class _Parser(argparse.ArgumentParser):
    """argparse with DESIGN §6's usage errors: one line on stderr, exit status 2.

    argparse's own `error()` prints the whole usage block (a dozen lines for `analyze`) before
    the message; here the message is the line, and it points at `--help` for the usage.
    Subparsers are made with this class too (argparse passes the parent's class on), so each
    names its own command: `layerfast analyze: error: ... (see layerfast analyze --help)`.

    Flags are spelt in full (`allow_abbrev=False`): argparse's prefix matching read
    `analyze --seed 7` (`train`'s spelling) as `--seeds 7`, seeds 1..7, without a word. An
    unknown flag's error names the flag probably meant instead.
    """

    #: command name -> its subparser, so unknown arguments are blamed on the command given.
    commands: dict[str, argparse.ArgumentParser]

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _suggest(self, extra: Sequence[str]) -> str:
        """` (did you mean --seeds?)` for the first unknown flag that is a prefix or a near miss
        of one of this parser's flags; empty when none is."""
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for arg in extra:
            flag = arg.split("=", 1)[0]
            if not flag.startswith("--") or flag == "--":  # a bare -- is every flag's prefix
                continue
            near = [f for f in flags if f.startswith(flag)]
            near = near or difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
            if near:
                return f" (did you mean {near[0]}?)"
        return ""

    def _unknown_flags(self, argv: Sequence[str]) -> list[str]:
        """The `--flag`s of `argv` that name none of this parser's options."""
        flags = {s for a in self._actions for s in a.option_strings}
        out = []
        for arg in argv:
            if arg == "--":  # everything after it is a value
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in flags:
                out.append(flag)
        return out

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())  # argparse messages are one line; make sure of it
        commands = getattr(self, "commands", None)
        if commands and "required" in line and "COMMAND" in line:  # bare `layerfast`
            line = f"a command is required: {', '.join(commands)}"
        elif line.startswith("the following arguments are required"):
            # argparse checks required flags before it hands unknown ones back, so a misspelt
            # one (`train --epoch 1`) was reported only as "--epochs is required", hiding
            # what was typed; name it, and the flag probably meant.
            unknown = self._unknown_flags(getattr(self, "_argv", ()))
            if unknown:
                line += f"; unrecognized {' '.join(unknown)}{self._suggest(unknown)}"
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for error(): argparse calls each subcommand's parser with its own arguments.
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(
        self,
        args: Sequence[str] | None = None,  # type: ignore[override]
        namespace: argparse.Namespace | None = None,
    ) -> argparse.Namespace:
        # Unknown flags surface here, at the top level, so argparse would report them with
        # `layerfast`'s usage; blame the subcommand whose flags they were meant for.
        argv = _join_negative_lists(sys.argv[1:] if args is None else list(args))
        ns, extra = self.parse_known_args(argv, namespace)
        if extra:
            owner = getattr(self, "commands", {}).get(getattr(ns, "command", None), self)
            hint = owner._suggest(extra) if isinstance(owner, _Parser) else ""
            owner.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        return ns


#: A comma-separated list starting with a negative number (`-1,2`), or one with an exponent
#: (`-1e-3`): argparse takes it for a flag (only `-1` and `-0.5` alone look like numbers to it)
#: and reports "expected one argument".
_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_NEGATIVE_LIST = re.compile(rf"-{_NUMBER}(\s*,\s*(-?{_NUMBER})?)*")


def _join_negative_lists(argv: list[str]) -> list[str]:
    """`--seeds -1,2` -> `--seeds=-1,2` (and `--alphas -0.5,1`), so the value reaches the check
    that says what is wrong with it instead of argparse's 'expected one argument'."""
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_LIST.fullmatch(tok) and prev.startswith("--") and prev != "--":
            if "=" not in prev:
                out[-1] = f"{prev}={tok}"
                continue
        out.append(tok)
    return out


class _Once(argparse.Action):
    """Store a list-valued flag's value (`--units`, `--reset`, `--checkpoints`, `--seeds`,
    `--alphas`, `--sigma`), refusing a second, different one: argparse keeps the last, and
    `--units 'conv*' --units 'fc*'` analysed the fc units alone, exit 0, whether the user meant
    both lists or a replacement. The same value again changes nothing and is let through.
    Single-valued flags keep argparse's last-wins (a wrapper's `$COMMON --device cpu`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        seen = f"_{self.dest}_given"
        if getattr(namespace, seen, False) and getattr(namespace, self.dest) != values:
            def shown(v: object) -> str:  # as typed: `--seeds 1,2` parses to [1, 2]
                return ",".join(map(str, v)) if isinstance(v, list) else str(v)

            parser.error(f"{option_string} given twice ({shown(getattr(namespace, self.dest))} "
                         f"and {shown(values)}): give one comma-separated list")
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, values)


def _common_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "tf32", "bf16"],
        help="auto (default) = bf16 + channels_last on CUDA, fp32 on CPU; tf32 is CUDA only",
    )
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch")
    p.add_argument(
        "--max-samples", type=int, default=None, help="evaluate only the first N samples"
    )


def parser() -> argparse.ArgumentParser:
    from layerfast.engine.precision import LAYOUTS

    ap = _Parser(
        prog="layerfast",
        description=(
            "Which layers of a trained network matter: reset each unit to earlier checkpoints or "
            "fresh draws and measure test error, every variant in one data pass."
        ),
    )
    from layerfast import __version__

    # `layerfast --version` said "a command is required": what every CLI user types first
    ap.add_argument("--version", action="version", version=f"layerfast {__version__}",
                    help="print layerfast's version and exit (`layerfast info`: all versions)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    a = sub.add_parser(
        "analyze",
        help="reset every unit, evaluate all variants, write the report",
        epilog="A killed run resumes when the same command runs again: progress "
        "is saved in OUT/progress.sqlite every $LAYERFAST_CHECKPOINT_EVERY seconds "
        "(default 5; inf: only when the pass ends, with a warning). A different command into "
        "the same --out is refused unless "
        "--fresh.",
    )
    a.add_argument(
        "--arch",
        required=True,
        help="registry name (fcn3x256, vgg11, resnet50, ...) or pkg.module:factory",
    )
    a.add_argument(
        "--ckpts",
        help="checkpoint directory: *.pt/*.pth/*.ckpt/*.safetensors labelled by the last integer "
        "in the file name, or listed in a manifest.json (layerfast train writes one)",
    )
    a.add_argument(
        "--data",
        default=None,
        help="data spec: digits, fashion-mnist[:DIR], mnist:DIR, cifar10:DIR, imagefolder:DIR, "
        "PATH.beton, PATH.npz, synthetic:imagenet|cifar[:N] (docs/data.md in the source tree); "
        "default: the data the checkpoints' manifest.json names (layerfast train writes it)",
    )
    a.add_argument(
        "--split",
        default="test",
        choices=["test", "train"],
        help="split to evaluate on (default: test)",
    )
    a.add_argument(
        "--granularity",
        default="layer",
        choices=["layer", "block", "stage"],
        help="layer (default): each module owning weights (conv, linear, ...); block: stem, "
        "each residual block, head (ResNet-50: the paper's 18 units); stage: stem, "
        "layer1..layer4, head. Models outside the registry get block/stage from their "
        "top-level children",
    )
    a.add_argument(
        "--units", default=None, action=_Once, help="custom units: glob or re:regex patterns, comma-separated"
    )
    a.add_argument(
        "--bn",
        default="with-layer",
        choices=["with-layer", "keep", "separate"],
        help="normalization layers: with-layer (default) = reset with the conv/linear that feeds "
        "them, weights and running statistics from the same source; keep = always the final "
        "model's; separate = each is a unit of its own",
    )
    a.add_argument(
        "--reset", default="reinit,rerandom,fullmodel", action=_Once,
        help="kinds, comma-separated (default: reinit,rerandom,fullmodel); also interp, with "
        "--alphas (it replaces the default: list the other kinds with it to keep them)",
    )
    a.add_argument(
        "--alphas", default=None, metavar="A[,A...]", action=_Once,
        help="interp: each unit := (1-A)*theta^tau + A*theta^final, A in [0, 1], for every "
        "--checkpoints tau but the final one (e.g. 0.25,0.5,0.75)",
    )
    a.add_argument(
        "--sigma", default="0", metavar="S[,S...]", action=_Once,
        help="interp: std of Gaussian noise added to the unit's parameters, absolute, one or "
        "several (default: 0); above 0, one variant per --seeds seed",
    )
    a.add_argument("--checkpoints", default="all", action=_Once,
                   help="τ labels to reset to: all (default) or e.g. 0,1,10")
    a.add_argument(
        "--seeds", type=_seeds, default=1, action=_Once,
        help="seeds of the re-randomization draws and of interp's --sigma noise: a count n (1..n) "
             "or a list (default: 1, one seed)"
    )
    a.add_argument(
        "--threshold", type=float, default=0.05, help="robust ⇔ Δerror ≤ threshold (default 0.05)"
    )
    a.add_argument(
        "--final", type=int, default=None, help="label of the final model (default: largest)"
    )
    a.add_argument("--out", default=None, help="output dir (default layerfast-out/<arch>-<time>)")
    a.add_argument(
        "--fresh", action="store_true", help="discard a previous run's progress in --out"
    )
    # one or the other: `--fanout on --no-fanout` ran with fan-out off, silently (last wins)
    fan = a.add_mutually_exclusive_group()
    fan.add_argument(
        "--fanout",
        default="auto",
        choices=["auto", "on", "off"],
        help="run variants of one unit as one wide computation: auto (default) = on for CUDA, "
        "off for the CPU (measured no faster there); off = the bit-exact swap path",
    )
    fan.add_argument(
        "--no-fanout", dest="fanout", action="store_const", const="off", help="same as --fanout off"
    )
    a.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="memory layout of conv activations: auto (default) = channels_last with bf16/tf32 "
        "on CUDA, else contiguous (bit-exact fp32); channels_last on the CPU ran conv "
        "nets ~1.6x faster (docs/engine.md), logits then differ in the last bits",
    )
    a.add_argument(
        "--list-units",
        action="store_true",
        help="print the units and exit (no --ckpts needed; the model is built for --data's "
        "sample shape; without --data, for that of the data --ckpts' manifest.json names "
        "(required there, as for analyze), and without either, digits')",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    _common_eval(a)

    t = sub.add_parser("train", help="train a model, saving the paper's checkpoint schedule")
    t.add_argument(
        "--arch",
        required=True,
        help="as for analyze: fcn3x256, vgg11_cifar, resnet20, ... or pkg.module:factory",
    )
    t.add_argument("--data", required=True, help="data spec, as for analyze (digits, ...)")
    t.add_argument("--epochs", type=int, required=True,
                   help="epochs to train (the paper: 100; at most 1,000,000)")
    t.add_argument(
        "--checkpoints", type=_int_list, default=None, action=_Once,
        help="epochs to save, e.g. 0,1,10; 0 and --epochs are always saved (default: the "
        "paper's 0,1,2,3,8,40,90,100 for 100 epochs, the later ones scaled to --epochs)"
    )
    t.add_argument(
        "--out", required=True, help="directory for epoch_NNN.pt and manifest.json (created)"
    )
    t.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate, above 0 (default: 0.1)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    t.add_argument(
        "--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: 5e-4)"
    )
    t.add_argument("--batch-size", type=int, default=128, help="samples per step (default: 128)")
    t.add_argument(
        "--schedule",
        default="cosine",
        choices=["cosine", "step", "constant"],
        help="learning rate, set before every step from the steps done: cosine (default) = "
        "lr·(1 + cos(π·epochs done/epochs))/2; step = ÷10 from 50%% and ÷100 from 75%% of the "
        "steps (both on epoch boundaries only when --epochs is a multiple of 4); constant",
    )
    t.add_argument(
        "--seed", type=int, default=0,
        help="θ⁰ and the shuffle order depend on it; seeds torch, random and numpy for the run "
        "(default: 0)",
    )
    t.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    t.add_argument("--max-samples", type=int, default=None,
                   help="train on the first N samples (each checkpoint's recorded test error is "
                        "still over the whole test split, as analyze's fullmodel rows are)")
    t.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's checkpoints in --out"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    d = sub.add_parser(
        "demo", help="zero-setup: train fcn3x256 on digits, analyze, write the report"
    )
    d.add_argument(
        "--out", default="layerfast-demo", help="checkpoints/ and analysis/ go here (default: "
        "layerfast-demo)"
    )
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    from layerfast.bench import DESCRIPTION, add_arguments

    b = sub.add_parser("bench", help="layerfast vs the naive loop on the same variants, one run",
                       description=DESCRIPTION)
    add_arguments(b)

    c = sub.add_parser("convert", help="write a dataset spec to an FFCV .beton")
    c.add_argument("spec", help="a data spec, as for analyze --data (e.g. fashion-mnist)")
    c.add_argument("--to", required=True, help="the .beton file to write")
    c.add_argument(
        "--split", default="test", choices=["test", "train"], help="split to write (default: test)"
    )

    r = sub.add_parser("report", help="redraw the figures of a finished run from its CSV files "
                                      "and print its summary again")
    r.add_argument("out", help="the --out directory of a finished analyze run")
    r.add_argument("--threshold", type=float, default=None,
                   help="judge the printed summary at this threshold instead of the run's "
                        "(results.csv is left as it is: rerun the analyze command with "
                        "--threshold to rewrite it, which evaluates nothing again)")

    i = sub.add_parser("info", help="versions, build flags, kernels, FFCV")
    i.add_argument("--json", action="store_true", help="print it as JSON")
    ap.commands = dict(sub.choices)
    return ap


def _analyze(args: argparse.Namespace) -> int:
    from layerfast.analysis import analyze, list_units
    from layerfast.flags import parse_flags

    if args.list_units:  # the same checks as a real run: a dry run must not pass a bad command
        parse_flags(args.reset, args.alphas, args.sigma, args.seeds, args.threshold,
                    args.batch_size, args.max_samples, args.final, args.checkpoints, args.units)
        from layerfast.engine.precision import parse_device

        parse_device(args.device)  # `--device bogus` passed the dry run that the run refuses
        units = list_units(args.arch, args.data, args.granularity, args.units, args.bn,
                           ckpts=args.ckpts, split=args.split)
        from layerfast.report.tables import printable

        for u in units:
            m, k = len(u.modules), len(u.keys)
            print(f"{printable(u.name):32s} {m:3d} module{' ' if m == 1 else 's'}  "
                  f"{k:3d} tensor{'' if k == 1 else 's'}")
        what = f"custom: --units {args.units}" if args.units else f"{args.granularity} granularity"
        print(f"{len(units)} unit{'' if len(units) == 1 else 's'} ({what}, --bn {args.bn})")
        return 0
    if not args.ckpts:
        raise LayerfastError("analyze needs --ckpts DIR (or --list-units for a dry run)")
    res = analyze(
        args.arch,
        args.ckpts,
        data=args.data,
        split=args.split,
        granularity=args.granularity,
        units=args.units,
        bn=args.bn,
        reset=args.reset,
        checkpoints=args.checkpoints,
        seeds=args.seeds,
        alphas=args.alphas,
        sigma=args.sigma,
        threshold=args.threshold,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        out=args.out,
        final=args.final,
        fresh=args.fresh,
        progress=not args.quiet,
        fanout=args.fanout,
        layout=args.layout,
    )
    print(res.summary())
    eng = res.run.get("engine", {})
    resumed = ""  # a rerun's seconds are not the pass's: say what it did not evaluate again
    if eng.get("evaluated") == 0:
        resumed = f", all restored from {res.out}/progress.sqlite, none evaluated again"
    elif eng.get("resumed_from"):
        passes = (eng.get("plan") or {}).get("passes", 1)
        over = f" of {res.run['n'] * passes} over {passes} passes" if passes > 1 else ""
        resumed = f", resumed after {eng['resumed_from']}{over} saved in progress.sqlite"
    # fp32 on a float16 model is float16 math (no mode casts the model): said where it shows
    dtype = res.run.get("model_dtype", "float32")
    on = "" if dtype == "float32" else f" on a {dtype} model"
    print(
        f"\n{res.run['variants']} variants × {res.run['n']} samples in {res.run['seconds']:.1f} s "
        f"({res.run['device']}, {res.run['precision']}{on}"
        f"{', channels_last' if res.run['channels_last'] else ''}{resumed}); results in {res.out}/"
    )
    warned = len(res.run.get("warnings", ()))
    if warned:  # printed before the progress bar and the table: easy to scroll past
        print(f"{warned} warning{'s' if warned > 1 else ''} (stderr, above; also in run.json)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from layerfast.train import train

    man = train(
        args.arch,
        args.data,
        args.epochs,
        args.out,
        checkpoints=args.checkpoints,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        schedule=args.schedule,
        progress=not args.quiet,
        max_samples=args.max_samples,
        overwrite=args.overwrite,
    )
    for c in man["checkpoints"]:
        print(f"epoch {c['epoch']:4d}  test error {c['test_error']:.4f}  {c['file']}")
    print(f"checkpoints and manifest.json in {args.out}/")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from layerfast.demo import demo

    demo(args.out, progress=not args.quiet)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from layerfast.data import convert

    path = convert(args.spec, args.to, split=args.split)
    print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from layerfast.report import redraw, summary

    if args.threshold is not None and not 0 <= args.threshold <= 1:  # NaN fails too
        raise LayerfastError(f"--threshold must lie in [0, 1]; got {args.threshold}")
    # the summary first: it is read and checked before the figures are rewritten, and a disk
    # that refuses the figures must not also cost the table
    print(summary(args.out, args.threshold), end="\n\n")
    for p in redraw(args.out):
        print(f"wrote {p}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from layerfast.info import main as info_main

    return info_main(["--json"] if args.json else [])


def _bench(args: argparse.Namespace) -> int:
    from layerfast.bench import main as bench_main

    return bench_main(args)


COMMANDS = {
    "analyze": _analyze,
    "train": _train,
    "demo": _demo,
    "convert": _convert,
    "report": _report,
    "info": _info,
    "bench": _bench,
}
# the commands that run passes on the host: glibc malloc set to its steady state first
# (layerfast/hostmem.py: page faults were up to 40% of a CPU pass's time)
COMPUTES = ("analyze", "train", "demo", "bench")


#: The exit status a signal asked for (143 SIGTERM, 130 SIGINT) during the command being run:
#: kept because the exception its handler raises can be swallowed (see `main`).
_SIGNALLED: int | None = None


def _terminated(signum: int, frame: object) -> NoReturn:
    """SIGTERM (a scheduler's preemption, `kill`) as SystemExit: the `with` and `finally`
    blocks then run as for Ctrl-C (bench's temporary checkpoints are removed, the resume store
    is closed with its progress), instead of the process vanishing mid-write."""
    global _SIGNALLED
    _SIGNALLED = 128 + signum
    say("layerfast: terminated")
    raise SystemExit(128 + signum)


def _interrupted(signum: int, frame: object) -> NoReturn:
    """SIGINT as Python's own handler does it (KeyboardInterrupt), remembered (`_SIGNALLED`)."""
    global _SIGNALLED
    _SIGNALLED = 130
    raise KeyboardInterrupt


def _quiet_unraisable(hook: Callable[[Any], object]) -> Callable[[Any], None]:
    """`sys.unraisablehook` that says nothing of our own handlers' exceptions where Python
    cannot raise them (a ctypes callback — llvmlite's, during numba's compile —, a `__del__`):
    Python printed "Exception ignored on calling ctypes callback function" and a traceback of
    `_interrupted` before "layerfast: interrupted"; `_signalled` answers the signal."""
    def quiet(unraisable: Any) -> None:
        if _SIGNALLED is not None and isinstance(getattr(unraisable, "exc_value", None),
                                                 KeyboardInterrupt | SystemExit):
            return
        hook(unraisable)

    return quiet


def _signalled() -> int:
    """The exit status of a command that a signal asked to stop but that went on: the
    handler's exception was raised where Python swallows exceptions (a weakref callback, a
    `__del__`: "Exception ignored in ...") and the command ran to its end, so "layerfast:
    terminated" was printed and the run then exited 0; or user code caught it and raised
    something else (a factory's error, exit 2). The status says what the signal asked for."""
    assert _SIGNALLED is not None
    if _SIGNALLED == 130:
        say("layerfast: interrupted")
    return _SIGNALLED


#: The arguments of the `layerfast` command being run (None outside one): analyze records
#: them in run.json as a command that can be pasted into a shell again.
INVOKED: list[str] | None = None


def main(argv: Sequence[str] | None = None) -> int:
    global INVOKED, _SIGNALLED
    raw = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    previous = previous_int = hook = None
    _SIGNALLED = None
    try:
        # Before the parser: building it imports the engine (numpy, ...), and a Ctrl-C inside
        # numpy's lazy `import numpy.dtypes` left numpy half-imported, so what came out was a
        # RecursionError traceback, exit 1 (the handler's `_SIGNALLED` tells it apart below).
        hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable(sys.unraisablehook)
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminated)
            current = signal.getsignal(signal.SIGINT)
            if current is signal.default_int_handler:  # not SIG_IGN
                previous_int = signal.signal(signal.SIGINT, _interrupted)
            elif current is layerfast._startup_sigint:  # the command's, while it imported
                signal.signal(signal.SIGINT, _interrupted)
                previous_int = signal.default_int_handler
        if layerfast.STARTUP_SIGNALS:  # a Ctrl-C while the command imported torch
            layerfast.STARTUP_SIGNALS.clear()
            raise KeyboardInterrupt
        # inside the try: `--seeds` imports layerfast.analysis (pandas, ...) while argparse
        # runs, and a Ctrl-C there printed a KeyboardInterrupt traceback
        args = parser().parse_args(argv)
        INVOKED = raw
        if args.command in COMPUTES:
            from layerfast.hostmem import steady_malloc

            steady_malloc()
        status = COMMANDS[args.command](args)
        return status if _SIGNALLED is None else _signalled()
    except LayerfastError as exc:
        if _SIGNALLED is not None:  # user code (a factory) that turned the signal into an error
            return _signalled()
        say(f"layerfast: error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("layerfast: interrupted")
        return 130
    except OSError as exc:  # stdout gone or full, a full disk, a path refused (EACCES, ...)
        if _SIGNALLED is not None:
            return _signalled()
        status = output_failed(exc)
        if status is None:
            raise
        return status
    except Exception:
        # a signal's KeyboardInterrupt/SystemExit raised inside code that then failed another
        # way (a half-done import): the signal is what happened, not a bug to show
        if _SIGNALLED is not None:
            return _signalled()
        raise
    finally:
        INVOKED = None
        if hook is not None:
            sys.unraisablehook = hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
