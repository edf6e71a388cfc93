"""Engine benchmarks: layerfast vs the naive loop (and prefix sharing alone), same variants, same
data, same run (`pytest benchmarks/bench_engine.py --benchmark-enable`).

Each case calls `layerfast.bench.run`, which times all approaches side by side and stores the
figures in the benchmark's `extra_info` (seconds, variant·images/s, speedup vs naive), and
fails if any approach's correct@1 is further from the naive loop's than bench's bound (one
near-tie in fp32 on the CPU; 0.5% of the samples in bf16/TF32 or on CUDA). The CUDA cases are
the ones BENCHMARKS.md reports for issue 4; they skip without a GPU. The test suite collects
this file too and runs each case once, untimed (the CPU ones are marked slow).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from layerfast.bench import add_arguments, run
from layerfast.data.idx import FASHION_MNIST_DIR

STAGED = Path(".data/fashion-mnist")  # what scripts/gpu_session.sh carries to a GPU machine


def _fashion_mnist() -> str:
    """The Fashion-MNIST spec: Debian's copy, or the one staged for a GPU machine; else skip."""
    if Path(FASHION_MNIST_DIR).is_dir():
        return "fashion-mnist"
    if STAGED.is_dir():
        return f"fashion-mnist:{STAGED}"
    pytest.skip("no Fashion-MNIST (apt-get install dataset-fashion-mnist, or stage .data/)")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _bench(benchmark, *argv: str) -> dict:
    out: dict = {}

    def once() -> None:
        out.update(run(_args(*argv)))

    benchmark.pedantic(once, rounds=1, iterations=1)
    # with --naive-variants the naive seconds are k variants' time × V/k: keep k and which
    # ones, or the stored figure cannot be told from a measurement of all V
    keys = ("variants", "n", "device", "precision", "channels_last", "seconds",
            "variant_images_per_s", "speedup_vs_naive", "naive_scaled", "naive_timed_variants",
            "naive_timed", "naive_batch_size", "layerfast_plan", "layerfast_phases",
            "layerfast_probes", "floor", "times_floor", "agreement_with_naive")
    benchmark.extra_info.update({k: out[k] for k in keys if k in out})
    print(f"\n{argv}: {out['seconds']} speedup {out['speedup_vs_naive']}")
    # a speed figure counts only if every approach computed what the naive loop did
    agree = out["agreement_with_naive"]
    assert agree["variants"] > 0
    assert max(agree["max_abs_diff_correct1"].values()) <= agree["bound"], agree
    return out


@pytest.mark.slow
def test_cpu_fcn_synthetic(benchmark):
    _bench(benchmark, "--arch", "fcn3x256", "--data", "synthetic:cifar", "--max-samples", "2000",
           "--device", "cpu")


@pytest.mark.slow
def test_cpu_fcn_fashion_mnist(benchmark):
    _bench(benchmark, "--arch", "fcn3x256", "--data", _fashion_mnist(), "--device", "cpu",
           "--precision", "fp32")


@pytest.mark.cuda
def test_cuda_resnet50_block(benchmark):
    """Issue 4's headline: 18 units × (5 checkpoints + 2 re-randomizations) = 126 variants, plus
    the baseline: `variants` says 127 (19 of them scored from the baseline's logits)."""
    _bench(benchmark, "--arch", "resnet50", "--data", "synthetic:imagenet", "--granularity",
           "block", "--checkpoints", "5", "--seeds", "2", "--naive-variants", "4")


@pytest.mark.cuda
def test_cuda_resnet50_layer(benchmark):
    _bench(benchmark, "--arch", "resnet50", "--data", "synthetic:imagenet", "--granularity",
           "layer", "--checkpoints", "5", "--seeds", "2", "--naive-variants", "4")


@pytest.mark.cuda
def test_cuda_vgg11_cifar(benchmark):
    _bench(benchmark, "--arch", "vgg11_cifar", "--data", "synthetic:cifar", "--naive-variants", "8")


@pytest.mark.cuda
def test_cuda_fcn(benchmark):
    _bench(benchmark, "--arch", "fcn3x256", "--data", _fashion_mnist(), "--naive-variants", "8")
