"""The real torchvision models (weights=None) through the engine, against the naive loop.

Session 25 ran every torchvision classification model of at most ~100M parameters through the
Evaluator (fan-out off and on; variants resetting the first, a middle and the last module, a
BatchNorm's statistics alone, two modules jointly, one equal to the live tensors) and compared
counts and logits with the naive loop. The defects it found are minimised here; the models that
are cheap on one CPU thread are run for real at the end.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.models import load_tensors
from tests.engine.test_engine_fuzz2 import _perturb_norms, _unit_keys

# ---- a module whose load reads its state-dict version (torchvision's MNASNet) ---------------


class VersionedNet(nn.Module):
    """As torchvision's MNASNet: `_load_from_state_dict` refuses a state dict whose metadata
    does not carry the module's version ("version should be set to 1 or 2 instead of None")."""

    _version = 2

    def __init__(self, num_classes: int = 10, **_: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class UncopyableVersionedNet(VersionedNet):
    """One `train`'s probe cannot copy: it runs on the model and loads its saved tensors back."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot copy")


def _pairs(n: int = 10, bs: int = 4, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def test_naive_loop_loads_a_versioned_module():
    """naive_evaluate (the reference, and bench's naive loop) loaded each variant with a plain
    dict, which a versioned module refuses: a ValueError traceback on MNASNet. The tensors are
    now loaded with the model's own version metadata, and the counts are the engine's."""
    torch.manual_seed(0)
    model = VersionedNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = [{"conv.weight": torch.randn_like(model.conv.weight)},
                {"fc.weight": torch.randn_like(model.fc.weight), "fc.bias": torch.zeros(10)}]
    batches = _pairs()
    ref = naive_evaluate(model, variants, lambda: batches)
    got = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=4).run(batches)
    assert torch.equal(got.counts[:, [0, 1, 3]], ref[:, [0, 1, 3]])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_tensors_keeps_the_given_metadata_and_strictness():
    model = VersionedNet()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    load_tensors(model, sd)
    assert all(float(v.abs().sum()) == 0 for v in model.state_dict().values())
    old = OrderedDict(sd)
    old._metadata = OrderedDict({"": {"version": 7}})  # the dict's own metadata wins
    with pytest.raises(ValueError, match="instead of 7"):
        load_tensors(model, old)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_tensors(model, {"conv.weight": sd["conv.weight"]})
    load_tensors(model, {"conv.weight": sd["conv.weight"]}, strict=False)


def test_bench_runs_a_versioned_model(capsys):
    """`layerfast bench --arch torchvision.models:mnasnet0_5` ended in the same traceback,
    loading the synthetic final checkpoint, then in the naive loop."""
    from layerfast.cli import main

    rc = main(["bench", "--device", "cpu", "--arch", "tests.engine.test_zoo_s25:VersionedNet",
               "--data", "digits", "--checkpoints", "2", "--seeds", "1", "--max-samples", "64",
               "--no-prefix-only"])
    out = capsys.readouterr()
    assert rc == 0, out.err


@pytest.mark.parametrize("net", ["VersionedNet", "UncopyableVersionedNet"])
def test_train_then_analyze_a_versioned_model(tmp_path, capsys, net):
    """`analyze` loaded the final checkpoint into such a model with a plain dict (the same
    ValueError traceback); `train`'s probe gave an uncopyable model its saved tensors back the
    same way."""
    from layerfast.cli import main

    arch = f"tests.engine.test_zoo_s25:{net}"
    ck, out = tmp_path / "ck", tmp_path / "res"
    assert main(["train", "--arch", arch, "--data", "digits", "--epochs", "1", "--out", str(ck),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert main(["analyze", "--arch", arch, "--data", "digits", "--ckpts", str(ck), "--out",
                 str(out), "--device", "cpu", "--max-samples", "64"]) == 0, capsys.readouterr().err


# ---- the real torchvision models that are cheap on one CPU thread ------------------------------

#: name -> (builder keywords, input side); every one traced, no variant falling back to a full
#: forward but the first module's (which starts at the input anyway), nothing refused fan-out
ZOO = {"resnet18": ({}, 32), "squeezenet1_1": ({}, 32), "shufflenet_v2_x0_5": ({}, 32),
       "mobilenet_v3_small": ({}, 32), "mnasnet0_5": ({}, 32),
       "googlenet": ({"init_weights": True}, 32),
       "efficientnet_b0": ({}, 32)}
ZN, ZBS = 6, 4  # a partial last batch


def _zoo_variants(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Two random draws each of the first, a middle and the last module with tensors of its
    own, of a middle BatchNorm's statistics alone, and of a module and the last jointly; one
    equal to the live tensors."""
    mods = [n for n, _ in model.named_modules() if _unit_keys(model, n)]
    norms = [n for n, m in model.named_modules() if getattr(m, "running_mean", None) is not None]
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)

    def draw(keys):
        return {k: (torch.rand(sd[k].shape, generator=g) + 0.5 if "running_var" in k
                    else torch.randn(sd[k].shape, generator=g) * (sd[k].float().std() + 0.05))
                for k in keys if sd[k].is_floating_point()}

    first, mid, last = mods[0], mods[len(mods) // 2], mods[-1]
    sets = [_unit_keys(model, u) for u in (first, mid, last)]
    if norms:  # not in SqueezeNet
        sets.append([k for k in _unit_keys(model, norms[len(norms) // 2]) if "running" in k])
    sets.append(_unit_keys(model, mods[len(mods) // 4]) + _unit_keys(model, last))
    return [draw(keys) for keys in sets for _ in range(2)] + [{k: sd[k].clone() for k in sets[1]}]


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_model_matches_the_naive_loop(name):
    tvm = pytest.importorskip("torchvision.models")
    kw, side = ZOO[name]
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=10, **kw).eval()
    _perturb_norms(model)
    variants = _zoo_variants(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(ZN, 3, side, side, generator=g), torch.randint(0, 10, (ZN,), generator=g)
    batches = [(x[i:i + ZBS], y[i:i + ZBS]) for i in range(0, ZN, ZBS)]
    ref = []
    for ov in variants:
        m = copy.deepcopy(model)
        load_tensors(m, ov, strict=False)
        with torch.no_grad():
            ref.append(torch.cat([m(xb) for xb, _ in batches]))
    ref = torch.stack(ref)
    counts = naive_evaluate(copy.deepcopy(model), variants, lambda: batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fanout in (False, True):
        got: dict[int, list[torch.Tensor]] = {}

        def hook(rows, logits, got=got):
            for r, lg in zip(rows, logits, strict=True):
                got.setdefault(r, []).append(lg)

        ev = Evaluator(model, variants, device="cpu", precision="fp32", batch_size=ZBS,
                       layout="contiguous", fanout=fanout)
        res = ev.run(batches, on_logits=hook)
        logits = torch.stack([torch.cat(got[i]) for i in range(len(variants))])
        what = f"{name} fanout={fanout}: plan {res.plan}"
        assert res.plan["untraced"] is None, what
        assert sum(len(gr.members) for gr in ev.last_plan.groups if gr.start == 0) == 2, what
        if not fanout:
            assert torch.equal(logits, ref), f"{what}: max |Δlogit| {(logits - ref).abs().max():.3g}"
            assert torch.equal(res.counts[:, [0, 1, 3]], counts[:, [0, 1, 3]]), what
        else:
            assert res.plan["fanned_variants"] == len(variants) - 1, what
            assert res.plan["fanout_fallbacks"] == {}, what
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4 * max(ref.abs().max().item(), 1.0))
            assert int((logits.argmax(-1) != ref.argmax(-1)).sum(-1).max()) <= 1, what
            assert (res.counts[:, [0, 1, 3]] - counts[:, [0, 1, 3]]).abs().max() <= 1, what
        torch.testing.assert_close(res.counts[:, 2], counts[:, 2], rtol=1e-5, atol=1e-3)
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), what
