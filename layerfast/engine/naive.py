"""The naive loop that public reproductions run, kept as the reference and the benchmark baseline:
for each variant, load its weights into the model, make a full pass over the data with a
DataLoader, fp32, and read each batch's counts back to the host with `.item()`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.overrides import prefix_hint
from layerfast.errors import LayerfastError
from layerfast.models import load_tensors
from layerfast.ops import ranks_above


@contextlib.contextmanager
def _given_back(model: nn.Module) -> Iterator[None]:
    """On exit, returned or raised, `model` as it came: each parameter and buffer its own
    tensor object with its own data (so on its own device: `model.to(device)` had left a
    notebook's CPU model on the GPU), each gradient, and each module's own training flag (a
    train-mode model may hold frozen eval-mode BNs, which `model.train(True)` unfroze).

    The parameter objects themselves are put back too: `Module.to` swaps a parameter's data
    where it can (CPU -> CUDA) but replaces the parameter where it cannot (-> meta), and an
    optimizer holds the caller's objects.

    Not `borrow.borrowed`: that also turns in-place activations off and runs under inference
    mode, the engine's conditions; this loop is the reference the engine is checked against,
    and runs the model as a public reproduction does."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(m, k, p, p.data, p.grad) for m in model.modules()
              for k, p in m._parameters.items() if p is not None]
    buffers = [(m, k, b) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    try:
        for _, _, p, _, _ in params:  # `Module.to` would move the grads too, which then could
            p.grad = None             # not be put back beside the parameter's own CPU data
        yield
    finally:
        for m, k, p, data, grad in params:
            m._parameters[k] = p
            p.data, p.grad = data, grad
        for m, k, b in buffers:
            m._buffers[k] = b
        for m, mode in modes:
            m.training = mode


def naive_evaluate(
    model: nn.Module,
    variants: Sequence[Any],
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Return float64 [V, 4] sums (correct@1, correct@5, cross-entropy, agreement with the
    final model's predictions), exactly as `Evaluator` defines them.

    `batches()` yields (x, y) anew for every pass. Ties: argmax takes the first maximal logit;
    correct@5 counts a sample when its label is among the first 5 classes of a stable
    descending sort (`ops.ranks_above`: ties and NaNs ordered as argmax orders them); below 5
    classes it counts correct@1, as `ops.score_` does.

    The model runs on `device` in eval mode and comes back as it came (`_given_back`), also
    when the pass raises: on its own device, each module in its own mode, each variant's keys
    at their own values.
    """
    device = torch.device(device)
    with _given_back(model):
        return _evaluate(model, variants, batches, device)


def _evaluate(model: nn.Module, variants: Sequence[Any],
              batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
              device: torch.device) -> torch.Tensor:
    model.eval().to(device)
    state = {k: v for k, v in model.state_dict(keep_vars=False).items()}
    ref: list[torch.Tensor] = []
    with torch.no_grad():
        # the final model's own casts too: a caller's autocast region may hold casts made
        # before its weights last changed in place (a forward, then a load_state_dict), and
        # the reference predictions read them while every variant, loaded below, reads fresh
        # ones (the final model then disagreed with itself)
        torch.clear_autocast_cache()
        for x, _ in batches():
            # a copy: a forward that writes into its input (`x.mul_(2)`) must not change the
            # batch the next variant reads, as the engine's cached input is never changed
            ref.append(model(x.to(device, copy=True)).argmax(1).cpu())
        out = torch.zeros(len(variants), 4, dtype=torch.float64)
        for i, v in enumerate(variants):
            ov = v if isinstance(v, dict) else v.overrides()
            unknown = [k for k in ov if k not in state]
            if unknown:  # refused as `Evaluator` refuses them (was a bare KeyError)
                raise LayerfastError(f"variant {i} does not fit the model: unknown keys "
                                     f"{unknown[:10]}{prefix_hint(unknown, state)}")
            saved = {k: state[k].clone() for k in ov}
            try:  # on the CPU the variant is loaded into the caller's own tensors
                load_tensors(model, ov, strict=False)
                # Under a caller's autocast (a bf16 reference) and outside inference_mode
                # (no_grad, as here, included), autocast keeps the low-precision casts of leaf
                # parameters for the whole region: after this in-place load every forward would
                # still read the casts made before it.
                torch.clear_autocast_cache()
                for j, (x, y) in enumerate(batches()):
                    x, y = x.to(device, copy=True), y.to(device)
                    logits = model(x).float()
                    pred = logits.argmax(1)
                    out[i, 0] += (pred == y).sum().item()
                    label_logit = logits.gather(1, y[:, None])
                    above = ranks_above(logits, label_logit.squeeze(1), y)
                    top5 = above.sum(1) < 5 if logits.shape[1] >= 5 else pred == y
                    out[i, 1] += top5.sum().item()
                    out[i, 2] += F.cross_entropy(logits, y, reduction="sum").double().item()
                    out[i, 3] += (pred.cpu() == ref[j]).sum().item()
            finally:
                load_tensors(model, saved, strict=False)
                torch.clear_autocast_cache()
    return out
