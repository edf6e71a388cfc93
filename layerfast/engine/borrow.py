"""The user's model, borrowed for a pass: placed on the device in eval mode, and given back
exactly as it came.

`Evaluator` runs someone else's `nn.Module`: a researcher's model that may be in train mode,
hold gradients, live on another device, be referenced by an optimizer. The pass needs it on the
device, in eval mode, in channels_last where the precision wants it, with in-place activations
off (graph.no_inplace_modules) and under inference mode; afterwards, whether the pass returned
or raised, nothing of that may show.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from layerfast.engine.graph import attributes_kept, no_inplace_modules


def lazy_names(model: nn.Module) -> list[str]:
    """The state names of `model`'s uninitialized lazy tensors (`nn.LazyLinear` before its
    first forward): a pass would materialise them and `borrowed` put the empty tensors back,
    so `Evaluator` refuses such a model."""
    from torch.nn.parameter import is_lazy

    return [k for k, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)]


def _snapshottable(t: torch.Tensor) -> bool:
    """Only a strided tensor off the meta device gets a snapshot: `torch.equal` has no sparse
    or meta kernel, and its raising in `borrowed`'s exit failed a finished pass and left the
    rest of the model unrestored (in eval mode)."""
    return t.layout == torch.strided and not t.is_meta


def _snapshot(b: torch.Tensor) -> torch.Tensor | None:
    """A buffer's values before the pass, to put back what the pass wrote (None where
    `_snapshottable` says no)."""
    return b.detach().clone() if _snapshottable(b) else None


def _own_storage(now: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether the tensor a parameter holds during the pass (`now`, after the move to the
    device and layout) is its own tensor `data`, sharing its storage: the pass then writes
    into the caller's bytes. A moved or converted copy is given back unread (`p.data = data`)."""
    try:
        return now.device == data.device and \
            now.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - no storage to tell by (a tensor subclass): assume own
        return True


def _param_snapshot(t: torch.Tensor) -> torch.Tensor | None:
    """A parameter's values before the pass, on the host (a model already on the GPU spends
    no device memory on it); None where `_snapshottable` says no."""
    return t.detach().to("cpu", copy=True) if _snapshottable(t) else None


@contextlib.contextmanager
def borrowed(model: nn.Module, device: torch.device, channels_last: bool) -> Iterator[None]:
    """The model in eval mode on `device` (channels_last when asked), in-place activations
    off, inference mode; on exit everything exactly as it came: each parameter's and buffer's
    own tensor object (so its device, layout and any outside reference are untouched — moving
    back would make new tensors, and a model already in channels_last would come back
    contiguous), each module's own training flag (a train-mode model may hold frozen
    eval-mode BNs), and the tensors modules hold as plain attributes (a hook's, such as
    pruning's `weight`).

    Buffers come back with their values too: a forward may write into one in place even in
    eval mode (a call counter, a custom layer's running mean), and on the CPU the pass runs on
    the model's own tensors, so the user's model came back changed and a second run on it
    started from other state and gave other counts. They are copied before the pass (buffers
    are a small part of a model) and written back where the pass changed them.

    So are the parameters the pass runs on in place (those the move to `device` and the
    layout left in their own tensors: all of them on the CPU): a forward can write into one in
    eval mode too (`nn.Embedding(max_norm=...)` renormalises the rows it looks up,
    `self.weight.data.clamp_(...)`, a scale updated under `no_grad`), and the user's model came
    back with those writes. Their copy is kept on the host, one model's size, for the pass."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.data, p.grad) for p in model.parameters()]
    buffers = [
        (m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    values = [_snapshot(b) for _, _, b in buffers]
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (own tensor, its values before)
    model.eval()
    try:
        # Gradients stay where they are, off the model while it runs: `Module.to` would move
        # each one by replacing the saved grad's own data (CPU -> CUDA, or to channels_last),
        # and restoring a CPU parameter with its now-CUDA grad raises halfway through.
        for p, _, _ in params:
            p.grad = None
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        for p, data, _ in params:
            v = _param_snapshot(data) if _own_storage(p.data, data) else None
            if v is not None:
                kept.append((data, v))
        with no_inplace_modules(model), attributes_kept(list(model.modules())), \
                torch.inference_mode():
            yield
    finally:
        for p, data, grad in params:
            p.data, p.grad = data, grad
        for data, v in kept:
            if not torch.equal(data, v.to(data.device)):
                with torch.inference_mode(data.is_inference()), torch.no_grad():
                    data.copy_(v)
        for (m, name, b), v in zip(buffers, values, strict=True):
            m._buffers[name] = b
            # a NaN compares unequal, so it copies the same bits back: harmless
            if v is not None and not torch.equal(b, v):
                with torch.inference_mode(b.is_inference()), torch.no_grad():
                    b.copy_(v)
        for m, mode in modes:
            m.training = mode
