"""`layerfast bench` on a model built in bfloat16, float16 or float64 (review s23, the CPU bf16
mode). `analyze` runs such a model's own forward (`precision.for_model`); bench's naive loop fed
it float32 batches and died in its warm-up with torch's "Input type (float) and bias type
(c10::BFloat16) should be the same" traceback (exit 1) before anything was timed. The naive loop
now feeds the model's own dtype, as the engine does, and the figures say what math ran."""

from __future__ import annotations

import pytest
import torch

import layerfast.bench as bench
from tests.cli import test_bench_audit as _audit

_args, quick = _audit._args, _audit.quick

FACTORY = """
import torch
from torch import nn

def make(num_classes, in_shape):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * h * w, num_classes)).to(torch.{dtype})
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_bench_times_a_model_in_its_own_dtype(dtype, tmp_path, monkeypatch, capsys, quick):
    (tmp_path / f"narrow_{dtype}.py").write_text(FACTORY.format(dtype=dtype))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = bench.run(_args("--arch", f"narrow_{dtype}:make", "--naive-variants", "3",
                          "--precision", "bf16"))
    assert out["precision"] == "fp32" and out["model_dtype"] == dtype
    # the same forward on the same inputs: at most the near-tie the host's normalisation flips
    assert max(out["agreement_with_naive"]["max_abs_diff_correct1"].values()) <= 1
    monkeypatch.setattr(bench, "run", lambda args: out)
    assert bench.main(_args()) == 0
    text = capsys.readouterr().out
    assert f"cpu, fp32 on a {dtype} model" in text.splitlines()[0]
    assert f"DataLoader pass at B=32, all the samples (256 asked), fp32 on a {dtype} model," in text


def test_naive_pass_feeds_the_models_dtype():
    """The naive loop's inputs are the model's dtype (float32 normalisation, float64 for a
    float64 model), as the engine's `to_device`: the same batches for both."""
    from layerfast.data import open_data

    src = open_data("digits", split="test", max_samples=8, split_flag=False)
    seen: list[torch.dtype] = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).to(torch.bfloat16)
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    bench.naive_pass(model, [], src, torch.device("cpu"), 8, warmup=True)
    assert seen == [torch.bfloat16]
