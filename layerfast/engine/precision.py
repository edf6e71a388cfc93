"""Precision modes (DESIGN.md §7.6): fp32 reproduces the naive loop; tf32 and bf16 trade exactness
for speed on CUDA. The chosen mode is recorded with the results."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from layerfast.errors import LayerfastError, warn

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


@contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype is float32 for the block, the caller's put back after. layerfast's
    fp32 is documented whatever a notebook set earlier: under `torch.set_default_dtype(
    torch.float64)` a registry model was built in float64, so `train` saved float64 checkpoints
    and `analyze` ran every variant in float64 (its rerandom draws made in float64, other
    numbers than the fp32 run) while run.json said fp32. A factory that builds float64 itself
    (`.double()`) still gets float64 (`models.input_dtype`)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def parse_device(device: str | torch.device) -> torch.device | None:
    """`device` as a torch.device (None for auto), refused unless it names the CPU or CUDA.
    Only the name: a dry run (`--list-units`) checks this much, and leaves whether the GPU is
    there to the run (a command for a GPU machine can be dry-run on a laptop)."""
    if str(device) == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise LayerfastError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_device(device: str | torch.device) -> torch.device:
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerfastError(f"--device {dev} was asked for, but torch sees no CUDA GPU here")
    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.index is not None and dev.type == "cuda" and dev.index >= n:
        # else "invalid device ordinal" from deep inside the first allocation, exit 1
        raise LayerfastError(
            f"--device {device}: torch sees {n} CUDA GPU{'s' if n != 1 else ''} here "
            f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})"
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA (with channels_last) and fp32 elsewhere; tf32 off CUDA is fp32."""
    if precision not in PRECISIONS:
        raise LayerfastError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":  # recorded as what ran, and said
        warn(f"precision tf32 (TensorFloat-32 matmuls and convolutions) is a CUDA mode: on "
             f"{device.type} it runs, and is recorded, as fp32")
        return "fp32"
    return precision


def model_dtype(model: torch.nn.Module) -> str:
    """The floating dtypes the model's parameters and buffers hold, torch's names joined by `+`
    ("float32", "float16", "float16+float32"; "float32" when it holds none): what an fp32 pass
    computes in, since no mode casts the model (run.json's `model_dtype`)."""
    names = sorted({str(t.dtype).removeprefix("torch.")
                    for t in (*model.parameters(), *model.buffers()) if t.dtype.is_floating_point})
    return "+".join(names) or "float32"


def widest_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's most precise floating dtype (float32 when it holds none). A checkpoint's
    rounding is judged per tensor, against the model tensor each loads into
    (`checkpoints.stored.stored_dtypes`), not against this. `model_dtype` names every dtype."""
    wide = [t.dtype for t in (*model.parameters(), *model.buffers()) if t.dtype.is_floating_point]
    return min(wide, key=lambda d: torch.finfo(d).eps, default=torch.float32)


#: Floating dtypes narrower than float32: a model built in them computes in them in every mode.
_NARROW = (torch.float16, torch.bfloat16)


def for_model(precision: str, asked: str, model: torch.nn.Module) -> str:
    """`precision` (resolved) as it runs on `model`. bf16 autocast and TF32 are float32 modes:
    on a model holding no float32 tensor they run its own forward instead, recorded as what ran
    (`fp32`, as for tf32 off CUDA), with a warning unless `asked` was `auto`.

    A float64 model's forward is bit for bit the fp32 mode's under either (recorded as asked,
    such a run said bf16 while nothing ran in bf16). A float16 or bfloat16 model (a factory
    returning `.half()`) is not cast: autocast turned its float16 convolutions into bfloat16
    and BatchNorm then failed on its float16 parameters ("mixed dtype"), an error that blamed
    the model, not the mode. Casting it to float32 would evaluate another model than the one
    the factory built, so it runs its own forward in every mode, said with a warning (the
    `fp32` recorded is then not float32 math: `model_dtype` in run.json says what it was)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers())
              if t.dtype.is_floating_point}
    if not dtypes or torch.float32 in dtypes:
        return precision
    names = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    if not dtypes & set(_NARROW):  # float64 only
        if precision in ("bf16", "tf32") and asked != "auto":
            warn(f"precision {precision} changes float32 math only: this model's tensors are "
                 f"all {names}, so it runs, and is recorded, as fp32 (its own {names} forward)")
        return "fp32" if precision in ("bf16", "tf32") else precision
    mode = (f"precision {precision} is a float32 mode: " if precision in ("bf16", "tf32")
            and asked != "auto" else "")
    warn(f"{mode}this model's tensors are all {names} and layerfast does not cast them: it "
         f"runs its own {names} forward, recorded as fp32 (run.json's model_dtype says "
         f"{model_dtype(model)})")
    return "fp32"


def _legacy_flags() -> tuple[str, bool, bool] | None:
    """The caller's legacy settings (float32 matmul precision, cuBLAS and cuDNN `allow_tf32`),
    or None where torch (2.9+) refuses to read them: the caller set some backend through the
    per-backend `fp32_precision` API, and a legacy read of a mixed state raises."""
    try:
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def _onednn_backends() -> tuple:
    """oneDNN's (the CPU's) matmul, conv and RNN backends, those this torch has."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return tuple(getattr(mkldnn, n, None) for n in ("matmul", "conv", "rnn"))


def _fp32_backends() -> list:
    """The backends whose per-backend `fp32_precision` this torch has (none before 2.9), the
    first three being the CUDA ones the modes set: cuBLAS matmul, cuDNN conv and RNN; then
    oneDNN's, which every mode sets to full float32 (`tf32_allowed`)."""
    cands = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
             *_onednn_backends())
    found = []
    for b in cands:
        try:
            if b is not None and hasattr(b, "fp32_precision"):
                found.append(b)
        except RuntimeError:
            pass
    return found


@contextmanager
def tf32_allowed(tf32: bool, cudnn: bool = True) -> Iterator[None]:
    """TF32 on or off for CUDA matmuls (and cuDNN convolutions and RNNs unless `cudnn` is
    False) inside the block, oneDNN's CPU matmuls, convolutions and RNNs in full float32, and
    every precision setting of the caller's back exactly after.

    Through the legacy `allow_tf32` flags only, this broke callers of torch 2.9+: reading a
    legacy flag raises once the caller set the backend through the per-backend
    `fp32_precision` API (`torch.backends.cuda.matmul.fp32_precision = "tf32"`, which torch
    recommends), so every pass failed; and restoring `allow_tf32` turned a caller's
    `set_float32_matmul_precision("medium")` into a mixed state in which
    `torch.get_float32_matmul_precision()` raised. Now the block uses the API the caller's
    state can be read by (legacy code run inside, torch.compile's included, can still read
    the legacy flags), and the exit restores both the legacy precision and each backend's
    `fp32_precision` as they were."""
    backends = _fp32_backends()
    saved_new = [b.fp32_precision for b in backends]
    legacy = _legacy_flags()
    try:
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            if cudnn:
                torch.backends.cudnn.allow_tf32 = tf32
                # torch 2.9+'s legacy `allow_tf32 = False` sets conv and RNN to "none"
                # (inherit), so a caller's cuDNN-wide or global "tf32" would still apply; name
                # the mode explicitly (the legacy flags stay readable: conv, RNN and the legacy
                # bit then agree).
                for b in backends[1:3]:
                    b.fp32_precision = "tf32" if tf32 else "ieee"
        else:  # only on a torch with the new API: the legacy read raised
            for b in backends[: 3 if cudnn else 1]:
                b.fp32_precision = "tf32" if tf32 else "ieee"
        # The CPU's float32 math is full float32 in every mode (TF32 is a CUDA mode, and bf16
        # is autocast's casts): a caller's `set_float32_matmul_precision("medium")` otherwise
        # let oneDNN run an fp32 pass's matmuls in bf16 on CPUs with AMX or AVX512-BF16,
        # recorded as fp32. Setting oneDNN's own backends keeps the legacy flags readable.
        cpu = _onednn_backends()
        for b in backends:
            if any(b is c for c in cpu):
                b.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            # sets cuBLAS's allow_tf32 too; "medium" kept, which allow_tf32 = True is not
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[2]
        for b, v in zip(backends, saved_new, strict=True):
            b.fp32_precision = v


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Set matmul/conv math for the mode and restore the caller's settings afterwards.

    fp32 and tf32 switch autocast OFF for the device rather than leaving it alone: a caller
    evaluating inside its own `torch.autocast` (an eval in a mixed-precision training loop)
    otherwise got a bf16 or float16 pass recorded as fp32."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast(device.type, enabled=False)
    )
    with tf32_allowed(precision in ("tf32", "bf16")), autocast:
        yield


LAYOUTS = ("auto", "contiguous", "channels_last")


def channels_last(precision: str, device: torch.device, layout: str = "auto") -> bool:
    """Whether 4-D activations run in channels_last. `auto`: on CUDA with bf16/tf32 (tensor
    cores want NHWC), else not — so fp32 keeps the naive loop's layout and its exact bits.
    `channels_last` forces it anywhere: on the CPU it ran conv nets ~1.6-2.4× faster (oneDNN,
    measured, docs/engine.md), with logits that differ from the contiguous ones in the last
    bits (max |Δlogit| ~7e-6 on a trained ResNet-20), like fan-out."""
    if layout not in LAYOUTS:
        raise LayerfastError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        return device.type == "cuda" and precision in ("bf16", "tf32")
    return layout == "channels_last"
