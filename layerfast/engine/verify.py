"""Does the traced program compute what the model's own forward does? (DESIGN.md §7)

fx records one path through Python: a branch on `isinstance(h, torch.Tensor)` or
`hasattr(out, "logits")` sees a Proxy while tracing and a tensor when run, and a getattr on a
module's output is recorded blindly; such a program computes another function (a wrong number)
or fails where the forward does not. The Evaluator compares the two on the first batch
(`Evaluator._verified`, in engine/firstbatch.py) and runs the model untraced when they differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerfast.engine.graph import Program, eager_inplace
from layerfast.engine.precision import precision_context
from layerfast.engine.tracing import _MODULE_SLOTS, _contents, _refill, _same, _tensorish

_OOM = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)

#: Samples of the first batch on which the traced program is checked against the forward.
VERIFY_SAMPLES = 64

#: How `trace_differs` begins its reason when the forward differs from itself.
NOT_DETERMINISTIC = "the model's forward is not deterministic in eval mode"

#: How `trace_differs` begins its reason when the forward caches tensors derived from weights.
WEIGHT_CACHE = "the forward caches tensors on its modules on its first call "


def trace_differs(
    model: nn.Module, prog: Program, x: torch.Tensor, device: torch.device
) -> str | None | bool:
    """Compare `prog` with `model`'s own forward on `x`, in fp32: None (the same), why not, or
    False when the model's own forward fails (the pass then reports that). Out of memory in
    either forward is raised, not taken as a verdict: the caller backs off."""
    with precision_context("fp32", device):
        slots = _slots(model)
        try:
            with eager_inplace(model):
                ref = model(x.clone())
        except _OOM:
            raise
        except Exception:  # noqa: BLE001 - the model itself fails: the pass says so
            return False
        cached = _filled_on_first_call(model, x, slots) if prog.traced else []
        if cached:
            return (f"{WEIGHT_CACHE}"
                    f"({', '.join(cached[:3])}{', ...' if len(cached) > 3 else ''}) and reuses "
                    "them after, where the traced program, recorded with them empty, "
                    "recomputes them from the live weights for every variant")[:300]
        try:
            got = prog.run(x.clone())
        except _OOM:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not the forward"
            return f"the traced program raised {type(exc).__name__}: {exc}"[:300]
        why = differs(got, ref, device)
        if why is None:
            return None
        # The program may be right and the forward random (`F.dropout(x, training=True)`, a
        # noise layer) or stateful (a buffer it updates): then its counts change from run to
        # run, and blaming the trace (with "the results are exact") misled.
        return _random_forward(model, x, device, ref) or why


def _slots(model: nn.Module) -> dict[tuple[str, str], tuple[Any, list | None]]:
    """(module name, attribute) -> (its value, a dict's or list's items) for every plain
    attribute of every module before a call (`_filled_on_first_call`: one absent here, another
    object after, or a dict or list with other items after, and holding a tensor, was set by
    the call). The items are kept because a cache is as often a container the module made empty
    in `__init__` and fills in place (`self.cache = {}`) as an attribute that was None."""
    return {(n, k): (v, _contents(v) if isinstance(v, dict | list) else None)
            for n, m in model.named_modules() for k, v in vars(m).items()
            if k not in _MODULE_SLOTS}


def _set_by_call(v: Any, was: tuple[Any, list | None] | None) -> bool:
    """Whether a plain attribute now `v`, `was` before a call (None: absent), was made to hold
    a tensor by the call."""
    if not _tensorish(v):
        return False
    if was is None or v is not was[0]:
        return True
    return was[1] is not None and not _same(_contents(v), was[1])


def _filled_on_first_call(model: nn.Module, x: torch.Tensor,
                          before: dict[tuple[str, str], tuple[Any, list | None]]) -> list[str]:
    """The plain attributes (`name.attr`) the forward's call just filled with tensors (set
    where they were absent, None or another object, or a dict/list given other items), and
    which a second call leaves the very same (object and items): a cache filled on first use
    (`if self.wc is None: self.wc = self.a.weight * 1.0`, `self.cache["w"] = ...` into a dict
    made in `__init__`). fx traced the forward with the cache empty (`Program` is made before
    any call of the pass), so its program recomputes it from the live weights for every
    variant, while the model's own forward — the naive loop, the user's own code — reuses what
    its first call stored, and the counts of the variants of the weights it derives from
    differ. An activation stored on every call (`self.feat = h`) is a new object after the
    second call: not a cache, and the model stays traced."""
    filled = {(n, k): (v, _contents(v) if isinstance(v, dict | list) else None)
              for n, m in model.named_modules() for k, v in vars(m).items()
              if k not in _MODULE_SLOTS and _set_by_call(v, before.get((n, k)))}
    if not filled:
        return []
    try:
        with eager_inplace(model):
            model(x.clone())
    except _OOM:  # no verdict: the trace check backs off to fewer samples and asks again
        raise
    except Exception:  # noqa: BLE001 - the model fails: no verdict, the pass says so
        return []
    mods = dict(model.named_modules())
    kept = {nk: (v, items) for nk, (v, items) in filled.items()
            if getattr(mods[nk[0]], nk[1], None) is v
            and (items is None or _same(_contents(v), items))}
    return [f"{n}.{k}" if n else k for n, k in _from_weights(model, x, kept, before, mods)]


def _from_weights(model: nn.Module, x: torch.Tensor,
                  caches: dict[tuple[str, str], tuple[Any, list | None]],
                  before: dict[tuple[str, str], tuple[Any, list | None]],
                  mods: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """Those of `caches` (filled by the first call: value and items) whose values depend on
    the parameters: emptied as they were, the forward run once more with every parameter
    changed, and compared. A table of the input's shape (positional, rotary from a buffer, a
    mask) is the same and harmless: the program recomputes the same values for every variant.
    The parameters and the caches come back as they were after the first call."""
    if not caches:
        return []
    params = [p.data for p in model.parameters() if p.is_floating_point()]
    # on the host: a model larger than half the GPU ran out of memory here, and the trace
    # check's back-off then ran it untraced ("even on one sample")
    saved = [t.to("cpu", copy=True) for t in params]
    out: list[tuple[str, str]] = []
    try:
        with torch.no_grad():
            for t in params:
                t.mul_(0.5).add_(0.25)
        for (n, k) in caches:
            was = before.get((n, k))
            if was is None:
                delattr(mods[n], k)
            else:
                object.__setattr__(mods[n], k, was[0])
                _refill(was[0], was[1])
        with eager_inplace(model):
            model(x.clone())
        for (n, k), (v, items) in caches.items():
            first = v  # what the first call stored (a container's items: it was refilled)
            if items is not None:
                first = dict(items) if isinstance(v, dict) else [x for _, x in items]
            if not _same_cached_values(getattr(mods[n], k, None), first):
                out.append((n, k))
    except _OOM:  # no verdict: the trace check backs off (the finally puts all back first)
        raise
    except Exception:  # noqa: BLE001 - the model fails: no verdict, the pass goes on
        out = []
    finally:
        with torch.no_grad():
            for t, v in zip(params, saved, strict=True):
                t.copy_(v)
        for (n, k), (v, items) in caches.items():
            object.__setattr__(mods[n], k, v)
            _refill(v, items)
    return out


def _same_cached_values(a: Any, b: Any) -> bool:
    """Whether two cached values (tensors, or containers of them) hold the same values."""
    from torch.utils._pytree import tree_flatten

    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for u, v in zip(la, lb, strict=True):
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
            if u.shape != v.shape or not torch.equal(u, v):
                return False
        elif isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            return False
    return True


def random_forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> str | None:
    """Why the model's forward is not a function of its input (two calls on `x` differ), or
    None. For a model fx cannot trace, whose run is otherwise called exact: the traced
    model's check (`trace_differs`) asks the same when its program differs."""
    with precision_context("fp32", device):
        try:
            with eager_inplace(model):
                ref = model(x.clone())
        except Exception:  # noqa: BLE001 - the model fails, or out of memory: the pass says so
            return None
        return _random_forward(model, x, device, ref)


def _random_forward(model: nn.Module, x: torch.Tensor, device: torch.device,
                    ref: Any) -> str | None:
    try:
        with eager_inplace(model):
            again = model(x.clone())
    except Exception:  # noqa: BLE001 - out of memory too: no verdict
        return None
    if differs(again, ref, device) is None:
        return None
    return (f"{NOT_DETERMINISTIC}: two calls on the same samples differ (a random op such as "
            "F.dropout(x, training=True), or state the forward updates)")


def differs(got: Any, ref: Any, device: torch.device) -> str | None:
    """Why the traced program's output `got` is not the forward's `ref` (None: it is)."""
    if not isinstance(ref, torch.Tensor):
        return None if not isinstance(got, torch.Tensor) else "the forward returns no tensor"
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
        return "the traced program's output is not the forward's (type, shape or dtype)"
    if not ref.is_floating_point():
        same = bool(torch.equal(got, ref))
    elif device.type == "cpu":  # bit for bit, NaN where the forward has NaN
        same = bool(((got == ref) | (got.isnan() & ref.isnan())).all())
    else:
        same = _close(got, ref, floor=0.0)
    if same:
        return None
    d = (got.float() - ref.float()).abs().nan_to_num(float("inf")).max().item()
    return f"the traced program's logits differ from the forward's (max |diff| {d:.3g})"


def unbatched_cuts(
    prog: Program, x: torch.Tensor, device: torch.device, report: dict | None = None
) -> set[int]:
    """The cuts a variant may not start from, found by running the program on 8 samples taken
    from `x` and on the first 4 of them (a batch of fewer than 8 is repeated: one sample alone
    cannot tell [1, B, ...] from [B, ...]; 3 of them when 2 or 4 samples repeat; on a failure
    or an out-of-memory, on the next smaller size):

    - cuts whose value does not hold the batch in dim 0 (a sequence-first LSTM's input,
      `x.transpose(0, 1)`, an `unsqueeze(0)`): a variant started there would have its batch
      cut along another dim, and be scored against other labels;
    - cuts whose rows on 4 samples are not, to rounding, the first rows on 8 (`cat([q, p])` of
      a batch's halves): a back-off that cuts the batch would score them against others.

    Where the logits themselves differ that way, the model mixes samples (batch statistics,
    attention over dim 0) and `report["mixes_samples"]` is set: no back-off may cut its
    batches ("unknown" from a batch of one sample, which cannot show it). With no run at all,
    no cut counts as proven; `report["checked"]` is how many sizes ran. An untraced program
    has no cut but the input, and is checked for mixing all the same."""
    n = int(x.shape[0])
    if n == 0:  # nothing to tell from: the caller checks a later batch
        if report is not None:
            report["checked"] = 0
        return set()
    xs = x[:8] if n >= 8 else x[torch.arange(8, device=x.device) % n]
    # A later size must not hold the same samples in the same proportions as the first: from
    # a batch of 2 (or 4) repeated, 4 rows are the 8 rows' samples again, and a batch mean or
    # swapped halves would look the same (3 rows are not); and from a batch of fewer than 8,
    # one size must hold fewer distinct samples (a batch max over the same samples is equal).
    planned = [8, 3 if n in (2, 4) else 4]
    if 2 <= n < 8 and min(4, n - 1) not in planned:
        planned.append(min(4, n - 1))
    sizes = planned + [m for m in (4, 2, 1) if m not in planned]
    bad: set[int] = set()
    prev: dict[int, Any] | None = None
    checked = 0
    with precision_context("fp32", device), torch.no_grad():
        for m in sizes:
            if checked == len(planned):
                break
            cache: dict[int, Any] = {}
            try:
                out = prog.run(xs[:m].clone(), 0, keep=set(prog.cuts), saved=cache)
            except Exception:  # noqa: BLE001 - out of memory too: no verdict from this size
                continue
            checked += 1
            for c in prog.cuts:
                if c == 0:  # the input itself: a batch is [B, ...] by the data's contract
                    continue
                t = cache.get(c)
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != m:
                    bad.add(c)
                elif prev is not None and not _same_rows(t, prev.get(c)):
                    bad.add(c)
            if prev is not None and report is not None and not _same_rows(out, prev[-1]):
                report["mixes_samples"] = True
            prev = {**cache, -1: out}  # `prog.run` keeps copies where steps write in place
    if report is not None:
        report["checked"] = checked
        if n == 1:  # every row is the one sample: mixing cannot show; assume it
            report["mixes_samples"] = report.get("mixes_samples", False) or "unknown"
    return bad if checked else set(prog.cuts)


def _same_rows(t: Any, ref: Any) -> bool:
    """Whether `t` is, to rounding, the first rows of `ref` (True when either is no tensor)."""
    if not isinstance(t, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return True
    r = ref[: t.shape[0]] if ref.dim() else ref
    if r.shape != t.shape:
        return False
    if not t.is_floating_point():
        return bool(torch.equal(r, t))
    return _close(t, r, floor=1e-7)


def _close(t: torch.Tensor, r: torch.Tensor, floor: float) -> bool:
    """`t` equals `r` to rounding: |t - r| <= 1e-4·|r| + 1e-5·scale + `floor`, infinities and
    NaNs where `r` has the same. Rounding scales with the magnitude of the terms a layer sums,
    not with one feature's own values: an output near 0 (by cancellation, or a ReLU's) rounds
    like the largest values of its tensor. So `scale` is the tensor's largest |r| leaving out
    outliers, values beyond 1e4 times the median nonzero |r| (a class or attention mask at
    finfo.min or -1e9, which made a tolerance every finite difference passed, hiding a model
    that mixes samples or a traced program that is not the forward); an outlier's own feature
    (its largest |r| over the rows) is its scale. Judged per feature alone, a registry
    resnet's cuts failed on plain float32 rounding of another conv algorithm (cuDNN picks one
    per batch size), so cuts were dropped and the model could be taken for one that mixes."""
    a, b = t.float(), r.float()
    mag = b.abs().nan_to_num(0.0, posinf=0.0)
    scale = mag.amax(0, keepdim=True) if b.dim() and b.shape[0] else mag
    # the median from at most ~65k evenly strided values: a cut of a 224² ResNet holds
    # millions, and a full median there took ~0.3 s per cut on the CPU
    flat = mag.flatten()
    sample = flat[:: max(1, flat.numel() // 65536)]
    nonzero = sample[sample > 0]
    if nonzero.numel():
        cap = 1e4 * float(nonzero.median())
        scale = scale.clamp(min=float(torch.where(mag <= cap, mag, 0.0).amax()))
    close = (a - b).abs() <= 1e-4 * b.abs() + 1e-5 * scale + floor
    return bool((close | (a == b) | (a.isnan() & b.isnan())).all())
