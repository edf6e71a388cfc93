"""The Evaluator's first-batch checks (DESIGN.md §7): before a pass trusts its traced program,
the first batch decides whether the trace computes the model's own forward (`_verified`), which
steps read or write tensors past the program's bookkeeping (`_settle_unseen`) and which cuts no
variant may start from (`_settle_cuts`). Each may re-plan; each runs on the first batch of
every `run` (the caller may have changed the model since the last: `_forget_checks`).

A mixin of `Evaluator` (it reads the Evaluator's model, device, fan-out options and batch
iterator): kept apart so the pass itself stays readable, and because these checks decide
correctness, not speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from layerfast.engine.diagnose import OOM_ERRORS as _OOM
from layerfast.engine.graph import Program
from layerfast.engine.plan import Plan, make_plan
from layerfast.engine.precision import channels_last, precision_context
from layerfast.engine.tracing import attributes_kept
from layerfast.engine.verify import VERIFY_SAMPLES, trace_differs, unbatched_cuts


class FirstBatchChecks:
    """`Evaluator`'s first-batch checks; see the module docstring."""

    #: Set by `_checks_kept`: `run` keeps the verdicts of the run before.
    _keep_checks = False

    def _forget_checks(self) -> None:
        """Make the next batch run the first-batch checks again: whether the trace computes
        the model's forward, which steps have unseen effects, which cuts hold the batch and
        whether the model mixes samples; and the run its layout probe (`settle_layout`), which
        left a model changed to one that cannot run in channels_last (`h.view(B, -1)` on a
        conv map) failing on a reused Evaluator, blamed on the model, where a fresh one falls
        back to the contiguous layout (auto) or names the layout. Not inside `_checks_kept`.

        They hold for the model as it was on that batch. Between two `run`s the caller may
        change it (replace a submodule, a `forward`, a flag a branch reads); a reused
        Evaluator that kept the first run's verdicts ran the new model's trace unchecked and
        returned another function's counts, baseline included. Within one `run` its passes
        share the verdicts of its first batch, so a multi-pass run plans every pass alike."""
        if self._keep_checks:
            return
        self.channels_last = channels_last(self.precision, self.device, self.layout)
        self._layout_checked = not self.channels_last
        self._trace_ok, self._batch_dim = None, None
        self._unbatched, self._unseen, self._mixes_samples = set(), set(), False

    @contextlib.contextmanager
    def _checks_kept(self) -> Iterator[None]:
        """`run`s inside keep the verdicts of the run before, for a caller that has not changed
        the model since and measures the pass alone: `bench.profile_pass`, whose profiled run
        after its warm-up had the checks' own forwards, medians and copies in its op table
        once every run checked the model again."""
        self._keep_checks = True
        try:
            yield
        finally:
            self._keep_checks = False

    def _program(self, trace: bool = True) -> Program:
        """The model's program for this pass, with the autocast regions of the forward's own
        replayed where the pass's state is another (`tracing.trace_for_pass`)."""
        return Program(self.model, trace, (self.precision, self.device))

    def _check_samples(self, data: Any, start: int, cl: bool, x: torch.Tensor) -> torch.Tensor:
        """The samples the first-batch checks run on: the batch `x`, unless this pass resumes
        a DataSource mid-way (`start` > 0), where they are the data's first batch, as in the
        uninterrupted run. A resumed run's first batch can be its last, of one sample, from
        which whether the model mixes samples cannot be told: a later out-of-memory then
        ended the run where the uninterrupted one backed off."""
        if not start or not (hasattr(data, "batches") and hasattr(data, "shape")):
            return x
        first = next(iter(self._batches(data, 0, cl)), None)
        return x if first is None or not first[0].shape[0] else first[0]

    def _verified(
        self, prog: Program, plan: Plan, x: torch.Tensor, keysets: list[set[str]]
    ) -> tuple[Program, Plan]:
        """The traced program and its plan if it computes what the model's own forward does on
        the first batch, else the untraced program (one opaque step) and its plan.

        fx records one path through Python: a branch on `isinstance(h, torch.Tensor)` or
        `hasattr(out, "logits")` sees a Proxy while tracing and a tensor when run, and a
        getattr on a module's output is recorded blindly; such a program computes another
        function (a wrong number) or fails where the forward does not. Equal bit for bit on
        the CPU (the program calls the same modules and functions); on a GPU to 1e-4 relative,
        where some kernels are not deterministic. Checked in fp32 whatever the pass's precision
        (a bf16 ulp would exceed any tolerance that still catches a wrong path, and a spurious
        failure would silently cost the pass its prefix sharing and fan-out), on the first
        `VERIFY_SAMPLES` samples: fx picks its path by types and attributes, never by values (a
        branch on a value does not trace), so a slice shows a wrong path as well as a batch."""
        x = x[:VERIFY_SAMPLES]
        while True:
            try:
                # a try that ran out of memory gives back what its calls set (a cache filled
                # on first use), so that the next, smaller one sees the first fill again
                with attributes_kept(list(self.model.modules())):
                    why = trace_differs(self.model, prog, x, self.device)
                break
            except _OOM:
                # No verdict on the trace (an untraced run loses prefix sharing and fan-out for
                # good, and an unchecked one might compute another function): fewer samples, as
                # `_pass_rows` backs off the pass itself; fx's path does not depend on how many.
                if x.shape[0] <= 1:
                    why = "the trace check ran out of memory even on one sample"
                    break
                x = x[: x.shape[0] // 2]
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if why is None or why is False:  # False: the model itself fails, the pass says so
            self._trace_ok = True
            return prog, plan
        self._trace_ok = why
        prog = Program(self.model, trace=False)
        prog.trace_error = why
        plan = make_plan(prog, keysets, self.fanout, self.max_fanout)
        self.last_plan = plan
        return prog, plan

    def _settle_unseen(
        self, prog: Program, plan: Plan, x: torch.Tensor, keysets: list[set[str]]
    ) -> tuple[Program, Plan]:
        """Once, on the first batch, traced or not: the steps that read a parameter or buffer
        past the program's bookkeeping (a replaced `forward`, a tensor sharing a parameter's
        storage, a reference to another module), or write into another step's value (or the
        input) past its in-place analysis (a replaced `forward` calling `x.mul_(2)`), by
        `Program.unseen_effects`, are made opaque in this and every later pass's plan: a
        variant of a tensor such a step reads starts before it, and cached cuts and the
        input are copied before each variant runs from them.

        Nothing to learn when no variant starts late, every start is copied already and no
        group fans out (where an unknown write would also break the fused glue's proof)."""
        if not plan.cuts and prog.has_inplace and all(g.fan is None for g in plan.groups):
            return prog, plan
        with precision_context("fp32", self.device):  # which tensors a step reads: a few
            found = prog.unseen_effects(x[:8])  # samples tell as well as a batch, at less memory
        self._unseen = set().union(*found) if found else set()
        if self._unseen:
            prog.make_opaque(self._unseen)
            plan = make_plan(prog, keysets, self.fanout, self.max_fanout)
            self.last_plan = plan
        return prog, plan

    def _settle_cuts(
        self, prog: Program, plan: Plan, x: torch.Tensor, keysets: list[set[str]]
    ) -> tuple[Program, Plan]:
        """Once, on the first batch, traced or not: the cuts no variant may start from, left
        out of this and every later pass's plan, and whether the model mixes samples (then no
        out-of-memory back-off may cut its batches), by `verify.unbatched_cuts`."""
        report: dict = {}
        self._unbatched = unbatched_cuts(prog, x, self.device, report)
        self._mixes_samples = report.get("mixes_samples", False)
        # Settled for good only when the model ran: a first run on data it fails on must not
        # leave a reused Evaluator without its cuts (its drops still hold for this run's passes)
        self._batch_dim = True if report.get("checked") else False
        if self._unbatched:
            prog.drop_cuts(self._unbatched)
            plan = make_plan(prog, keysets, self.fanout, self.max_fanout)
            self.last_plan = plan
        return prog, plan
