"""Shared test helpers: compile a netspec net, run it, compare with the numpy references."""

import netspec as ns
import numpy as np
import onnxruntime as ort
from graph_reference import compiled_plan

import onnxlrp
from onnxlrp.runtime import with_target


class Session:
    """An onnxruntime session that, for a compiled model, feeds ``target = -1`` (explain the predicted class) when a
    call leaves it out, as :class:`onnxlrp.Explainer` does; the tests that exercise ``target`` feed it themselves."""

    def __init__(self, model, options=None):
        self.inner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, outputs, feeds, *args):
        return self.inner.run(outputs, feeds if "target" in feeds else with_target(self.inner, feeds), *args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def session(model):
    return Session(model)


def run_source(model, x):
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})


def explain(model, x, rule, target=None, **kwargs):
    """(original outputs, relevance, explained class) of ``model`` compiled with ``rule``."""
    compiled = onnxlrp.compile(model, rule, **kwargs)
    sess = session(compiled)
    feeds = with_target(sess, {sess.get_inputs()[0].name: x.astype(np.float32)}, target)
    names = [o.name for o in sess.get_outputs()]
    results = dict(zip(names, sess.run(None, feeds), strict=True))
    originals = [results[o.name] for o in model.graph.output]
    return originals, results["relevance"], results["explained_class"]


def compiled_from_spec(layers, shape, rule, x, **kwargs):
    """Compile the ONNX form of a netspec net; assert the original outputs are unchanged."""
    model = ns.to_onnx(layers, shape)
    originals, relevance, cls = explain(model, x, rule, **kwargs)
    np.testing.assert_allclose(originals[0], run_source(model, x)[0], rtol=1e-5, atol=1e-6)
    return relevance, cls


def assert_close_relative(actual, expected, tol=1e-5):
    """``max |actual - expected| <= tol * max |expected|`` (per test case)."""
    assert np.all(np.isfinite(actual)), "non-finite relevance"
    scale = np.abs(expected).max()
    assert scale > 0, "the reference relevance is all zero: the case tests nothing"
    err = np.abs(actual - expected).max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


def cosine_per_sample(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------- the graph reference (tests/graph_reference.py)

# Cases where the compiled float32 graph may differ from the float64 graph reference by more than 1e-5 of the map's
# peak: a rule divides by a value that nearly vanishes where its relevance does not, so float32 rounding of the
# forward values alone (GraphReference(..., float32_forward=True)) moves the float64 result by as much;
# tests/test_graph_reference.py checks that for every entry. ("zoo:NAME" or "torch:ARCH", rule) -> largest error
# allowed, of the map's peak. Figures measured on the tests' inputs.
CLASSIC_RULES = ("epsilon", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "cmp", "zplus", "gamma")
ILL_CONDITIONED = {
    # zoo DenseNet121 writes BatchNorm as Mul/Add, which is not folded (only BatchNormalization nodes are): epsilon
    # divides by the convolution's output, where the relevance follows the shifted output. Compiled 7.3e-4; the
    # float32 forward moves the reference by 2.6e-3.
    ("zoo:densenet121", "epsilon"): 2e-3,
    # the same layers under the other rules: compiled 4.9e-6 .. 9.4e-6, float32 forward 5.7e-6 .. 9.3e-6
    **{("zoo:densenet121", rule): 3e-5 for rule in ("epsilon-gamma-box", "epsilon-alpha2-beta1", "cmp", "gamma")},
    # torch DenseNet-like: the transition's AveragePool (Norm rule) divides by outputs down to 4e-5 of their peak,
    # whose relevance, from the BatchNorm-ReLU after it, is not small (R/z up to 5.9e3 times max R / max z). Every
    # rule, both exporters: compiled 3.8e-4 .. 4.2e-4, float32 forward 3.8e-4 .. 4.7e-4.
    **{("torch:densenet", rule): 1e-3 for rule in CLASSIC_RULES},
}


def reference_tolerance(model: str, rule: str) -> float:
    """The largest error of a classic rule's relevance, of the map's peak, against the graph reference."""
    return ILL_CONDITIONED.get((model, rule), 1e-5)


def check_against_graph_reference(reference, compiled, x, out, rule, tolerance=1e-5, **params):
    """The compiled model's rule plan (``onnxlrp.plan``) and relevance against the float64 graph reference: R-LRP
    by cosine >= 0.9999 per sample (it is defined up to a positive factor per sample), classic rules to
    ``tolerance`` of the map's peak. The reference explains the class the compiled model explained."""
    expected = reference.relevance(x, rule, target=out["explained_class"], **params)
    linear = reference.plan(rule, **params)
    plan = compiled_plan(compiled)
    assert {k: v for k, v in plan.items() if k in linear} == linear
    # joins and pools keep their kind's default (the reference applies Norm and winner-take-all there)
    assert {v[0] for k, v in plan.items() if k not in linear} <= ({"rlrp"} if rule == "rlrp" else
                                                                  {"norm", "winner-take-all"})
    relevance = out["relevance"]
    assert relevance.shape == expected.shape
    if rule == "rlrp":
        cosine = cosine_per_sample(relevance.astype(np.float64), expected)
        assert np.all(cosine >= 0.9999), f"cosine with the float64 reference {cosine}"
    else:
        assert_close_relative(relevance, expected, tolerance)
