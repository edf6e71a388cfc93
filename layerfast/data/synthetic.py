"""`synthetic:imagenet[:N]` and `synthetic:cifar[:N]`: random uint8 images for benchmarks.

Images are generated lazily, in fixed blocks of 64 samples, each block from its own PCG64
stream seeded by `SeedSequence([seed, block])`, so memory stays at one batch and sample i is
the same bytes whatever the batch size or `start`. PCG64's raw stream (`random_raw`) is frozen
by NumPy's compatibility policy, unlike `Generator` methods, so the data is stable across
NumPy releases. Labels come from a separate stream so `labels()` never touches images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from layerfast.data.source import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSource,
    check_max_samples,
    make_source,
)
from layerfast.errors import LayerfastError

KINDS: dict[str, tuple[tuple[int, int, int], int, tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "cifar": ((3, 32, 32), 10, CIFAR10_MEAN, CIFAR10_STD),
}
DEFAULT_N = 10000
#: Largest sample count. The n labels are materialised (8 bytes each, by the analysis as well),
#: so 10**9 is 8 GB of labels alone and, at ImageNet size, 150 TB of images to evaluate: far
#: past any benchmark, while numbers beyond it used to fail deep inside NumPy.
MAX_N = 10**9
BLOCK = 64
SEEDS = {"test": 0, "train": 1}
_LABEL_STREAM = 2**32 - 1  # block ids are < 2**32, so the label stream never collides


def _raw(seed: int, stream: int, nbytes: int) -> np.ndarray:
    bits = np.random.PCG64(np.random.SeedSequence([seed, stream]))
    return bits.random_raw((nbytes + 7) // 8).view(np.uint8)[:nbytes]


class SyntheticReader:
    def __init__(self, shape: tuple[int, int, int], num_classes: int, n: int, seed: int) -> None:
        self.shape, self.num_classes, self.n, self.seed = shape, num_classes, n, seed
        raw = _raw(seed, _LABEL_STREAM, 8 * n).view(np.uint64)
        # in place and reinterpreted (every value < num_classes < 2**63): 8 bytes a label at
        # the peak, not 24 (a modulo copy and an astype copy), 8 GB at MAX_N instead of 24
        np.remainder(raw, np.uint64(num_classes), out=raw)
        self.y = torch.from_numpy(raw.view(np.int64))

    def _block(self, b: int) -> np.ndarray:
        size = int(np.prod(self.shape))
        count = min(BLOCK, self.n - b * BLOCK)
        return _raw(self.seed, b, count * size).reshape(count, *self.shape)

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        cache: tuple[int, np.ndarray] | None = None
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            x = np.empty((j - i, *self.shape), dtype=np.uint8)
            k = i
            while k < j:
                b = k // BLOCK
                if cache is None or cache[0] != b:
                    cache = (b, self._block(b))
                lo = k - b * BLOCK
                take = min(j - k, BLOCK - lo)
                x[k - i : k - i + take] = cache[1][lo : lo + take]
                k += take
            yield torch.from_numpy(x), self.y[i:j]

    def labels(self, stop: int) -> Tensor:
        return self.y[:stop].clone()


def open_synthetic(arg: str, split: str, max_samples: int | None) -> DataSource:
    kind, _, count = arg.partition(":")
    if kind not in KINDS:
        raise LayerfastError(
            f"synthetic: unknown kind {kind!r}; use synthetic:imagenet[:N] or synthetic:cifar[:N]"
        )
    try:
        n = int(count) if count else DEFAULT_N
    except ValueError:
        raise LayerfastError(f"synthetic: sample count {count!r} is not an integer") from None
    if n < 1:
        raise LayerfastError(f"synthetic: sample count must be positive, got {n}")
    if n > MAX_N:
        raise LayerfastError(
            f"synthetic: sample count {n} is too large; the limit is {MAX_N:,} "
            "(use --max-samples for a quick run)"
        )
    check_max_samples(max_samples)
    if max_samples is not None and max_samples < n:
        n_read = max_samples  # the labels of samples that are never read are never drawn
    else:
        n_read = n
    shape, k, mean, std = KINDS[kind]
    return make_source(
        f"synthetic:{kind}", SyntheticReader(shape, k, n_read, SEEDS[split]), total=n,
        num_classes=k, shape=shape, mean=mean, std=std, scale=255.0, max_samples=max_samples,
    )  # fmt: skip
