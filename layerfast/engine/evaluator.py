"""`Evaluator`: every variant of a model, one data pass (DESIGN.md §7).

Per batch: the batch goes to the device once; the baseline runs once and keeps its activation at
every cut some variant starts from; each group of variants then runs only its suffix — fanned
(K variants as one wide computation) where `fanout.fan_plan` proves it safe, otherwise one
variant at a time with its weights exchanged in place by `swap_` and exchanged back. Logits are
scored on the device by `score_` into a [V, 4] float64 accumulator; the host syncs only for
progress and checkpoints. The model leaves exactly as it came (values, device, layout, mode).
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerfast.engine.arguments import check_run, positive_int, variant_list
from layerfast.engine.batches import (
    check_classes,
    check_labels,
    check_logits,
    label_span,
    pair,
    peek,
)
from layerfast.engine.borrow import borrowed, lazy_names
from layerfast.engine.diagnose import OOM_ERRORS as _OOM
from layerfast.engine.diagnose import own_failure
from layerfast.engine.fanout import NotPerSample
from layerfast.engine.fanrun import GLUE_MODES, run_fanned, stack_module
from layerfast.engine.firstbatch import FirstBatchChecks
from layerfast.engine.graph import Program, canonical_keys
from layerfast.engine.overrides import canonical, check_fits, describe, keys_of, overrides_of
from layerfast.engine.phases import PhaseClock
from layerfast.engine.plan import (
    B_CPU,
    B_MAX_CUDA,
    CPU_TENSOR_CAP,
    Group,
    Plan,
    choose_batch,
    choose_kmax,
    make_plan,
    memory_budget,
    split_passes,
    stage_limit,
)
from layerfast.engine.precision import (
    channels_last,
    for_model,
    precision_context,
    resolve_device,
    resolve_precision,
)
from layerfast.engine.resumestate import ResumeState
from layerfast.engine.verify import (
    VERIFY_SAMPLES,
    random_forward,
)
from layerfast.errors import LayerfastError
from layerfast.exclusive import exclusive

_SCORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what `score_` reads


@dataclass
class EvalResult:
    """Per-variant sums over the data: columns correct@1, correct@5, cross-entropy, agreement."""

    counts: torch.Tensor  # float64 [V, 4], CPU, in the order the variants were given
    n: int
    device: str
    precision: str
    num_classes: int
    plan: dict = field(default_factory=dict)
    #: seconds: setup and total are wall time; the phases (data, baseline, fanned, swapped) are
    #: wall time on the CPU and CUDA-event time on a GPU (engine.phases explains why)
    timings: dict = field(default_factory=dict)

    @property
    def error(self) -> torch.Tensor:
        return 1.0 - self.counts[:, 0] / max(self.n, 1)

    @property
    def loss(self) -> torch.Tensor:
        return self.counts[:, 2] / max(self.n, 1)

    @property
    def agreement(self) -> torch.Tensor:
        return self.counts[:, 3] / max(self.n, 1)


def _ops():
    from layerfast import ops

    return ops


#: `--fanout`'s words, as the Python API takes them too (DESIGN §5: the same options).
FANOUT_WORDS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def resolve_fanout(fanout: bool | str | None, device: torch.device) -> bool:
    """Whether groups fan out: True/"on", False/"off", None/"auto" (on for CUDA only).

    `bool(fanout)` read `analyze(fanout="off")`, the CLI's spelling, as on: the bit-exact swap
    path asked for was replaced by the fanned one without a word. Anything else is refused.
    """
    if isinstance(fanout, str):
        if fanout not in FANOUT_WORDS:
            raise LayerfastError(
                f"unknown fanout {fanout!r}; choose one of {', '.join(FANOUT_WORDS)} "
                "(or True, False, None)"
            )
        fanout = FANOUT_WORDS[fanout]
    if fanout is None:
        return device.type == "cuda"
    if not isinstance(fanout, bool):
        raise LayerfastError(
            f"fanout must be True, False, None or one of {', '.join(FANOUT_WORDS)}; "
            f"got {fanout!r}"
        )
    return bool(fanout)


class Evaluator(FirstBatchChecks, ResumeState):
    """Evaluate weight variants of `model` on batches, all in one data pass.

    `variants`: a non-empty list of mappings {state-dict key: tensor} or objects with
    `.overrides()`; an empty mapping is the final model itself. The baseline (no overrides) is
    always computed, agreement is measured against its predictions, but only the variants'
    counts are returned: `[{}, ...]` to get the baseline's own.

    `device`, `precision`, `fanout` and `layout` take what `analyze` takes (docs/engine.md; a
    float16 or bfloat16 model runs its own forward in every precision). `batch_size` (a positive
    integer) fixes B; None plans it from memory for a DataSource (a plain iterable's batches
    are taken as they come).
    `max_fanout` (a positive integer) caps K, the variants of one fanned chunk;
    `memory_fraction` (in (0, 1]) is the share of the device's total memory B and K are planned
    for (on the CPU, of the RAM, at most 8 GiB: `plan.memory_budget`); `glue` is `fused`,
    `fold` or `unfolded` (`layerfast bench --glue`); `stage_bytes` bounds the variant tensors
    staged at once (None: `plan.stage_limit`), past which they run in several passes.

    The pass runs the model in eval mode (BatchNorm on its running statistics, no dropout)
    under `torch.inference_mode`, whatever mode it was given in; each module's train/eval flag,
    every tensor (bit for bit, the same Parameter objects) and the hooks are as they were when
    `run` returns or raises. A tensor the forward itself registers on the model is made under
    inference mode, so build such state before evaluating a model you will train further.
    """

    def __init__(
        self,
        model: nn.Module,
        variants: Sequence[Any],
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        fanout: bool | str | None = None,
        max_fanout: int = 32,
        memory_fraction: float = 0.5,
        layout: str = "auto",
        glue: str = "fused",
        stage_bytes: int | None = None,
    ) -> None:
        # checked here, not met as an AttributeError (model=None) or a TypeError from `list()`
        if not isinstance(model, nn.Module):
            raise LayerfastError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        variants = variant_list(variants)
        lazy = lazy_names(model)
        if lazy:
            # Their tensors have no shape yet: variants cannot be checked against them, and
            # `borrowed` put the empty pre-materialisation tensor back into a parameter the
            # pass had materialised (no longer lazy), leaving a model whose next forward failed.
            raise LayerfastError(
                f"the model has uninitialized lazy parameters or buffers ({', '.join(lazy[:5])}"
                f"{', ...' if len(lazy) > 5 else ''}): run one forward on a batch, or load its "
                "weights, before evaluating it")
        self.model = model
        self.variants = variants
        self.device = resolve_device(device)
        self.precision = for_model(resolve_precision(precision, self.device), precision, model)
        # None: the planner picks B on the first `run`/`plan_batch` with a DataSource; until
        # then, and for plain iterables (whose batches are already cut), this default stands.
        # Checked like max_fanout: `batch_size or default` ran 0 silently at the default B,
        # True in batches of one, and a numpy integer failed later in DataSource.batches.
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else B_CPU)
        self._batch_fixed = batch_size is not None
        # Fan-out is for the GPU (one wide kernel instead of K small ones). On 2 CPU cores it
        # measured no faster than prefix sharing alone (FCN, ResNet-20, VGG-11: within the
        # machine's run-to-run noise, BENCHMARKS.md), and the swap path is bit-exact, so None
        # means "on for CUDA, off for the CPU".
        self.fanout = resolve_fanout(fanout, self.device)
        self.max_fanout = positive_int(max_fanout, "max_fanout")
        # How a fanned group's values move (engine/fanrun.py): "fused" (fold form, BN -> [add ->]
        # ReLU as one affine_relu), "fold" (fold form, torch ops), "unfolded" (a K·B batch after
        # every conv). Same results to rounding; kept selectable to measure what each step buys
        # on a new machine (`layerfast bench --glue`) and as an escape hatch.
        if glue not in GLUE_MODES:
            raise LayerfastError(f"glue must be one of {', '.join(GLUE_MODES)}, got {glue!r}")
        self.glue = glue
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, numbers.Real) \
                or not 0 < memory_fraction <= 1:  # a str built a multi-GB string in the planner
            raise LayerfastError(f"memory_fraction must be a number in (0, 1], got "
                                 f"{memory_fraction!r}")
        self.memory_fraction = float(memory_fraction)
        # channels_last: auto = with bf16/tf32 on CUDA; "channels_last" also on the CPU, where
        # it is ~2x faster for conv nets but no longer bit-identical to the naive loop.
        self.channels_last = channels_last(self.precision, self.device, layout)
        self.layout = layout
        self._layout_checked = not self.channels_last
        # Bytes of variant tensors staged at once (None: plan.stage_limit, a multiple of the
        # model's size); more variants than that are evaluated in several passes over the data.
        # Checked as batch_size is: `stage_bytes or stage_limit(...)` ran 0 at the default limit
        # silently, and "1" failed mid-plan with a TypeError.
        self.stage_bytes = None if stage_bytes is None else positive_int(stage_bytes,
                                                                         "stage_bytes")
        self._passes: list[list[int]] | None = None
        # Bytes per sample K is sized from (`_size_groups`): measured over the cuts of the plan
        # of ALL variants (`_probe`). Measured per pass, it depended on the units in the pass,
        # and so a unit's fanned chunks, and the last bits of its logits, on the split.
        self._k_peak: float | None = None
        # Whether the traced program computes the model's forward: None until checked on the
        # first batch (`_verified`), then True, or why not (the model then runs untraced).
        self._trace_ok: bool | str | None = None
        # Cuts whose value does not hold the batch in dim 0 (`verify.unbatched_cuts`), found
        # with the trace check and left out of every pass's plan.
        self._unbatched: set[int] = set()
        # Steps that read a parameter or buffer the program does not credit them with, or
        # write into (or alias) another step's value where it does not know it
        # (`Program.unseen_effects`), found on the first batch and opaque in every pass's plan.
        self._unseen: set[int] = set()
        # Whether the model's output rows depend on other samples of the batch (batch
        # statistics), found with the cuts above: a back-off may not cut its batches.
        self._mixes_samples: bool | str = False  # "unknown": a first batch of one sample
        # None: `_settle_cuts` to run on the next batch; True: done; False: done for this run
        # only (the model failed on the check's samples), again on the next `run`
        self._batch_dim: bool | None = None
        self._pass_idx: list[int] = list(range(len(self.variants)))
        # Samples per piece a batch is cut into after running out of memory (None: whole
        # batches); lowered by the back-off in `_pass_rows`, kept for the rest of the run.
        self._rows: int | None = None
        # The same for the swap path alone (`_run_swapped`): samples per forward once one ran
        # out of memory there, so later variants and batches do not each fail first.
        self._swap_rows: int | None = None
        # Whether `score_` has a compiled kernel for a device type (`_score`), asked once.
        self._score_kernel: dict[str, bool] = {}
        # What a resumed run must continue with (`resume_state`, `run(state=...)`): the K the
        # memory budget gave (`_size_groups`), that of the interrupted run when resuming one
        # (another machine's memory would give another), the records of the passes this run
        # has finished, and the resumed pass's groups as the interrupted run left them.
        self._k: int | None = None
        self._forced_k: int | None = None
        self._records: list[dict] = []
        self._saved_groups: dict[str, dict] | None = None
        self._saved_pass: dict | None = None
        self._in_pass = False

    # ---- setup -----------------------------------------------------------------------
    def _live(self) -> dict[str, torch.Tensor]:
        live = {k: p.data for k, p in self.model.named_parameters()}
        live.update(dict(self.model.named_buffers()))
        return live

    def _device_overrides(self, live: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each variant's tensors on the device, in the live tensors' dtype and layout, so that
        `swap_` exchanges them byte for byte."""
        out = []
        canon = canonical_keys(self.model)
        for i in self._pass_idx:
            ov = canonical(overrides_of(self.variants[i]), canon, describe(self.variants[i], i))
            check_fits(ov, live, describe(self.variants[i], i), i)
            try:
                out.append({k: torch.empty_like(live[k]).copy_(t) for k, t in ov.items()})
            except _OOM:
                # Every variant's tensors stay on the device for the whole pass (one data pass).
                keys = (canon.get(k, k) for j in self._pass_idx for k in keys_of(self.variants[j]))
                need = sum(live[k].numel() * live[k].element_size() for k in keys if k in live)
                out.clear()
                raise LayerfastError(
                    f"the variants' tensors ({need / 2**30:.2f} GiB) do not fit on {self.device} "
                    f"beside the model: memory ran out at variant {i} of {len(self.variants)}; "
                    "analyze fewer at once (--units, --checkpoints, --seeds), use a device "
                    "with more memory, or stage less per pass (Evaluator(stage_bytes=...))"
                ) from None
        return out

    # ---- the pass --------------------------------------------------------------------
    @exclusive
    def run(
        self,
        data: Any,
        start: int = 0,
        counts: torch.Tensor | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_checkpoint: Callable[[torch.Tensor, int], None] | None = None,
        checkpoint_every: float = 30.0,
        on_logits: Callable[[list[int], torch.Tensor], None] | None = None,
        state: dict | None = None,
    ) -> EvalResult:
        """One pass over `data`: a `layerfast.data.DataSource`, or an iterable of (x, y).

        `start`/`counts` resume a pass: skip the first `start` samples (DataSource only) and
        continue from the saved sums; `state`, the `resume_state()` taken when they were
        saved, makes the rest run (and the plan report) as the interrupted run would have.
        `on_checkpoint(counts, n_done)` is called every
        `checkpoint_every` seconds (>= 0; `math.inf`: never mid-pass) and at the end, with CPU
        counts in variant order. Bad arguments are refused before any work (`arguments`).
        `on_logits(variant_indices, logits[K, B, C])` sees every block of logits scored, in
        data order per variant (for tests and research code; it costs a host sync)."""
        checkpoint_every = check_run(data, start, counts, len(self.variants), {
            "on_progress": on_progress, "on_checkpoint": on_checkpoint, "on_logits": on_logits},
            checkpoint_every)
        self._hook = on_logits
        self._forget_checks()
        self.plan_batch(data)
        if not self._layout_checked:
            if hasattr(data, "batches") and hasattr(data, "shape"):
                self.settle_layout(torch.zeros((2, *data.shape), dtype=self._input_dtype()))
            else:  # a plain iterable: probe with its first batch
                data, first = peek(data)
                if first is not None:
                    self.settle_layout(pair(first)[0][:2])  # checked first: a dict has no [0]
        passes = self.passes()
        P, V, t_all = len(passes), len(self.variants), time.perf_counter()
        source = hasattr(data, "batches") and hasattr(data, "n")
        N: int | None = int(data.n) if source else None
        if P > 1 and not source and iter(data) is data:
            raise LayerfastError(
                f"these {V} variants are evaluated in {P} passes over the data (their tensors "
                "exceed what one pass stages), and a one-shot iterator can be read only once: "
                "pass a list of batches or a DataSource"
            )
        if P > 1 and start and not source:
            raise LayerfastError("resuming needs a DataSource, not a plain iterable of batches")
        if P > 1 and self._k_peak is None and self.fanout:
            # K from every variant's cuts, not each pass's own: the same K whatever the split
            if hasattr(data, "batches") and hasattr(data, "shape"):
                self._probe(torch.zeros((2, *data.shape), dtype=self._input_dtype()))
            else:
                first = next(iter(data), None)
                if first is not None:
                    self._probe(pair(first)[0][:2])
        total = (
            torch.zeros(V, 4, dtype=torch.float64)
            if counts is None
            else counts.detach().to("cpu", torch.float64).clone()
        )
        # `start` counts samples over the passes, pass-major: pass p, sample s is p·N + s.
        p0, s0 = divmod(start, N) if P > 1 and N else (0, start)
        if P > 1 and N and p0 == P and s0 == 0:
            p0, s0 = P - 1, N  # every pass done but not yet marked finished: end the last one
        results: list[EvalResult] = []
        self._records = self._restore(state, p0, passes)
        plans = [Plan.from_record(r, set(i), self.max_fanout)
                 for r, i in zip(self._records, passes, strict=False)]
        for p in range(p0, P):
            idx = self._pass_idx = passes[p]
            base = p * N if N else (p * results[0].n if results else 0)

            def saved(c: torch.Tensor, n: int, idx: list[int] = idx, base: int = base) -> None:
                total[idx] = c
                on_checkpoint(total.clone(), base + n)

            def progress(n: int, base: int = base) -> None:
                on_progress(base + n)

            t0 = time.perf_counter()
            self._in_pass = True
            try:
                with self._on_device() as cl:
                    res = self._run(
                        data,
                        s0 if p == p0 else 0,
                        total[idx],
                        progress if on_progress is not None else None,
                        saved if on_checkpoint is not None else None,
                        checkpoint_every,
                        cl,
                        t0,
                    )
            finally:
                self._in_pass = False
                # the resumed pass's: later passes plan their own
                self._saved_groups = self._saved_pass = None
            if results and not source and res.n != results[0].n:
                # Each pass iterates the data again; sums over other samples are no one
                # variant set's counts, and n (the last pass's) would divide all of them.
                raise LayerfastError(
                    f"the data gave {results[0].n} samples in the first of the {P} passes "
                    f"these {V} variants need (their tensors exceed what one pass stages) and "
                    f"{res.n} in pass {p + 1}: an iterable read again must give the same "
                    "batches (a list of batches, a DataLoader without random sampling)")
            total[idx] = res.counts
            results.append(res)
            plans.append(self.last_plan.remapped(idx))
            self._records.append(plans[-1].record())
        if not results:
            raise LayerfastError(f"nothing left to evaluate: start={start} is past the last pass")
        self._pass_idx = list(range(V))
        self.last_plan = Plan.merged(plans)
        timings = {k: sum(r.timings.get(k, 0.0) for r in results) for k in results[-1].timings}
        timings["total"] = time.perf_counter() - t_all
        last = results[-1]
        return EvalResult(
            total,
            last.n,
            last.device,
            last.precision,
            last.num_classes,
            {**self.last_plan.summary(), "passes": P, **self._backoffs()},
            timings,
        )

    def passes(self) -> list[list[int]]:
        """The variants' indices in passes over the data (`plan.split_passes`): one pass unless
        staging every variant's tensors at once would exceed the stage limit."""
        if self._passes is None:
            size = {k: t.numel() * t.element_size() for k, t in self._live().items()}
            limit = self.stage_bytes or stage_limit(sum(size.values()))
            canon = canonical_keys(self.model)
            keysets = [frozenset(canon.get(k, k) for k in keys_of(v)) for v in self.variants]
            self._passes = split_passes(
                keysets, [sum(size.get(k, 0) for k in ks) for ks in keysets], limit
            )
        return self._passes

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[bool]:
        """`borrow.borrowed` for this evaluator's model and device; yields whether
        channels_last is on."""
        cl = self.channels_last
        with borrowed(self.model, self.device, cl):
            yield cl

    def plan_batch(self, data: Any) -> int:
        """Choose B (samples per batch) for `data` unless the caller fixed it, and return it.

        Measured, not guessed: one probe forward of two zero samples of the data's shape, at
        the run's precision and layout, gives the bytes per sample of every kept cut and of the
        largest activation; `plan.choose_batch` turns them into B (up to 4096 on a GPU, up to
        1000 on the CPU). Deterministic for a model, data shape and machine (total, not free,
        memory), so a resumed analysis repeats the same B. Idempotent; a plain iterable of
        batches keeps its own batching."""
        if self._batch_fixed or not (hasattr(data, "batches") and hasattr(data, "shape")):
            return self.batch_size
        self._batch_fixed = True
        x2 = torch.zeros((2, *data.shape), dtype=self._input_dtype())
        self.settle_layout(x2)
        probed = self._probe(x2)
        if probed is None:  # the real pass reports the model's error properly
            return self.batch_size
        sizes, peak, plan = probed
        k = max([min(len(g.members), self.max_fanout) for g in plan.groups if g.fan], default=1)
        cuda = self.device.type == "cuda"
        budget = memory_budget(self.device, self.memory_fraction)
        self.batch_size = choose_batch(
            sum(sizes),
            peak,
            k,
            budget,
            B_MAX_CUDA if cuda else B_CPU,
            None if cuda else CPU_TENSOR_CAP,
        )
        return self.batch_size

    def _probe(self, x2: torch.Tensor) -> tuple[list[float], float, Plan] | None:
        """One forward of the two samples `x2` through the plan of every variant, at the run's
        precision and layout: the bytes per sample of each kept cut and the largest of them
        and the input (kept as `_k_peak`, what K is sized from), and that plan. None when the
        model fails on them."""
        keysets = [set(keys_of(v)) for v in self.variants]
        with self._on_device() as cl:
            prog = self._program()
            plan = make_plan(prog, keysets, self.fanout, self.max_fanout)
            x = x2.to(self.device)
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            cache: dict[int, torch.Tensor] = {}
            try:
                with precision_context(self.precision, self.device):
                    prog.run(x, 0, keep=set(plan.cuts), saved=cache)
            except Exception:  # noqa: BLE001 - said by the real pass
                return None
        n = max(x.shape[0], 1)
        sizes = [t.numel() * t.element_size() / n for t in cache.values()
                 if isinstance(t, torch.Tensor)]
        peak = max(sizes + [x[0].numel() * x.element_size()])
        self._k_peak = peak
        return sizes, peak, plan

    def settle_layout(self, x: torch.Tensor) -> bool:
        """With channels_last on, check that the model runs in it (a forward doing
        `x.view(B, -1)` on a conv map cannot) on a probe batch `x`; if only the contiguous layout
        works, use that when the layout was `auto`, and say so clearly when it was asked for.
        Returns whether channels_last stays on. Idempotent."""
        if self._layout_checked:
            return self.channels_last
        self._layout_checked = True

        def works() -> str | None:
            with self._on_device() as cl:
                xd = x.to(self.device, torch.float32)
                if cl and xd.dim() == 4:
                    xd = xd.contiguous(memory_format=torch.channels_last)
                try:
                    with precision_context(self.precision, self.device):
                        self._program().run(xd, 0)
                except Exception as exc:  # noqa: BLE001 - only the comparison matters here
                    return f"{type(exc).__name__}: {exc}"
            return None

        err = works()
        if err is None:
            return True
        self.channels_last = False
        if works() is not None:
            self.channels_last = True  # fails either way: the pass reports the model's error
            return True
        if self.layout == "channels_last":
            raise LayerfastError(
                "this model does not run with channels_last activations ("
                f"{err.splitlines()[0][:200]}); use the contiguous layout"
            )
        return False

    def _input_dtype(self) -> torch.dtype:
        """The dtype a DataSource's batches are fed in: the model's own floating dtype (a
        float64 model gets float64 data, as in its own loop), float32 for a float32 model."""
        from layerfast.models import input_dtype

        return input_dtype(self.model)

    def _batches(
        self, data: Any, start: int, cl: bool
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]]:
        """(x, y) on the device, and the labels' (min, max) read on the host before the move
        (`label_span`)."""
        dev = self.device
        dtype = self._input_dtype()
        if hasattr(data, "batches") and hasattr(data, "shape"):
            from layerfast.data import to_device

            for x, y in data.batches(self.batch_size, start=start):
                span = label_span(y)
                yield (*to_device(x, y, data, dev, dtype=dtype, channels_last=cl), span)
            return
        if start:
            raise LayerfastError("resuming needs a DataSource, not a plain iterable of batches")
        for item in data:
            x, y = pair(item)
            span = label_span(y)
            x = x.to(dev, non_blocking=True)
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(dev, torch.int64, non_blocking=True), span

    def _run(self, data, start, counts, on_progress, on_checkpoint, every, cl, t0) -> EvalResult:
        ops = _ops()
        live = self._live()
        prog = self._program(trace=not isinstance(self._trace_ok, str))
        if isinstance(self._trace_ok, str):
            prog.trace_error = self._trace_ok
        prog.drop_cuts(self._unbatched)  # found on the first pass's first batch (`_settle_cuts`)
        prog.make_opaque(self._unseen)  # likewise (`_settle_unseen`)
        dev_ov = self._device_overrides(live)
        # A variant whose tensors equal the live ones (e.g. reinit to the final τ) IS the
        # baseline: score it from the baseline's logits, bit for bit, at no cost.
        keysets = [
            set() if all(torch.equal(t, live[k]) for k, t in o.items()) else set(o) for o in dev_ov
        ]
        plan = make_plan(prog, keysets, self.fanout, self.max_fanout)
        self.last_plan = plan  # for the compute floor (engine.flops) and for inspection
        self._groups_sized = False
        # Device index tensors of the fanned chunks whose rows are not one run (`_run_chunk`).
        self._row_index: dict[tuple[int, ...], torch.Tensor] = {}
        # K is sized for the planned B, not for the first batch this run happens to see: a run
        # resumed at the last (partial) batch must pick the K of the uninterrupted run, or its
        # fanned chunks, and so the last bits of its logits, differ.
        source = hasattr(data, "batches") and hasattr(data, "shape")
        self._k_batch = self.batch_size if source else None
        V = len(self._pass_idx)
        acc = torch.zeros(V + 1, 4, dtype=torch.float64, device=self.device)  # row V: baseline
        if counts is not None:
            acc[:V] = counts.to(self.device)
        setup = time.perf_counter() - t0
        clock = PhaseClock(self.device)
        n, last_ck, C = start, time.perf_counter(), 0
        batches = iter(self._batches(data, start, cl))
        while True:
            with clock("data"):
                batch = next(batches, None)
            if batch is None:
                break
            x, y, span = batch
            if self._batch_dim is None and x.shape[0]:  # the first (non-empty) batch
                t_check = time.perf_counter()  # it syncs (allclose): wall time is true
                xc = self._check_samples(data, start, cl, x)
                if self._trace_ok is None and prog.traced:
                    prog, plan = self._verified(prog, plan, xc, keysets)
                elif self._trace_ok is None and prog.trace_error:
                    # untraced, "exact": unless the forward is random (nothing seeds it)
                    why = random_forward(self.model, xc[:VERIFY_SAMPLES], self.device)
                    if why:
                        self._trace_ok = prog.trace_error = plan.untraced = (
                            f"{why}; fx could not trace it either: {prog.trace_error}")
                prog, plan = self._settle_unseen(prog, plan, xc[:VERIFY_SAMPLES], keysets)
                prog, plan = self._settle_cuts(prog, plan, xc[:VERIFY_SAMPLES], keysets)
                setup += time.perf_counter() - t_check  # a setup cost, not the data phase's
            try:
                with precision_context(self.precision, self.device):
                    C = self._pass_rows(ops, prog, plan, x, y, span, acc, dev_ov, live, clock)
            except LayerfastError:
                raise
            except Exception:
                self._own_failure(x, n, dev_ov, live)  # the model's own forward fails: bad input
                raise
            n += int(y.shape[0])
            if on_progress is not None:
                on_progress(n)
            if on_checkpoint is not None and time.perf_counter() - last_ck >= every:
                on_checkpoint(acc[:V].cpu(), n)
                last_ck = time.perf_counter()
        if n == 0:
            raise LayerfastError("the data is empty: no samples to evaluate")
        if C == 0 and hasattr(data, "shape"):
            C = self._num_classes(prog, data.shape, cl)  # resumed at the end: no batch ran
        if n == start and self._saved_pass is not None:  # likewise: the plan it had
            plan = self.last_plan = self._saved_plan()
        elif not self._groups_sized:  # the K the interrupted run had, for run.json
            self._apply_saved(plan)
        out = acc[:V].cpu()
        if on_checkpoint is not None:
            on_checkpoint(out, n)
        timings = {
            "setup": setup,
            "data": 0.0,
            "baseline": 0.0,
            "fanned": 0.0,
            "swapped": 0.0,
            **clock.totals(),
            "total": time.perf_counter() - t0,
        }
        for g in plan.groups:
            g.stacks.clear()  # the K-stacked weights: device memory, not needed past the pass
        summary = {**plan.summary(), **self._backoffs()}
        return EvalResult(out, n, str(self.device), self.precision, C, summary, timings)

    def _backoffs(self) -> dict[str, int | None]:
        """The plan's record of out-of-memory back-offs, so a slow run says why in run.json:
        the samples per piece of a whole batch (`_pass_rows`) and per swapped forward
        (`_run_swapped`) once an out-of-memory lowered them; None: never."""
        return {"rows_after_oom": self._rows, "swap_rows_after_oom": self._swap_rows}

    # ---- pieces ----------------------------------------------------------------------
    def _own_failure(self, x: torch.Tensor, first: int, dev_ov: list[dict[str, torch.Tensor]],
                     live: dict[str, torch.Tensor]) -> None:
        """`diagnose.own_failure`: a LayerfastError when the model's own forward fails on `x`."""
        step = min(r for r in (self._rows, self._swap_rows, int(x.shape[0])) if r)
        own_failure(self.model, self.variants, self._pass_idx, self.precision, self.device, x,
                    first, dev_ov, live, step)

    def _num_classes(self, prog: Program, shape: tuple[int, ...], cl: bool) -> int:
        """The logits' width from one zero sample: a pass resumed at its very end sees no batch
        to tell it (and top-5 needs it)."""
        x = torch.zeros((1, *shape), device=self.device, dtype=self._input_dtype())
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), precision_context(self.precision, self.device):
            return int(prog.run(x, 0).shape[1])

    def _pass_rows(self, ops, prog, plan, x, y, span, acc, dev_ov, live, clock) -> int:
        """`_pass_batch` on the batch in pieces of at most `self._rows` samples. Out of memory
        anywhere in a piece (the baseline, or a variant already at one sample or K=1) drops
        what the piece added to the sums, halves `_rows` for the rest of the run and retries:
        the same samples, scored once each. One sample that still does not fit is a clear error.
        (`on_logits` may see a failed piece's first blocks twice.)"""
        C, lo, B = 0, 0, x.shape[0]
        while lo < B:
            hi = min(B, lo + (self._rows or B))
            before = acc.clone()
            try:
                C = self._pass_batch(
                    ops, prog, plan, x[lo:hi], y[lo:hi], span, acc, dev_ov, live, clock
                )
            except _OOM as exc:
                acc.copy_(before)
                if self._mixes_samples:
                    why = ("this model's outputs depend on which samples share a batch (batch "
                           "statistics, attention over dim 0)" if self._mixes_samples is True
                           else "whether this model's outputs depend on which samples share a "
                           "batch could not be told from its first batch of one sample")
                    raise LayerfastError(
                        f"out of memory on {self.device} on a batch of {hi - lo}, and {why}, so "
                        "its batches cannot be cut into smaller pieces: use a smaller "
                        "--batch-size or a device with more memory") from exc
                if hi - lo <= 1:
                    raise LayerfastError(
                        f"out of memory on {self.device} even with one sample per batch and one "
                        "variant at a time: free memory on the device (other processes, "
                        "memory_fraction) or use one with more"
                    ) from exc
                self._rows = (hi - lo) // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            lo = hi
        return C

    def _pass_batch(
        self,
        ops,
        prog: Program,
        plan: Plan,
        x: torch.Tensor,
        y: torch.Tensor,
        span: tuple[int, int] | None,
        acc: torch.Tensor,
        dev_ov,
        live,
        clock: PhaseClock,
    ) -> int:
        """One batch through the baseline (keeping the cuts) and every group's suffix; returns
        the number of classes. `span`: the labels' (min, max) read on the host, or None."""
        V = len(self._pass_idx)
        with clock("baseline"):
            cache: dict[int, torch.Tensor] = {}
            # A forward that writes into its input (`x.sub_(mean)`) must not change the batch
            # the variants starting at the input then read (nor the caller's tensors).
            x0 = x.clone() if prog.has_inplace else x
            logits0 = prog.run(x0, 0, keep=set(plan.cuts), saved=cache)
            check_logits(logits0, x.shape[0])
            C = logits0.shape[1]
            check_classes(C)
            if span is not None:  # before anything is scored: on CUDA, a device-side assert
                check_labels(span, C)
            ref = logits0.argmax(1)
            self._score(ops, logits0.unsqueeze(0), y, ref, acc[V : V + 1])
            for i in plan.same_as_baseline:
                self._score(ops, logits0.unsqueeze(0), y, ref, acc[i : i + 1], [i])
        if not self._groups_sized:
            self._size_groups(plan, x, cache)
            self._groups_sized = True
        for g in plan.groups:
            inp = x if g.start == 0 else cache[g.start]
            if g.fan is not None:
                with clock("fanned"):
                    self._run_fanned_group(ops, prog, g, inp, y, ref, acc, dev_ov, live)
            else:
                with clock("swapped"):
                    for i in g.members:
                        self._run_swapped(
                            ops,
                            prog,
                            g.start,
                            inp,
                            y,
                            ref,
                            acc[i : i + 1],
                            dev_ov[i],
                            live,
                            rows=[i],
                        )
        return C

    def _score(
        self,
        ops,
        logits: torch.Tensor,
        y: torch.Tensor,
        ref: torch.Tensor,
        acc_rows: torch.Tensor,
        rows: list[int] | None = None,
    ) -> None:
        if logits.dtype not in _SCORED_DTYPES:  # a float64 model: scored as the naive loop does
            logits = logits.float()
        # An extension built without CUDA kernels (FORCE_CUDA=0, or no nvcc at install time)
        # has no `score_` for a GPU: the dispatcher would raise NotImplementedError mid-pass.
        # `score_reference` computes the same counts with torch ops (ops.py). Cached per device
        # type: the dispatcher query costs microseconds, and this runs per variant per batch.
        kernel = self._score_kernel.get(logits.device.type)
        if kernel is None:
            kernel = ops.has_kernel("score_", logits.device)
            self._score_kernel[logits.device.type] = kernel
        (ops.score_ if kernel else ops.score_reference)(logits.contiguous(), y, ref, acc_rows)
        if self._hook is not None and rows is not None:
            self._hook([self._pass_idx[r] for r in rows], logits.float().cpu())

    def _size_groups(self, plan: Plan, x: torch.Tensor, cache: dict) -> None:
        """Pick K per fanned group from the activation size of one sample."""
        per_sample = self._k_peak  # every variant's cuts (`_probe`), when measured
        if per_sample is None:
            per_sample = max([t.numel() * t.element_size() for t in cache.values()]
                             + [x.numel() * x.element_size()]) / max(x.shape[0], 1)
        budget = memory_budget(self.device, self.memory_fraction)
        batch = self._k_batch or x.shape[0]
        k = self._forced_k or choose_kmax(4 * per_sample, batch, budget, self.max_fanout)
        self._k = k  # a rerun on a machine with other memory keeps it (`resume_state`)
        for g in plan.groups:
            if g.fan is not None:
                g.kmax = min(g.kmax, k)
        self._apply_saved(plan)

    def _run_swapped(
        self,
        ops,
        prog: Program,
        start: int,
        inp: torch.Tensor,
        y,
        ref,
        acc_rows,
        ov: dict[str, torch.Tensor],
        live: dict[str, torch.Tensor],
        lo: int = 0,
        hi: int | None = None,
        rows: list[int] | None = None,
    ) -> None:
        hi = inp.shape[0] if hi is None else hi
        cap = self._swap_rows
        if cap is not None and hi - lo > cap:  # an earlier out-of-memory set the size
            # in equal pieces (9 rows at a cap of 8: 5 + 4, not 8 + 1, which a model that
            # chunks its batch cannot take)
            k = -(-(hi - lo) // cap)
            cuts = [lo + (hi - lo) * i // k for i in range(k + 1)]
            for s, e in zip(cuts, cuts[1:], strict=False):
                self._run_swapped(ops, prog, start, inp, y, ref, acc_rows, ov, live, s, e, rows)
            return
        keys = list(ov)
        a, b = [live[k] for k in keys], [ov[k] for k in keys]
        part = inp[lo:hi]
        if prog.has_inplace:
            part = part.clone()
        ops.swap_(a, b)
        try:
            logits = prog.run(part, start)
        except _OOM:
            if hi - lo <= 1 or self._mixes_samples:  # `_pass_rows` says why
                raise
            logits = None
        finally:  # whatever the forward raised (a user's check, Ctrl-C), the weights go back
            ops.swap_(a, b)
        if logits is None:
            mid = (lo + hi) // 2  # back off: half the batch at a time, same sums, and after
            self._swap_rows = hi - mid  # this, no swapped forward of more samples than that
            self._run_swapped(ops, prog, start, inp, y, ref, acc_rows, ov, live, lo, mid, rows)
            self._run_swapped(ops, prog, start, inp, y, ref, acc_rows, ov, live, mid, hi, rows)
            return
        self._score(ops, logits.unsqueeze(0), y[lo:hi], ref[lo:hi], acc_rows, rows)

    def _stacks(self, prog: Program, g: Group, lo: int, hi: int, dev_ov) -> dict:
        key = (lo, hi)
        if key not in g.stacks:
            stacks = {}
            for mod in g.fan.modules:
                prefix = mod + "."
                per = [
                    {k[len(prefix) :]: t for k, t in dev_ov[i].items() if k.startswith(prefix)}
                    for i in g.members[lo:hi]
                ]
                stacks[mod] = stack_module(prog.modules[mod], per, self.channels_last)
            g.stacks[key] = stacks
        return g.stacks[key]

    def _run_fanned_group(self, ops, prog, g: Group, inp, y, ref, acc, dev_ov, live) -> None:
        lo = 0
        while lo < len(g.members):
            hi = min(lo + g.kmax, len(g.members))
            try:
                if not self._run_chunk(ops, prog, g, lo, hi, inp, y, ref, acc, dev_ov, live):
                    return  # fell back to the swap path for the rest of the group
            except _OOM:
                # One variant, or the swap path the group fell back to (some members already
                # scored, no fan plan left to halve): the batch's back-off (`_pass_rows`).
                if hi - lo == 1 or g.fan is None:
                    raise
                g.kmax = max(1, (hi - lo) // 2)  # back off; nothing of this chunk was scored
                g.stacks.clear()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            lo = hi

    def _run_chunk(self, ops, prog, g: Group, lo, hi, inp, y, ref, acc, dev_ov, live) -> bool:
        """Run members[lo:hi] fanned and score them. False: the fanned run failed for a reason
        other than memory, so the group now runs (from `lo` on) on the swap path instead."""
        K = hi - lo
        stacks = self._stacks(prog, g, lo, hi, dev_ov)
        x = inp.clone() if prog.has_inplace else inp
        try:
            logits = run_fanned(
                prog,
                g.fan,
                x,
                stacks,
                K,
                fold=self.glue != "unfolded",
                fuse_ops=self.glue == "fused",
            )
            if logits.dim() != 2 or logits.shape[0] != K * inp.shape[0]:  # reshaped below
                raise NotPerSample(f"the fanned output has shape {tuple(logits.shape)}, not "
                                   f"[{K}·{inp.shape[0]}, classes]")
        except _OOM:
            raise
        except Exception as exc:  # noqa: BLE001 - the proof missed something: fall back, stay correct
            g.fan = None
            g.fallback = f"{type(exc).__name__}: {exc}"[:300]
            for i in g.members[lo:]:
                self._run_swapped(
                    ops, prog, g.start, inp, y, ref, acc[i : i + 1], dev_ov[i], live, rows=[i]
                )
            return False
        B = inp.shape[0]
        logits = logits.reshape(K, B, -1)
        rows = g.members[lo:hi]
        if rows == list(range(rows[0], rows[0] + K)):
            self._score(ops, logits, y, ref, acc[rows[0] : rows[0] + K], rows)
        else:
            part = torch.zeros(K, 4, dtype=acc.dtype, device=acc.device)
            self._score(ops, logits, y, ref, part, rows)
            # Built once per chunk and pass, not per batch: `torch.tensor(rows, device=cuda)` is
            # a synchronous host->device copy, a host sync in the hot loop. A unit's members
            # are rarely one run: its final-τ reinit is scored from the baseline (a gap).
            index = self._row_index.get(tuple(rows))
            if index is None:
                index = self._row_index[tuple(rows)] = torch.tensor(rows, device=acc.device)
            acc.index_add_(0, index, part)
        return True
