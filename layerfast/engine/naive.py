"""The naive loop that public reproductions run, kept as the reference and the benchmark baseline:
for each variant, load its weights into the model, make a full pass over the data with a
DataLoader, fp32, and read each batch's counts back to the host with `.item()`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.ops import ranks_above


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
    """
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    state = {k: v for k, v in model.state_dict(keep_vars=False).items()}
    ref: list[torch.Tensor] = []
    with torch.no_grad():
        for x, _ in batches():
            # a copy: a forward that writes into its input (`x.mul_(2)`) must not change the
            # batch the next variant reads, as the engine's cached input is never changed
            ref.append(model(x.to(device, copy=True)).argmax(1).cpu())
        out = torch.zeros(len(variants), 4, dtype=torch.float64)
        for i, v in enumerate(variants):
            ov = v if isinstance(v, dict) else v.overrides()
            saved = {k: state[k].clone() for k in ov}
            model.load_state_dict(ov, strict=False)
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
            model.load_state_dict(saved, strict=False)
    model.train(was_training)
    return out
