"""The engine's seams: families chosen by what a composite says (never by its name), rules for joins and pools
selected and parameterised like the linear ones, parameters checked against the composite, and the op registry."""

import json
from pathlib import Path

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from helpers import assert_close_relative, compiled_from_spec, cosine_per_sample, explain
from onnxlrp.passes.ops import lookup, spec
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = str(MODELS / "digits_cnn.onnx")


def digits_batch(n=4):
    images = np.load(MODELS / "digits_test.npz")["images"][:n].astype(np.float32) / 255
    return images[:, None]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- rules for joins and pools

@pytest.mark.parametrize("model", ["residual", "sum3", "avgpool", "global", "nested"])
def test_stabilizer_reaches_joins_and_pools(model):
    """``stabilizer`` is the epsilon of the Norm rule at every join and average pool (Zennit passes it to Norm)."""
    rng = np.random.default_rng(20)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    expected = ref.lrp(layers, x, "epsilon", eps=0.01, norm_eps=0.5)
    default = ref.lrp(layers, x, "epsilon", eps=0.01)
    assert np.abs(expected - default).max() > 1e-3 * np.abs(default).max(), "the stabilizer changes nothing here"
    relevance, _ = compiled_from_spec(layers, shape, "epsilon", x, epsilon=0.01, stabilizer=0.5)
    assert_close_relative(relevance, expected, 1e-5)


def test_composite_selects_the_rule_of_joins_and_pools(tmp_path):
    rng = np.random.default_rng(21)
    layers, shape = ZOO["residual"](rng)
    x = rng.normal(size=shape)
    toml = write(tmp_path, "joins.toml", '[[layer]]\nop = ["Add", "Sum", "GlobalAveragePool"]\nrule = "norm"\n'
                                         'stabilizer = 0.25\n[[layer]]\nrule = "epsilon"\nepsilon = 0.01\n')
    relevance, _ = compiled_from_spec(layers, shape, "unused", x, composite=toml)
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", eps=0.01, norm_eps=0.25), 1e-5)
    compiled = onnxlrp.compile(onnxlrp_model(layers, shape), composite=toml)
    plan = json.loads(next(p.value for p in compiled.metadata_props if p.key == "onnxlrp.plan"))
    assert sorted({rule for rule in plan.values()}) == ["epsilon(epsilon=0.01)", "norm(stabilizer=0.25)"]


def onnxlrp_model(layers, shape):
    return ns.to_onnx(layers, shape)


def test_a_rule_for_another_kind_never_applies(tmp_path):
    """A catch-all entry with a linear rule does not select joins: they keep their default (Norm, 1e-6)."""
    rng = np.random.default_rng(22)
    layers, shape = ZOO["sum3"](rng)
    x = rng.normal(size=shape)
    toml = write(tmp_path, "all.toml", '[[layer]]\nrule = "epsilon"\nepsilon = 0.01\n')
    relevance, _ = compiled_from_spec(layers, shape, "unused", x, composite=toml)
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", eps=0.01), 1e-5)


# ---------------------------------------------------------------- families from composites

REFERENCE_NAMES = {"lrp0": ("lrp0", {}), "epsilon": ("epsilon", {"eps": 1e-6}), "gamma": ("gamma", {}),
                   "zplus": ("zplus", {}), "alpha-beta": ("alphabeta", {}), "flat": ("flat", {}),
                   "wsquare": ("wsquare", {}), "zbox": ("zbox", {"low": 0.0, "high": 1.0})}


@pytest.mark.parametrize("rule", [*REFERENCE_NAMES, "rlrp"])
def test_toml_composites_with_every_rule(tmp_path, rule):
    """A TOML composite naming one rule everywhere compiles to the same relevance as the rule itself; for rlrp that
    is the R-LRP family (Eq. 13 forks and the final scaling included), checked against the loop-form reference."""
    rng = np.random.default_rng(23)
    layers, shape = ZOO["residual"](rng)
    x = np.abs(rng.normal(size=shape)) if rule == "zbox" else rng.normal(size=shape)
    toml = write(tmp_path, "every.toml", f'[[layer]]\nrule = "{rule}"\n')
    relevance, _ = compiled_from_spec(layers, shape, "unused", x, composite=toml)
    if rule == "rlrp":
        expected = ref.rlrp(layers, x)
        assert cosine_per_sample(relevance, expected).min() >= 0.9999
        np.testing.assert_allclose(np.abs(relevance).reshape(len(x), -1).sum(1),
                                   np.abs(expected).reshape(len(x), -1).sum(1), rtol=1e-4)
    else:
        name, params = REFERENCE_NAMES[rule]
        assert_close_relative(relevance, ref.lrp(layers, x, name, **params), 1e-5)


def test_rlrp_toml_is_the_rlrp_family(tmp_path):
    """The bug: a composite with rule = "rlrp" on every layer gave sum|R| = 8181 on the digits CNN (no Eq. 13, no
    final scaling) against 20.6 for --rule rlrp. It is now the R-LRP family: the same graph as --rule rlrp."""
    toml = write(tmp_path, "mine.toml", '[[layer]]\nop = "Conv"\nrule = "rlrp"\n[[layer]]\nrule = "rlrp"\n')
    x = digits_batch()
    model = onnx.load(DIGITS)
    _, by_rule, _ = explain(model, x, "rlrp")
    _, by_toml, _ = explain(model, x, "unused", composite=toml)
    np.testing.assert_array_equal(by_toml, by_rule)


def test_rlrp_cannot_be_mixed_per_layer(tmp_path):
    toml = write(tmp_path, "mixed.toml", '[[layer]]\nop = "Conv"\nrule = "rlrp"\n[[layer]]\nrule = "epsilon"\n')
    with pytest.raises(OnnxlrpError, match=r"mixed.toml: layer 1 is rlrp and layer 2 is epsilon: R-LRP cannot be "
                                           r"mixed per layer") as err:
        onnxlrp.compile(DIGITS, composite=toml)
    assert "\n" not in str(err.value)


def test_the_family_is_never_chosen_by_name(tmp_path):
    """A composite file named rlrp.toml with epsilon rules is classic epsilon, not R-LRP."""
    toml = write(tmp_path, "rlrp.toml", '[[layer]]\nrule = "epsilon"\n')
    x = digits_batch()
    model = onnx.load(DIGITS)
    _, by_rule, _ = explain(model, x, "epsilon")
    _, by_toml, _ = explain(model, x, "unused", composite=toml)
    np.testing.assert_array_equal(by_toml, by_rule)
    assert onnxlrp.inspect(DIGITS, composite=toml).family == "classic"
    assert onnxlrp.inspect(DIGITS, rule="rlrp").family == "rlrp"


# ---------------------------------------------------------------- parameters

def test_parameters_of_a_composite_are_accepted_on_any_model():
    """--low/--high of epsilon-gamma-box are used by its first-convolution z-box: an MLP (no convolution) compiles,
    and inspect says the model leaves them unused; a parameter no rule of the composite has is still refused."""
    rng = np.random.default_rng(24)
    layers, shape = ZOO["mlp"](rng)
    model = onnxlrp_model(layers, shape)
    onnxlrp.compile(model, "epsilon-gamma-box", low=-3, high=3)
    plan = onnxlrp.inspect(model, "epsilon-gamma-box", low=-3, high=3)
    assert plan.unused_parameters == ["high", "low"]
    assert onnxlrp.inspect(DIGITS, "epsilon-gamma-box", low=-3, high=3).unused_parameters == []
    with pytest.raises(OnnxlrpError, match="'epsilon' does not use --gamma"):
        onnxlrp.compile(model, "epsilon", gamma=0.5)
    with pytest.raises(OnnxlrpError, match="'rlrp' does not use --stabilizer"):
        onnxlrp.compile(model, "rlrp", stabilizer=0.1)


# ---------------------------------------------------------------- the op registry

def test_a_missing_op_fails_at_lookup_with_its_name_and_op():
    node = onnx.helper.make_node("Det", ["a"], ["b"], name="the_det")
    with pytest.raises(UnsupportedOpError, match=r"node 'the_det' \(Det\): no relevance rule for this op"):
        lookup(None, node)
    custom = onnx.helper.make_node("Relu", ["a"], ["b"], name="custom_relu", domain="com.example")
    assert spec(custom).emit is None  # a custom domain's op is not the default domain's, whatever its name
