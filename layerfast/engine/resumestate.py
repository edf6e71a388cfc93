"""What a resumed pass continues with (DESIGN.md §5: a killed run, started again, ends with the
same results as an uninterrupted one): `Evaluator.resume_state()` is saved with every progress
segment, and `run(state=...)` takes it back — the fan-out width K, out-of-memory back-offs, the
resumed pass's groups and the finished passes' plans — after checking it describes this run.

A mixin of `Evaluator` (it reads the Evaluator's plan, passes and back-off fields).
"""

from __future__ import annotations

from layerfast.engine.plan import Plan, _is_int
from layerfast.errors import LayerfastError


class StateMismatch(LayerfastError):
    """A saved engine state that does not describe the run taking it back (`analyze` names
    the store it came from)."""


class ResumeState:
    """`Evaluator`'s resume state; see the module docstring."""

    def resume_state(self) -> dict:
        """What a run resumed from the sums saved now must continue with to end as this run
        will, as JSON (`run(state=...)` takes it back; analyze's resume store saves it with
        every segment): the K the memory budget gave, the rows per forward an out-of-memory
        back-off left, and the plan of every pass so far, the current one's K per group
        (lowered by a back-off) and fallbacks included. Without it a rerun on a machine with
        other memory went on in chunks of another K, a back-off was forgotten (run in whole
        batches again, unsaid in run.json), and a pass finished before the interrupt was
        missing from run.json's plan."""
        plans = list(self._records)
        if self._in_pass:
            plans.append(self.last_plan.remapped(self._pass_idx).record())
        return {"k": self._k, "rows": self._rows, "swap_rows": self._swap_rows, "plans": plans}

    def _restore(self, state: dict | None, p0: int,
                 passes: list[list[int]]) -> list[dict]:
        """Take back a `resume_state` for a run resuming in pass `p0`: the K and back-offs,
        and the resumed pass's groups (`_apply_saved`). Returns the records of the passes
        before `p0`, which this run does not run again."""
        self._forced_k, self._saved_groups, self._saved_pass = None, None, None
        if state is None:
            return []
        try:
            k, rows, swap = (state.get(key) for key in ("k", "rows", "swap_rows"))
            for v in (k, rows, swap):
                if v is not None and (not _is_int(v) or v < 1):  # as `Plan.from_record`'s K
                    raise ValueError(f"{v!r} is not a positive count")
            if k is not None and k > self.max_fanout:
                raise ValueError(f"K {k} is above max_fanout {self.max_fanout}")
            plans = state.get("plans") or []
            if not isinstance(plans, list):
                raise ValueError(f"its passes' records are a {type(plans).__name__}")
            if not p0 <= len(plans) <= p0 + 1:
                raise ValueError(f"{len(plans)} passes recorded, {p0} finished")
            for rec, idx in zip(plans, passes, strict=False):
                Plan.from_record(rec, set(idx), self.max_fanout)
            last = plans[p0] if len(plans) > p0 else None
            saved = {str(g["members"][0]): g for g in last["groups"]} if last else None
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise StateMismatch(f"the saved engine state does not describe this run ({exc}); "
                                "pass --fresh to start over") from None
        self._forced_k, self._rows, self._swap_rows = k, rows, swap
        self._k = k  # saved again as it was, also where no batch is left to size groups
        self._saved_groups, self._saved_pass = saved, last
        return plans[:p0]

    def _saved_plan(self) -> Plan:
        """The resumed pass's plan as its interrupted run recorded it, in this pass's variant
        indices: a pass resumed at its very end runs no batch, so no first-batch check decides
        its plan again (the unchecked plan said traced and fanned where the run had found the
        trace wrong and run untraced, and that went into run.json and the next save)."""
        local = {v: i for i, v in enumerate(self._pass_idx)}
        plan = Plan.from_record(self._saved_pass, set(local), self.max_fanout)
        for g in plan.groups:
            g.members = [local[i] for i in g.members]
        plan.same_as_baseline = [local[i] for i in plan.same_as_baseline]
        return plan

    def _apply_saved(self, plan: Plan) -> None:
        """The resumed pass's fanned groups as the interrupted run left them: their K (an
        out-of-memory back-off lowers it for the rest of the pass) and a fallback to the swap
        path, so the rest of the pass runs the same chunks and run.json says the same."""
        for g in plan.groups if self._saved_groups else ():
            rec = self._saved_groups.get(str(self._pass_idx[g.members[0]]))
            if rec is None or g.fan is None:
                continue
            # a group that fell back is recorded with fan False (`Plan.record`: g.fan is None
            # after the fallback), so its fallback is read before the fan flag
            if rec["fallback"]:
                g.fan, g.fallback = None, rec["fallback"]
            elif rec["fan"]:
                g.kmax = int(rec["kmax"])
