"""The plan: which cut each variant starts from, which variants run fanned together, and how
many at once fit in memory (DESIGN.md §7.2–7.3)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from layerfast.engine.fanout import FanPlan, prove_fan
from layerfast.engine.graph import Program
from layerfast.engine.verify import NOT_DETERMINISTIC, WEIGHT_CACHE
from layerfast.errors import warn


@dataclass
class Group:
    """Variants that start at one cut and override the same modules."""

    start: int
    members: list[int]  # variant indices
    fan: FanPlan | None  # None: each member runs alone, weights swapped in place
    kmax: int = 1  # variants per fanned chunk (set by the memory planner, lowered on OOM)
    stacks: dict[tuple[int, int], dict] = field(default_factory=dict)  # chunk -> weight stacks
    fallback: str | None = None  # why a fanned run failed and the group went to the swap path
    #: why the plan did not fan this group (fan-out on, several members): the proof's first
    #: failing step, or the whole-model rule; None when it fans or fan-out was not asked for
    refused: str | None = None


@dataclass
class Plan:
    groups: list[Group]
    same_as_baseline: list[int]  # variants whose overrides no step reads
    cuts: list[int]  # cuts whose baseline activation is kept
    #: why the model runs untraced (one opaque step, or a plain Sequential's children): every
    #: variant then runs the whole forward; None when fx traced it
    untraced: str | None = None

    def summary(self) -> dict:
        fanned = sum(len(g.members) for g in self.groups if g.fan is not None)
        swapped = sum(len(g.members) for g in self.groups if g.fan is None)
        return {
            "groups": len(self.groups),
            "cuts_kept": len(self.cuts),
            "fanned_variants": fanned,
            "swapped_variants": swapped,
            "baseline_equal_variants": len(self.same_as_baseline),
            # keyed by start step, where several groups can start (a unit and a joint reset
            # from it): the smallest K of them, the one an out-of-memory back-off lowered
            "kmax": _smallest((str(g.start), g.kmax) for g in self.groups if g.fan is not None),
            # a fanned run that raised (not out of memory): results stay right, speed is lost,
            # and the proof in engine.fanout missed something worth reporting; joined like the
            # refusals, or one group's reason would overwrite another's at the same start
            "fanout_fallbacks": _joined((str(g.start), g.fallback) for g in self.groups
                                        if g.fallback),
            # why a group was never fanned (the proof refused it): the swapped variants' reason,
            # keyed like the fallbacks by start step; groups sharing a start join theirs
            "fanout_refused": _joined((str(g.start), g.refused) for g in self.groups
                                      if g.refused),
            "untraced": self.untraced,
        }

    def remapped(self, idx: list[int]) -> Plan:
        """This plan with variant i renamed idx[i] (a pass's plan in the whole run's indices);
        without the weight stacks, which belong to the pass."""
        return Plan(
            [replace(g, members=[idx[i] for i in g.members], stacks={}) for g in self.groups],
            [idx[i] for i in self.same_as_baseline],
            list(self.cuts),
            self.untraced,
        )

    def record(self) -> dict:
        """What `summary` reads, as JSON (a resume store saves it with each segment): a pass
        finished before an interrupt is not run again by the rerun, and its groups, K and
        fallbacks must still be in the merged plan run.json reports."""
        return {
            "groups": [{"start": g.start, "members": list(g.members), "fan": g.fan is not None,
                        "kmax": g.kmax, "fallback": g.fallback, "refused": g.refused}
                       for g in self.groups],
            "same_as_baseline": list(self.same_as_baseline),
            "cuts": list(self.cuts),
            "untraced": self.untraced,
        }

    @staticmethod
    def from_record(rec: dict, variants: Collection[int], max_fanout: int) -> Plan:
        """The plan a `record` describes, for its summary only: a fanned group gets an empty
        FanPlan (the pass it belongs to is over and never runs from it).

        Raises ValueError where `rec` is not what `record` writes for a pass of `variants`
        under `max_fanout` (a damaged or edited resume store): the resumed pass runs its
        groups' K, and a K of 0 crashed it, a negative one ran as a reported fallback, and
        other types went into run.json as they were."""
        if not isinstance(rec, dict):
            raise ValueError(f"a pass's record is a {type(rec).__name__}")
        groups, same, cuts = (_list(rec, k) for k in ("groups", "same_as_baseline", "cuts"))
        out = []
        for g in groups:
            if not isinstance(g, dict):
                raise ValueError(f"a group's record is a {type(g).__name__}")
            members = _list(g, "members")
            if not members or not all(_is_int(i) and i in variants for i in members):
                raise ValueError(f"group members {members!r} are not variants of this pass")
            start, kmax, fan = g.get("start"), g.get("kmax"), g.get("fan")
            if not _is_int(start) or start < 0:
                raise ValueError(f"group start {start!r} is not a step")
            if not _is_int(kmax) or not 1 <= kmax <= max_fanout:
                raise ValueError(f"group K {kmax!r} is not in 1..{max_fanout}")
            if not isinstance(fan, bool):
                raise ValueError(f"group fan {fan!r} is not true or false")
            fallback, refused = _text(g, "fallback"), _text(g, "refused")
            out.append(Group(start, list(members),
                             FanPlan(start, [], set(), set()) if fan else None,
                             kmax=kmax, fallback=fallback, refused=refused))
        if not all(_is_int(i) and i in variants for i in same):
            raise ValueError(f"baseline-equal variants {same!r} are not variants of this pass")
        if not all(_is_int(c) and c >= 0 for c in cuts):
            raise ValueError(f"cuts {cuts!r} are not steps")
        return Plan(out, list(same), list(cuts), _text(rec, "untraced"))

    @staticmethod
    def merged(plans: list[Plan]) -> Plan:
        """The plans of several passes as one (groups and baseline-equal variants of all)."""
        return Plan(
            [g for p in plans for g in p.groups],
            sorted(i for p in plans for i in p.same_as_baseline),
            sorted({c for p in plans for c in p.cuts}),
            next((p.untraced for p in plans if p.untraced), None),
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(rec: dict, key: str) -> list:
    """`rec[key]`, a list (`Plan.from_record`)."""
    v = rec.get(key)
    if not isinstance(v, list):
        raise ValueError(f"{key!r} is {'missing' if v is None else f'a {type(v).__name__}'}")
    return v


def _text(rec: dict, key: str) -> str | None:
    """`rec[key]`, a string or None (`Plan.from_record`)."""
    v = rec.get(key)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{key!r} is a {type(v).__name__}, not text")
    return v


def _joined(pairs) -> dict[str, str]:
    """key -> reasons, several for one key joined by "; " (two groups can share a start)."""
    out: dict[str, str] = {}
    for k, why in pairs:
        out[k] = f"{out[k]}; {why}" if k in out else why
    return out


def _smallest(pairs) -> dict[str, int]:
    """key -> the smallest of its values (two groups can share a start)."""
    out: dict[str, int] = {}
    for k, v in pairs:
        out[k] = min(out[k], v) if k in out else v
    return out


def _named(mods: frozenset[Any]) -> str:
    """A group's overridden modules as a refusal names them (the first few). A step's target
    is a module's name, or, for an opaque function step (`torch.fx.wrap`, or one made opaque
    by `Program.unseen_effects`), the function itself: named by its `__name__`."""
    names = sorted(m if isinstance(m, str) and m else "<model>" if not m
                   else getattr(m, "__name__", repr(m)) for m in mods)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def warn_plan(summary: dict) -> None:
    """Warnings when `summary` (an evaluation's plan) says the run was slower than planned:
    the model ran untraced, or running out of memory cut its forwards to fewer samples.

    The results stand; the speed a user came for does not (untraced, every variant ran the
    whole forward), and a `layerfast bench` figure then times something else than the plan.
    Said by both `analyze` and `bench`, in one wording, so that one grep finds it in either."""
    why = summary.get("untraced")
    if why:
        warn(f"the model ran untraced ({why}): every variant ran the whole forward, "
             "with no prefix sharing or fan-out, so the pass was as slow as the naive loop; "
             + ("its results change from run to run, and a resumed run is not the same run"
                if str(why).startswith(NOT_DETERMINISTIC) else
                "the results are the model's own forward's, which reuses the tensors its "
                "first call cached: a reset of the weights they were computed from does not "
                "reach them, so those units' rows do not measure their resets"
                if str(why).startswith(WEIGHT_CACHE) else "the results are exact"))
    rows, swap = summary.get("rows_after_oom"), summary.get("swap_rows_after_oom")
    if rows or swap:
        what = [f"every batch in pieces of {rows} samples"] if rows else []
        what += [f"swapped variants {swap} samples at a time"] if swap else []
        warn(f"the device ran out of memory, so the rest of the run ran {' and '.join(what)}: "
             "slower than planned, with the same counts; free memory on the device or pass a "
             "smaller --batch-size")


def make_plan(prog: Program, keysets: list[set[str]], fanout: bool, max_fanout: int) -> Plan:
    by_key: dict[tuple[int, frozenset[str]], list[int]] = defaultdict(list)
    same: list[int] = []
    for i, keys in enumerate(keysets):
        start = prog.start_cut(keys) if keys else None
        if start is None:
            same.append(i)
            continue
        mods = frozenset(
            prog.steps[j].target
            for j in range(start + 1, len(prog.steps))
            if prog.steps[j].keys & keys
        )
        by_key[(start, mods)].append(i)
    stateful = {s.target for s in prog.steps if s.op == "call_module" and s.keys}
    groups: list[Group] = []
    for (start, mods), members in sorted(by_key.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
        union: set[str] = set().union(*(keysets[i] for i in members))
        # Whole-model variants (fullmodel) share nothing with the baseline: fanning them buys
        # only a bigger batch and costs bit-exactness, so they take the swap path. Not only
        # from step 0: after a first step without parameters (fcn3x256's Flatten, an input
        # normalization) they start at step 1, and share only that step with the baseline.
        whole = mods >= stateful and (start == 0 or bool(stateful))
        fan: FanPlan | None = None
        refused = None
        if fanout and len(members) > 1:
            got = ("whole-model variants take the swap path (fanning buys only a bigger batch)"
                   if whole else prove_fan(prog, start, union))
            if isinstance(got, FanPlan):
                fan = got
            else:
                refused = f"{_named(mods)}: {got}"
        groups.append(Group(start, members, fan, kmax=max_fanout if fan else 1, refused=refused))
    cuts = sorted({g.start for g in groups if g.start > 0})
    return Plan(groups, same, cuts, None if prog.traced else prog.trace_error)


def memory_budget(device: torch.device, fraction: float) -> int:
    """Bytes the fanned suffix may use: a fraction of the device's TOTAL memory (GPU memory, or
    RAM capped at 8 GiB). Total, not free: the same machine then always picks the same K, so a
    resumed run adds the same fanned logits as an uninterrupted one; a GPU that is busier than
    planned is handled by the OOM back-off."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total * fraction)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(total * fraction, 8 << 30))


B_MIN = 32  # below this, per-batch overheads dominate whatever the model
B_MAX_CUDA = 4096  # the largest batch the planner picks on a GPU (see `choose_batch`)
B_CPU = 1000  # CPU default and ceiling
CPU_TENSOR_CAP = 8 << 20  # CPU: bytes of the largest activation of one batch (see choose_batch)


def choose_batch(
    kept: float, peak: float, k: int, budget: int, upper: int, tensor_cap: float | None = None
) -> int:
    """B, samples per batch, when the caller did not fix it (DESIGN.md §7.3).

    One batch holds, per sample, every kept cut activation (`kept` bytes) plus a fanned suffix of
    K variants whose largest activation is `peak` bytes (×4: input, output and two temporaries
    alive at once, as in `choose_kmax`). B is the largest of `upper`, then powers of two below
    it, whose need B·(kept + 4·peak·k) fits `budget`; at least `B_MIN`. `k` is the largest fanned
    group (capped), so every group then also fits whole: the planner prefers one batch that
    carries every variant of a unit over a bigger batch that needs several chunks.
    Why large B at all on a GPU: small models (an FCN, VGG at 32²) launch a few kernels per
    variant and batch, so samples per launch, not FLOPs, set their speed.

    `tensor_cap` (the CPU): also keep the largest activation of one batch, B·peak·k bytes,
    under the cap. On the CPU big batches lose: every tensor over glibc's mmap threshold is
    fresh pages, faulted in and zeroed on each allocation, and falls out of cache. Measured on
    2 cores, ResNet-20 at 28-32², prefix sharing: B=1000 (64 MB activations) 67-71 s, B=128
    (8 MB) 32-55 s, B=64 54 s, B=32 63 s for the same 78 variants × 1000 images.
    """
    need = max(kept + 4 * peak * max(k, 1), 1.0)
    big = max(peak * max(k, 1), 1.0)
    b = upper
    while b > B_MIN and (b * need > budget or (tensor_cap is not None and b * big > tensor_cap)):
        b = 1 << ((b - 1).bit_length() - 1)  # the next power of two below b
    return max(B_MIN, min(b, upper))


def choose_kmax(per_sample_bytes: float, batch: int, budget: int, cap: int) -> int:
    """K such that K·B samples of suffix activations fit the budget (at least 1)."""
    need = max(per_sample_bytes, 1.0) * batch
    return int(max(1, min(cap, budget // need)))


# ---- passes: how many variants are staged at once ---------------------------------------

STAGE_MODEL_MULTIPLE = 8  # staged variant tensors per pass: at most this many model sizes...
STAGE_MIN_BYTES = 1 << 30  # ...or this many bytes, whichever is larger


def stage_limit(model_bytes: int) -> int:
    """Bytes of variant tensors one pass may stage. Every variant's tensors stay staged for its
    whole pass (that is what lets one data pass serve them all), so the limit keeps memory
    bounded by the model's size times a constant, not by the number of checkpoints (DESIGN §2).
    A per-unit study stages (checkpoints + seeds) model sizes: ResNet-50's 126 block variants
    are 0.7 GB, one pass; a 100-checkpoint study becomes several passes over the data."""
    return max(STAGE_MODEL_MULTIPLE * model_bytes, STAGE_MIN_BYTES)


def split_passes(keysets: list[frozenset[str]], sizes: list[int], limit: int) -> list[list[int]]:
    """Variant indices, in passes whose staged bytes (`sizes`) stay within `limit` (a variant
    larger than the limit gets a pass of its own). Variants overriding the same keys (a unit's)
    form a group, and a group that fits within the limit is never split: it goes whole into
    the first pass with room for it (first fit, in variant order), else into a new one. So a
    unit's variants fan out as one group whatever the split, and the results are those of one
    pass, bit for bit. Only a group larger than the limit itself is cut: its variants go, in
    order, into the pass the previous one went to while it has room, else into the first with
    room (or a new one). Within a pass indices ascend. One pass holding every variant when all
    fit."""
    if sum(sizes) <= limit:
        return [list(range(len(sizes)))]
    by_keys: dict[frozenset[str], list[int]] = defaultdict(list)
    for i, keys in enumerate(keysets):
        by_keys[keys].append(i)
    passes: list[list[int]] = []
    used: list[int] = []

    def first_fit(need: int) -> int:
        """The first pass with `need` bytes of room, a new one if none has."""
        j = next((j for j, u in enumerate(used) if u + need <= limit), len(passes))
        if j == len(passes):
            passes.append([])
            used.append(0)
        return j

    for members in by_keys.values():
        group = sum(sizes[i] for i in members)
        if group <= limit:
            j = first_fit(group)
            passes[j] += members
            used[j] += group
            continue
        j = None  # too big for any pass: cut, each piece as long as its pass allows
        for i in members:
            if j is None or used[j] + sizes[i] > limit:
                j = first_fit(sizes[i])
            passes[j].append(i)
            used[j] += sizes[i]
    return [sorted(p) for p in passes]
