"""Second engine fuzz (after the 28 models of tests/engine/test_engine.py and test_engine_edges.py):
model families those did not cover — depthwise/grouped convs with SE blocks and Hardswish
(MobileNet v2/v3), DenseNet concatenation, ShuffleNet's channel shuffle, SqueezeNet's fire
concat, EfficientNet's StochasticDepth and SiLU, a small ViT (class token on the root,
MultiheadAttention, LayerNorm), nn.Embedding on integer inputs derived from x, GRU/LSTM heads,
GroupNorm/InstanceNorm with running stats, a buffer used arithmetically, interpolate + einsum,
pool-then-flatten vs mean, a module called twice, a BatchNorm on the input, Conv1d/BatchNorm1d,
the batch size read arithmetically, and tuple/dict outputs.

Each case runs the Evaluator with fan-out off and on, with `stage_bytes` small enough to force
several passes, a batch size that does not divide N, and variant kinds: random draws of one
module's tensors (first, middle, last module), a BatchNorm's running statistics alone, two
modules jointly, and an override equal to the live tensors. Counts and logits are compared with
the naive loop (a deep copy per variant, `load_state_dict(strict=False)`, full forward): bit
for bit on the swap path, to fp32 rounding (at most one near-tie flip) fanned; the model's
state, tensor objects and training flags must come back unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import Evaluator, naive_evaluate
from layerfast.engine.fanout import fan_plan
from layerfast.engine.graph import Program
from layerfast.errors import LayerfastError

N, BS = 50, 16  # a partial last batch
SHAPE = (3, 32, 32)


# ---- models --------------------------------------------------------------------------------


class EmbedNet(nn.Module):
    """nn.Embedding on integer indices computed from the image, beside a conv branch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 + 8, 10)

    def forward(self, x):
        idx = (x[:, 0, :4, :4].flatten(1).clamp(-1.99, 1.99) * 4 + 8).long()
        e = self.emb(idx).mean(1)
        h = F.relu(self.conv(x))
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)
        return self.fc(torch.cat([h, e], 1))


class RNNHead(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(8 * 16, 16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))  # [B, 8, 16, 16]
        out, _ = self.rnn(h.permute(0, 2, 1, 3).flatten(2))  # a sequence of 16 rows
        return self.fc(out[:, -1])


class NormNet(nn.Module):
    """GroupNorm, InstanceNorm with running stats (eval: uses them), InstanceNorm without."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm2 = nn.InstanceNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.inorm(self.c2(x)))
        x = F.relu(self.inorm2(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BufArith(nn.Module):
    """Buffers (root-level) used arithmetically in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.register_buffer("shift", torch.zeros(8))
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.c1(x)) * self.scale
        h = F.relu(self.c2(h)) + self.shift.view(1, -1, 1, 1)
        return self.fc(h.mean(dim=(2, 3)))


class InterpEinsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.interpolate(F.relu(self.c2(h)), scale_factor=2, mode="bilinear", align_corners=False)
        h = F.relu(self.c3(self.up(h)))
        a = torch.einsum("bchw,bdhw->bcd", h, h) / h.shape[-1]
        v = torch.einsum("bcd,dk->bck", a, self.proj.weight)  # a weight read functionally too
        return self.fc(v.mean(1) + self.proj(h.mean(dim=(2, 3))))


class PoolVsMean(nn.Module):
    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.mean = mean
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        h = h.mean(dim=(2, 3)) if self.mean else torch.flatten(self.pool(h), 1)
        return self.fc(h)


class SizeScaled(nn.Module):
    """The batch size read arithmetically after the overridden conv: `h.size(0)` is B in the
    model's forward but K·B on a fanned K·B batch (found by this fuzz)."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.c(x)), 4)
        return self.fc(h.view(h.size(0), -1)) * (16.0 / h.size(self.dim))


class Siamese(nn.Module):
    """One overridden conv+BN called twice (on x and on a flipped x), the two paths added."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.c(x))) + F.relu(self.bn(self.c(x.flip(3))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class InputBN(nn.Module):
    """A BatchNorm straight on the input: its overrides start at cut 0, before any conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.c = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c(self.bn0(x))), 1).flatten(1))


class TextCNN(nn.Module):
    """Conv1d/BatchNorm1d on fold form (one grouped), a residual, Linear -> BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm1d(8)
        self.l1 = nn.Linear(8, 16, bias=False)
        self.bnl = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x.flatten(2))))
        h = F.relu(self.bn2(self.c2(h))) + h
        return self.fc(F.relu(self.bnl(self.l1(h.amax(2))), inplace=True))


class BadOutput(nn.Module):
    """An output that is not logits [batch, classes]: a tuple or dict, logits pooled over the
    batch (one row for any batch), no classes, or integer class indices."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        z = self.fc(F.relu(self.c(x)).mean(dim=(2, 3)))
        return {
            "tuple": lambda: (z, z.sum(1)),
            "dict": lambda: {"out": z},
            "pooled": lambda: z.mean(0, keepdim=True),
            "empty": lambda: z[:, :0],
            "int": lambda: z.argmax(1, keepdim=True),
        }[self.kind]()


def _build(name: str):
    """(model, units drawn at random, BNs whose running stats alone are drawn, joint pair)."""
    tvm = pytest.importorskip("torchvision.models")
    from torchvision.models.densenet import DenseNet
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return (tvm.mobilenet_v2(num_classes=10, width_mult=0.25),
                ["features.0.0", "features.2.conv.1.0", "features.5.conv.0.0", "classifier.1"],
                ["features.0.1"], ["features.0.0", "classifier.1"])
    if name == "mobilenet_v3_small":  # SE blocks (own pooling, multiply), Hardswish
        return (tvm.mobilenet_v3_small(num_classes=10, width_mult=0.25),
                ["features.0.0", "features.1.block.1.fc1", "features.4.block.0.0",
                 "features.4.block.2.fc2", "classifier.3"],
                ["features.1.block.0.1"], ["features.0.0", "classifier.3"])
    if name == "densenet":
        return (DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10),
                ["features.conv0", "features.denseblock1.denselayer1.conv1",
                 "features.denseblock1.denselayer2.conv2", "features.transition1.conv", "classifier"],
                ["features.norm0", "features.denseblock2.denselayer1.norm1", "features.norm5"],
                ["features.conv0", "classifier"])
    if name == "shufflenet_v2":
        return (ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10),
                ["conv1.0", "stage2.0.branch1.0", "stage2.0.branch2.0", "stage3.0.branch2.3",
                 "conv5.0", "fc"], ["conv1.1"], ["conv1.0", "fc"])
    if name == "squeezenet":
        return (tvm.squeezenet1_1(num_classes=10),
                ["features.0", "features.3.squeeze", "features.3.expand1x1", "features.4.expand3x3",
                 "classifier.1"], [], ["features.0", "classifier.1"])
    if name == "efficientnet":  # b0's blocks (MBConv, SE, SiLU, StochasticDepth), fewer stages
        cfg = [MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(6, 3, 2, 8, 16, 2),
               MBConvConfig(6, 5, 2, 16, 24, 1)]
        return (EfficientNet(cfg, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10,
                             last_channel=64),
                ["features.0.0", "features.1.0.block.1.fc1", "features.2.0.block.0.0",
                 "features.2.1.block.3.0", "classifier.1"],
                ["features.2.1.block.3.1"], ["features.0.0", "classifier.1"])
    if name == "vit":
        return (VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=32, mlp_dim=64, num_classes=10),
                ["", "conv_proj", "encoder", "encoder.layers.encoder_layer_0.ln_1",
                 "encoder.layers.encoder_layer_0.self_attention",
                 "encoder.layers.encoder_layer_1.mlp.0", "encoder.ln", "heads.head"],
                [], ["conv_proj", "heads.head"])
    if name == "embedding":
        return EmbedNet(), ["emb", "conv", "fc"], [], ["emb", "fc"]
    if name in ("gru", "lstm"):
        return RNNHead(name), ["conv", "rnn", "fc"], ["bn"], ["conv", "fc"]
    if name == "norms":
        return NormNet(), ["c1", "gn", "c2", "inorm", "c3", "fc"], ["inorm"], ["c1", "fc"]
    if name == "buffer_arith":
        return BufArith(), ["c1", "", "c2", "fc"], [], ["c1", "fc"]
    if name == "interp_einsum":
        return InterpEinsum(), ["c1", "c2", "c3", "proj", "fc"], [], ["c1", "fc"]
    if name in ("pool_flatten", "mean"):
        return PoolVsMean(name == "mean"), ["c1", "bn", "c2", "fc"], ["bn"], ["c1", "fc"]
    if name == "size_scaled":
        return SizeScaled(), ["c", "fc"], [], ["c", "fc"]
    if name == "size_scaled_dim1":
        return SizeScaled(1), ["c", "fc"], [], ["c", "fc"]
    if name == "siamese":
        return Siamese(), ["c", "bn", "fc"], ["bn"], ["c", "bn"]
    if name == "input_bn":
        return InputBN(), ["bn0", "c", "fc"], ["bn0"], ["bn0", "fc"]
    if name == "conv1d_bn1d":
        return TextCNN(), ["c1", "bn1", "c2", "l1", "bnl", "fc"], ["bn2", "bnl"], ["c1", "c2"]
    raise KeyError(name)


# ---- helpers ------------------------------------------------------------------------------


def _data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _perturb_norms(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _unit_keys(model: nn.Module, name: str) -> list[str]:
    m = model.get_submodule(name)
    own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    return [f"{name}.{k}" if name else k for k, _ in own]


def _variants(model: nn.Module, units: list[str], bns: list[str], joint: list[str] | None,
              K: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)

    def draw(keys):
        return {k: (torch.rand(sd[k].shape, generator=g) + 0.5 if "running_var" in k
                    else torch.randn(sd[k].shape, generator=g) * (sd[k].float().std().nan_to_num(0) + 0.05))
                for k in keys if sd[k].is_floating_point()}

    out = [draw(_unit_keys(model, u)) for u in units for _ in range(K)]
    out += [draw([k for k in _unit_keys(model, b) if "running" in k]) for b in bns for _ in range(K)]
    if joint:
        out += [draw([k for u in joint for k in _unit_keys(model, u)]) for _ in range(K)]
    out.append({k: sd[k].clone() for k in _unit_keys(model, units[0])})  # equal to the live ones
    return out


def _naive(model: nn.Module, variants: list[dict], x: torch.Tensor) -> torch.Tensor:
    out = []
    for ov in variants:
        m = copy.deepcopy(model).eval()
        m.load_state_dict(ov, strict=False)
        with torch.no_grad():
            out.append(torch.cat([m(x[i:i + BS]) for i in range(0, len(x), BS)]))
    return torch.stack(out)


def _batches(x, y):
    return [(x[i:i + BS], y[i:i + BS]) for i in range(0, len(x), BS)]


def _engine(model: nn.Module, variants: list[dict], x, y, **kw):
    got: dict[int, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits, strict=True):
            got.setdefault(r, []).append(lg)

    kw = {"device": "cpu", "precision": "fp32", "batch_size": BS, "layout": "contiguous", **kw}
    res = Evaluator(model, variants, **kw).run(_batches(x, y), on_logits=hook)
    return res, torch.stack([torch.cat(got[i]) for i in range(len(variants))])


def _fuzz(name: str, fanned_at_least: int = 0) -> None:
    model, units, bns, joint = _build(name)
    _perturb_norms(model)
    variants = _variants(model, units, bns, joint)
    x, y = _data()
    ref = _naive(model, variants, x)
    counts = naive_evaluate(copy.deepcopy(model), variants, lambda: _batches(x, y))
    model.train()  # the engine must hand the flags back as they came
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objs = dict(model.state_dict(keep_vars=True))
    staged = sum(t.numel() * t.element_size() for v in variants for t in v.values())
    for fanout, stage in ((False, staged // 3), (True, staged // 3), (True, None)):
        res, got = _engine(model, variants, x, y, fanout=fanout, stage_bytes=stage)
        what = f"{name} fanout={fanout} stage={stage}: plan {res.plan}"
        assert res.n == N, what
        if stage is not None:
            assert res.plan["passes"] > 1, what
        if not fanout:
            assert torch.equal(got, ref), f"{what}: max |Δlogit| {(got - ref).abs().max():.3g}"
            assert torch.equal(res.counts[:, [0, 1, 3]], counts[:, [0, 1, 3]]), what
        else:
            dlogit = (got - ref).abs().max().item()
            assert dlogit <= 1e-4 * max(ref.abs().max().item(), 1.0), f"{what}: max |Δlogit| {dlogit:.3g}"
            assert int((got.argmax(-1) != ref.argmax(-1)).sum(-1).max()) <= 1, what
            assert (res.counts[:, [0, 1, 3]] - counts[:, [0, 1, 3]]).abs().max() <= 1, what
            assert res.plan["fanout_fallbacks"] == {}, what  # the proof refused, nothing raised
            if stage is None:
                assert res.plan["fanned_variants"] >= fanned_at_least, what
        torch.testing.assert_close(res.counts[:, 2], counts[:, 2], rtol=1e-5, atol=1e-3)
        after = model.state_dict(keep_vars=True)
        for k, t in before.items():
            assert torch.equal(t, after[k]) and after[k] is objs[k], f"{what}: {k} changed"
        assert [m.training for m in model.modules()] == flags, what


# ---- the fuzz cases ----------------------------------------------------------------------------

# name -> variants at least fanned with fan-out on and every variant in one pass (what the proof
# admits today; fewer would be a silent loss of speed, not of correctness)
CASES = {"densenet": 10, "squeezenet": 10, "vit": 2, "embedding": 2, "gru": 2, "lstm": 2,
        "norms": 10, "buffer_arith": 2, "interp_einsum": 2, "pool_flatten": 10, "mean": 2,
        "size_scaled": 0, "size_scaled_dim1": 4, "shufflenet_v2": 2, "efficientnet": 2,
        "mobilenet_v2": 10, "mobilenet_v3_small": 10, "siamese": 10, "input_bn": 10,
        "conv1d_bn1d": 8}


@pytest.mark.parametrize("name", list(CASES))
def test_fuzz_family_matches_naive(name):
    _fuzz(name, CASES[name])


# ---- defects this fuzz found ------------------------------------------------------------------


def test_batch_size_read_arithmetically_is_not_fanned():
    """`y * (16 / h.size(0))` after the overridden conv: on a fanned K·B batch size(0) is K·B, so
    the fanned logits were scaled by 1/K (max |Δlogit| 5 on this model, no error raised). The
    proof now admits `size(0)` of a fanned value only as the batch entry of a view/reshape."""
    model = SizeScaled()
    prog = Program(model)
    keys = {"c.weight", "c.bias"}
    assert fan_plan(prog, prog.start_cut(keys), keys) is None
    _fuzz("size_scaled")


def test_size_of_a_non_batch_dim_still_fans():
    model = SizeScaled(dim=1)
    prog = Program(model)
    keys = {"c.weight", "c.bias"}
    assert fan_plan(prog, prog.start_cut(keys), keys) is not None


# ---- refused by design ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_or_dict_output_is_one_clear_error(kind):
    """docs/engine.md: the model must return logits [batch, classes]; anything else is one
    LayerfastError, and the model comes back untouched."""
    model = BadOutput(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(20)
    variants = [{"c.weight": torch.randn_like(model.c.weight)}] * 2
    for fanout in (False, True):
        with pytest.raises(LayerfastError, match=r"logits shaped \[batch, classes\]"):
            Evaluator(model, variants, device="cpu", batch_size=BS, fanout=fanout).run(_batches(x, y))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pooled", r"returned 1 rows of logits for a batch of 16 samples"),
        ("empty", r"logits with no classes"),
        ("int", r"torch.int64 logits: they must be floating point"),
    ],
)
def test_logits_of_the_wrong_form_are_one_clear_error(kind, message):
    """A model whose output is not one row of float class scores per sample is named as such
    before anything is scored, not met as `score_`'s shape or dtype error."""
    model = BadOutput(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(20)
    variants = [{"c.weight": torch.randn_like(model.c.weight)}] * 2
    for fanout in (False, True):
        with pytest.raises(LayerfastError, match=message):
            ev = Evaluator(model, variants, device="cpu", batch_size=BS, fanout=fanout)
            ev.run(_batches(x, y))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class ChannelPool(nn.Module):
    """A 3-D max pool on a conv's 4-D output reads it as one unbatched [C, D=channels, H, W]
    sample and pools across channels: on the fold form [B, K·C, H, W] across variants too."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool3d((kernel, 1, 1), stride=(stride, 1, 1))
        self.fc = nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.c(x)), 1))


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 3), (3, 1)])
def test_pooling_of_another_rank_is_not_run_on_the_fold_form(kernel, stride, monkeypatch):
    from layerfast.engine import fanrun

    folded: list[tuple[int, ...]] = []  # input shapes of the pool steps run on the fold form
    fold_step = fanrun._fold_step

    def spy(prog, s, env, plan, K, stacks):
        out = fold_step(prog, s, env, plan, K, stacks)
        if s.target == "pool" and out is not fanrun._NO:
            folded.append(tuple(env[s.args[0].index].t.shape))
        return out

    monkeypatch.setattr(fanrun, "_fold_step", spy)
    model = ChannelPool(kernel, stride)
    model(torch.zeros(1, *SHAPE))  # materialise the lazy head
    keys = ["c.weight", "c.bias"]
    variants = _variants(model, ["c"], [], None, K=3)
    assert all(set(v) == set(keys) for v in variants)
    x, y = _data()
    ref = _naive(model, variants, x)
    res, got = _engine(model, variants, x, y, fanout=True)
    assert res.plan["fanned_variants"] == 3
    # never on the fold form [B, 6·K, H, W], where a window straddling two variants would mix
    # them (until now only the shape mismatch that follows caught that)
    assert folded == []
    assert torch.equal(got, ref) or (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (got.argmax(-1) != ref.argmax(-1)).sum() <= 1
