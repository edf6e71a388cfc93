"""What the checkpoints an analysis reads store their floating tensors in, and a warning when
that is coarser than what the model holds (run.json's `checkpoint_dtypes`)."""

from __future__ import annotations

from typing import Any

import torch

from layerfast.errors import warn


def _listed(names: list[str], more: str) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} {more}" if len(names) > 3 else "")


def stored_dtypes(ck: Any, model: torch.nn.Module, taus: list[int]) -> dict[str, str]:
    """τ label -> the dtype the checkpoint stores its floating weights in ("float16", or
    "bfloat16+float32" for a mix), for each checkpoint the run reads (the final model, θ⁰ and
    `taus`), from metadata only. A tensor stored coarser than the model's own tensor of that
    key is analysed as stored: cast up, its rounding stays in every row (baseline included),
    so it is said once; without it, run.json could not tell a float16 file's results from a
    float32 one's.

    Compared per tensor, with the dtype of the model tensor it loads into: a model that mixes
    bfloat16 and float32 tensors was said to cast everything to "the model's float32" (its
    widest dtype), untrue of its bfloat16 tensors, which a bfloat16 file feeds as they are."""
    read = sorted({ck.final, *taus, *({0} & set(ck.labels))})
    live = {k: v.dtype for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    stored = {t: ck.key_dtypes(t) for t in read}
    narrow: dict[str, set[str]] = {}  # key -> the coarser dtypes it is stored in
    files = []
    for t, dtypes in stored.items():
        coarse = {k: d for k, d in dtypes.items()
                  if k in live and isinstance(dt := getattr(torch, d, None), torch.dtype)
                  and dt.is_floating_point
                  and torch.finfo(dt).eps > torch.finfo(live[k]).eps}  # fmt: skip
        if coarse:
            files.append(ck.files[t].name)
        for k, d in coarse.items():
            narrow.setdefault(k, set()).add(d)
    if narrow:
        names = sorted({d for ds in narrow.values() for d in ds})
        targets = sorted({str(live[k]).removeprefix("torch.") for k in narrow})
        to = targets[0] if len(targets) == 1 else f"dtypes ({', '.join(targets)})"
        keys = [k for k in live if k in narrow]  # in the model's order
        which = "" if len(keys) == len(live) else (
            f" that the model holds in {'/'.join(targets)} ({len(keys)} of its {len(live)} "
            f"floating tensors: {_listed(keys, 'more')})")
        warn(f"{_listed(files, 'more')} store{'s' if len(files) == 1 else ''} weights in "
             f"{'/'.join(names)}{which}: they are analysed as stored (rounded), cast to the "
             f"model's {to}; run.json's checkpoint_dtypes says which file holds what")
    return {str(t): "+".join(sorted(set(ds.values()))) for t, ds in stored.items()}
