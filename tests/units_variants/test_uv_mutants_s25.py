"""Mutation testing of units.py and variants.py (session 25): tests killing the mutants that
the existing tests let survive. Each test's docstring names the mutant it kills (its id, the
mutated line, and what the mutant did). Of 93 mutants (units.py 39, variants.py 50, the init
rules of models/init.py 4), 53 were killed by existing tests, 33 only by the tests here, and
7 are equivalent (see the session 25 report)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from layerfast.checkpoints import CheckpointDir
from layerfast.errors import LayerfastError
from layerfast.units import Unit, bn_feeders, literal_pattern, make_units, split_patterns
from layerfast.variants import derive_seed, make_variants, rerandom_draw


def _by_name(units: list[Unit]) -> dict[str, Unit]:
    return {u.name: u for u in units}


# --------------------------------------------------------------------------- units.py


class _AddNorm(nn.Module):
    """A LayerNorm without affine parameters after an addition: it owns no state at all."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.a(x) + self.b(x))


def test_a_norm_without_state_is_no_unit() -> None:
    """U1 `_has_state`: `return is_norm(module)` (the running-statistics clause dropped) made
    a stateless LayerNorm an owner, so an unfed one became a unit with no keys to reset."""
    for bn in ("with-layer", "separate"):
        units = make_units(_AddNorm(), bn=bn)
        assert [u.name for u in units] == ["a", "b"]
        assert all(u.keys for u in units)


class _UntraceableSeq(nn.Module):
    """Untraceable (data-dependent branch): a Linear then a LayerNorm over its last two dims."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.ln = nn.LayerNorm([2, 8])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.ln(self.fc(x))


def test_fallback_reads_a_layernorm_width_from_its_last_dim() -> None:
    """U7 `_norm_features`: `int(shape[0])` read the LayerNorm([2, 8]) width as 2, so the
    fallback rule no longer paired it with the Linear(4, 8) that feeds it."""
    model = _UntraceableSeq()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    assert bn_feeders(model) == {"ln": "fc"}
    assert _by_name(make_units(model))["fc"].modules == ("fc", "ln")


def test_a_bracket_right_after_the_opening_one_is_in_the_class() -> None:
    """U14 `_split_points`: without `k += text[k:k + 1] == "]"` the class `[],a]` ended at
    its first `]`, and the comma inside it split the pattern."""
    assert split_patterns("[],a],b") == ["[],a]", "b"]
    assert split_patterns("[!],a],b") == ["[!],a]", "b"]


def test_a_closing_brace_of_another_kind_is_a_plain_character() -> None:
    """U15 `_split_points`: `if stack:` (for `if open_count[want]:`) popped the unclosed `(`
    looking for a `{` that was never opened, then popped an empty stack: IndexError."""
    assert split_patterns("(a},b") == ["(a}", "b"]
    assert split_patterns("re:x(a},fc") == ["re:x(a}", "fc"]


def test_literal_pattern_puts_a_comma_in_a_class() -> None:
    """U17 `literal_pattern`: `c in "*?["` left a comma bare, and `--units` split the literal
    pattern of a module named `a,b` in two."""
    assert literal_pattern("a,b") == "a[,]b"
    assert split_patterns(literal_pattern("a,b")) == ["a[,]b"]


def test_literal_pattern_of_a_name_starting_with_re() -> None:
    """U18 `literal_pattern`: `"[r]" + out` (for `out[1:]`) kept the `r`, so the literal
    pattern of a module named `re:x` was `[r]re:x`, which matches `rre:x`, not `re:x`."""
    import fnmatch

    assert literal_pattern("re:x") == "[r]e:x"
    assert fnmatch.fnmatchcase("re:x", literal_pattern("re:x"))


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.block.conv2 = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)


def test_a_regex_pattern_searches_anywhere_in_the_name() -> None:
    """U19 `_matcher`: `rx.match` (for `rx.search`, as DESIGN and the docstring say) anchored
    the regex at the start of the name, so `re:conv2` selected nothing inside `block`."""
    units = make_units(_Nested(), patterns="re:conv2")
    assert [(u.name, u.modules) for u in units] == [("re:conv2", ("block.conv2",))]


def test_a_pattern_given_twice_is_one_unit() -> None:
    """U21 `_pattern_selections`: without `dict.fromkeys` a repeated pattern made two units of
    one name, refused as `two units share the name(s) fc`."""
    units = make_units(_Nested(), patterns="fc,block.0,fc")
    assert [u.name for u in units] == ["fc", "block.0"]


class _CachedScale(nn.Linear):
    """A plain tensor attribute `w` next to a parameter `w_in`, and no forward pre-hook."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.w_in = nn.Parameter(torch.ones(4))
        self.w = torch.ones(4)  # a constant kept as a plain attribute, derived from nothing


def test_a_tensor_attribute_without_a_pre_hook_is_no_derived_weight() -> None:
    """U26 `derived_weights`: without the `_forward_pre_hooks` guard a plain tensor attribute
    named like a parameter's prefix (`w`, `w_in`) was taken for a derived weight, and the
    unit was refused re-randomization."""
    from layerfast.units import derived_weights

    model = nn.Sequential(_CachedScale())
    assert derived_weights(model[0]) == {}
    (unit,) = make_units(model)
    draw = rerandom_draw(model, unit, 1)
    assert set(draw) == {"0.weight", "0.bias", "0.w_in"}


def test_a_non_persistent_buffer_is_no_key() -> None:
    """U29 `_keys`: `return full` (no `k in sd_keys` filter) put a BN's non-persistent
    running statistics, which no checkpoint holds, in the unit's keys."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    bn = model[1]
    mean, var = bn.running_mean, bn.running_var
    del bn.running_mean, bn.running_var
    bn.register_buffer("running_mean", mean, persistent=False)
    bn.register_buffer("running_var", var, persistent=False)
    (unit,) = make_units(model)
    assert unit.modules == ("0", "1")
    assert unit.keys == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert set(unit.keys) <= set(model.state_dict())


class _AffineAddNorm(_AddNorm):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)


def test_separate_keeps_an_unfed_norm_as_its_own_unit() -> None:
    """U30 `make_units`: `lone = bn == "with-layer"` dropped, under `separate`, the unfed norm
    that `with-layer` resets as a unit of its own: `separate` must reset every norm
    `with-layer` resets."""
    assert [u.name for u in make_units(_AffineAddNorm())] == ["a", "b", "ln"]
    units = _by_name(make_units(_AffineAddNorm(), bn="separate"))
    assert list(units) == ["a", "b", "ln"]
    assert units["ln"].keys == ("ln.weight", "ln.bias")


def test_a_stateless_norm_fed_by_a_linear_is_left_out() -> None:
    """U31 `make_units`: without `if norm in owners` a stateless LayerNorm fed by a Linear
    joined the Linear's unit and `owners[m]` raised KeyError."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False))
    for bn in ("with-layer", "separate"):
        assert [(u.name, u.modules) for u in make_units(model, bn=bn)] == [("0", ("0",))]


def test_keep_skips_a_block_of_norms_only() -> None:
    """U33 `make_units`: `elif bn == "keep":` (the `patterns is not None` clause dropped)
    refused a block/stage holding only a normalization layer with a message about a unit
    pattern nobody gave; under keep such a block simply has nothing to reset."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    for granularity in ("block", "stage"):
        units = make_units(model, granularity=granularity, bn="keep")
        assert [(u.name, u.keys) for u in units] == [("0", ("0.weight", "0.bias"))]


def test_patterns_with_stage_granularity_are_refused() -> None:
    """U35 `make_units`: `granularity == "block"` let `--units` with `--granularity stage`
    pass, silently ignoring the stage granularity asked for."""
    for granularity in ("block", "stage"):
        with pytest.raises(LayerfastError, match=f"drop --granularity {granularity}"):
            make_units(_Nested(), granularity=granularity, patterns="fc")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.dec.bias = self.enc.bias


def test_tied_units_are_said_once_and_overlaps_not_at_all() -> None:
    """U36 `tied_across_units`: without `holder[1] != k` overlapping patterns (the same key
    under the same name in two units, asked for) were reported as tied weights; U37: without
    the `said` check a pair tying weight and bias was reported twice."""
    from layerfast.units import tied_across_units

    model = _Tied()
    lines = tied_across_units(model, make_units(model))
    assert len(lines) == 1 and lines[0].startswith("units enc and dec share one tensor")
    overlapping = make_units(_Nested(), patterns="fc,re:.*")
    assert tied_across_units(_Nested(), overlapping) == []


class _NamedLikeAMethod(nn.Module):
    """A Linear named `relu`, and a BatchNorm fed by the tensor method `.relu()`."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(self.relu(x)).relu())


def test_a_method_call_named_like_a_module_feeds_no_norm() -> None:
    """U39 `_traced_feeders`: without `src.op == "call_module"` the node of `x.relu()` (a
    call_method whose target is "relu") was read as the module `relu`, pairing the BN with a
    Linear that does not feed it."""
    model = _NamedLikeAMethod()
    assert bn_feeders(model) == {}
    assert [u.modules for u in make_units(model)] == [("relu",), ("a",), ("bn",)]


def test_a_module_named_root_clashes_with_the_models_own_parameters() -> None:
    """U40 `make_units`: without the duplicate-name check a module registered as `(root)`
    and the model's own parameters made two units named `(root)`, whose rows could not be
    told apart."""
    model = nn.Module()
    model.p = nn.Parameter(torch.ones(2))
    model.add_module("(root)", nn.Linear(2, 2))
    with pytest.raises(LayerfastError, match=r"two units share the name\(s\) \(root\)"):
        make_units(model)


# --------------------------------------------------------------------------- variants.py


class _NumpyInit(nn.Linear):
    """A `reset_parameters` drawing from numpy's global generator."""

    def reset_parameters(self) -> None:
        import numpy as np

        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.random.randn(*self.weight.shape)))
            self.bias.zero_()


def test_numpy_is_seeded_per_unit_and_module() -> None:
    """V6 `rerandom_draw`: `seeded_host_generators(seed)` (for the derived `seed_k`) seeded
    numpy with the bare seed, so a numpy-drawn init gave every unit of one shape the same
    draw (and the θ⁰ redraw, seed + 1, nothing new)."""
    import numpy as np

    model = nn.Sequential(_NumpyInit(4, 4), _NumpyInit(4, 4))
    a, b = make_units(model)
    da, db = rerandom_draw(model, a, 1), rerandom_draw(model, b, 1)
    assert not torch.equal(da["0.weight"], db["1.weight"])
    np.random.seed(derive_seed("layerfast-rerandom", 1, "0", "0") % 2**32)
    want = torch.from_numpy(np.random.randn(4, 4)).float()
    assert torch.equal(da["0.weight"], want)


class _OnesZerosInit:
    """An architecture whose init rule sets a norm's affine parameters and nothing else."""

    @staticmethod
    def init(module: nn.Module) -> None:
        if isinstance(module, nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.1)
            nn.init.zeros_(module.bias)


def test_a_redraw_resets_running_statistics_whatever_the_init_rule() -> None:
    """V7 `_redraw`: without the `reset_running_stats()` call a norm re-drawn by an init rule
    that only sets its weight and bias kept the final model's running statistics (DESIGN §3:
    a fresh draw of the unit, its statistics those of a fresh module)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(5.0)
    (unit,) = make_units(model)
    draw = rerandom_draw(model, unit, 1, arch=_OnesZerosInit())
    assert torch.equal(draw["1.running_mean"], torch.zeros(4))
    assert torch.equal(draw["1.running_var"], torch.ones(4))
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))  # the model is untouched


def test_a_module_with_only_an_underscore_reset_is_redrawn() -> None:
    """V8 `_redraw`: looking only for `reset_parameters` refused nn.MultiheadAttention, whose
    reset is `_reset_parameters` (which `check_redrawable` accepts), mid-pass."""
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    unit = _by_name(make_units(model))["attn"]
    draw = rerandom_draw(model, unit, 1)
    assert set(draw) == {"attn.in_proj_weight", "attn.in_proj_bias"}
    assert not torch.equal(draw["attn.in_proj_weight"], model.attn.in_proj_weight)
    assert torch.equal(draw["attn.in_proj_weight"], rerandom_draw(model, unit, 1)["attn.in_proj_weight"])


def test_a_key_no_module_of_the_unit_owns_is_refused_up_front(tmp_path: Path) -> None:
    """V17 `check_redrawable`: without the `missing` check a unit listing a key none of its
    modules owns passed `make_variants` and failed mid-pass with a bare KeyError."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    unit = Unit("0", ("0",), ("0.weight", "0.bias", "1.weight"))
    with pytest.raises(LayerfastError, match=r"cannot re-randomize 1\.weight: not owned"):
        make_variants(model, [unit], None, reset="rerandom")


def _normal(std: float, mean: float = 0.0, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * std + mean


def test_init_check_band_and_mean_shift() -> None:
    """V18 `_CHECK_STD_BAND = (0.5, 2.0)` missed a fan_in-for-fan_out draw (std ratio 1.41);
    V19: without `abs(ma - mb) > 0.25 * sb` a draw shifted by half θ⁰'s spread passed."""
    from layerfast.variants import init_mismatches

    assert init_mismatches({"w": _normal(1.0)}, {"w": _normal(1.0, seed=1)}) == []
    assert len(init_mismatches({"w": _normal(1.0)}, {"w": _normal(2 ** 0.5, seed=1)})) == 1
    assert len(init_mismatches({"w": _normal(1.0)}, {"w": _normal(1.0, 0.5, seed=1)})) == 1


def test_init_check_on_constants_and_single_elements() -> None:
    """V20 `init_mismatches`: without `a[0] != b[0]` a constant draw of another constant than
    θ⁰ (zero-init residual BN weight 0 against 1) passed; V21: `d.numel() < 1` compared
    one-element tensors, each a constant, and flagged any two different draws."""
    from layerfast.variants import init_mismatches

    lines = init_mismatches({"bn.weight": torch.ones(8)}, {"bn.weight": torch.zeros(8)})
    assert lines == ["bn.weight: θ⁰ is all 0, the draw all 1"]
    assert init_mismatches({"b": torch.tensor([0.3])}, {"b": torch.tensor([0.7])}) == []


def _write(path: Path, states: dict[int, dict[str, torch.Tensor]]) -> CheckpointDir:
    for tau, sd in states.items():
        torch.save(sd, path / f"epoch_{tau:03d}.pt")
    return CheckpointDir(path)


def test_the_init_check_leaves_running_statistics_alone(tmp_path: Path, capsys) -> None:
    """V22 `_warn_init_mismatch`: without the `k in params` filter the running statistics
    of a θ⁰ saved after a train-mode forward (non-constant) were compared with a draw's
    reset ones (all 0), warning that the draws are not the model's initialization."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    theta0["1.running_mean"] = torch.randn(64) * 0.1
    theta0["1.running_var"] = 1 + torch.rand(64)
    ck = _write(tmp_path, {0: theta0, 1: model.state_dict()})
    capsys.readouterr()
    make_variants(model, make_units(model), ck, reset="rerandom")
    assert "does not look drawn" not in capsys.readouterr().err


def test_a_label_asked_twice_is_one_variant(tmp_path: Path) -> None:
    """V25 `_chosen`: without `dict.fromkeys` `checkpoints=[1, 1]` evaluated reinit @1 twice
    (two identical rows in results.csv)."""
    model = nn.Sequential(nn.Linear(4, 4))
    ck = _write(tmp_path, {0: model.state_dict(), 1: model.state_dict()})
    vs = make_variants(model, make_units(model), ck, reset="reinit,fullmodel", checkpoints=[1, 0, 1])
    assert [v.label for v in vs] == ["baseline", "reinit 0 @1", "reinit 0 @0", "fullmodel @1",
                                     "fullmodel @0"]


class _TwiceNamedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.norm2 = self.bn  # one module, two names in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class _Same(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _keep_fullmodel_keys(model: nn.Module, path: Path) -> set[str]:
    ck = _write(path, {0: model.state_dict(), 1: model.state_dict()})
    vs = make_variants(model, make_units(model, bn="keep"), ck, reset="fullmodel")
    return set(vs[1].keys)


def test_keep_leaves_every_name_of_a_norm_out_of_fullmodel(tmp_path: Path) -> None:
    """V26 `_norm_keys`: `named_modules()` (duplicates removed) missed the norm's second name
    `norm2`, so fullmodel under --bn keep loaded `norm2.*` from τ into the one shared module."""
    keys = _keep_fullmodel_keys(_TwiceNamedNorm(), tmp_path)
    assert keys == {"fc.weight", "fc.bias"}


def test_keep_leaves_a_parametrized_norms_weight_out_of_fullmodel(tmp_path: Path) -> None:
    """V27 `_norm_keys`: without the `parametrizations` clause a parametrized LayerNorm's
    `ln.parametrizations.weight.original` was reset by fullmodel under --bn keep."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    parametrize.register_parametrization(model[2], "weight", _Same())
    assert "2.parametrizations.weight.original" in model.state_dict()
    assert _keep_fullmodel_keys(model, tmp_path) == {"0.weight", "0.bias"}


def test_a_joint_reset_of_overlapping_units_lists_each_key_once(tmp_path: Path) -> None:
    """V31 `make_variants`: without `dict.fromkeys` a joint reset of units sharing keys
    (overlapping patterns, a norm fed by two units) listed the shared keys twice."""
    model = _Nested()
    units = make_units(model, patterns="fc,re:.*")
    ck = _write(tmp_path, {0: model.state_dict(), 1: model.state_dict()})
    (v,) = make_variants(model, units, ck, reset=(), joint=[(["fc", "re:.*"], 0)])[1:]
    assert v.unit == "fc+re:.*" and len(v.keys) == len(set(v.keys)) == len(model.state_dict())
    assert v.keys[:2] == ("fc.weight", "fc.bias")


def test_the_init_check_draws_the_first_seed_asked_for(tmp_path: Path) -> None:
    """V33 `make_variants`: checking seed 1 (for `seeds[0]`) with `seeds=(5,)` drew a unit
    no variant evaluates and left the evaluated draw unchecked (its stats not yet made)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    ck = _write(tmp_path, {0: model.state_dict(), 1: model.state_dict()})
    (v,) = make_variants(model, make_units(model), ck, reset="rerandom", seeds=(5,))[1:]
    assert v.seed == 5 and v.draw_stats(ck) is not None


def test_theta0_is_validated_for_rerandom_alone(tmp_path: Path) -> None:
    """V34 `make_variants`: without `used |= {0}` a θ⁰ of the wrong shape, read by the
    rerandom never-equal check and the init check, was not validated up front."""
    model = nn.Sequential(nn.Linear(4, 4))
    bad = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(4)}
    ck = _write(tmp_path, {0: bad, 1: model.state_dict()})
    with pytest.raises(LayerfastError, match=r"epoch_000\.pt"):
        make_variants(model, make_units(model), ck, reset="rerandom")


def test_rerandom_with_checkpoints_but_no_theta0(tmp_path: Path) -> None:
    """V45 `_Draws`: keeping a checkpoint directory without τ = 0 made every draw read θ⁰
    from a label that does not exist."""
    model = nn.Sequential(nn.Linear(4, 4))
    ck = _write(tmp_path, {1: model.state_dict(), 3: model.state_dict()})
    (v,) = make_variants(model, make_units(model), ck, reset="rerandom")[1:]
    assert set(v.overrides()) == {"0.weight", "0.bias"} and v.draw_stats(ck) is None


def test_the_init_check_runs_for_a_single_unit(tmp_path: Path, capsys) -> None:
    """V49: an init check skipped for a model of one unit let a θ⁰ three times wider than
    the draws pass without the warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    wide = {k: v * 3 for k, v in model.state_dict().items()}
    ck = _write(tmp_path, {0: wide, 1: model.state_dict()})
    capsys.readouterr()
    make_variants(model, make_units(model), ck, reset="rerandom")
    assert "does not look drawn" in capsys.readouterr().err


def test_interp_noise_is_a_float64_standard_normal(tmp_path: Path) -> None:
    """V50 `_interp`: noise drawn in float32 then widened is another draw than the documented
    float64 standard normal of the seeded generator (a float64 model shows every bit)."""
    model = nn.Sequential(nn.Linear(4, 4)).double()
    t0 = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    ck = _write(tmp_path, {0: t0, 1: model.state_dict()})
    (unit,) = make_units(model)
    (v,) = make_variants(model, [unit], ck, reset=(), interp=[("0", 0, 0.25, 0.5)], seeds=(3,))[1:]
    gen = torch.Generator().manual_seed(derive_seed("layerfast-interp", 3, "0", 0))
    got = v.overrides()
    final = model.state_dict()
    for k in ("0.weight", "0.bias"):
        noise = torch.randn(final[k].shape, generator=gen, dtype=torch.float64)
        want = 0.75 * t0[k] + 0.25 * final[k] + 0.5 * noise
        assert torch.equal(got[k], want), k
