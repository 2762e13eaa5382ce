"""Shared test helpers: compile a netspec net, run it, compare with the numpy reference."""

import netspec as ns
import numpy as np
import onnxruntime as ort

import onnxlrp


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_source(model, x):
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})


def explain(model, x, rule, target=None, **kwargs):
    """(original outputs, relevance, explained class) of ``model`` compiled with ``rule``."""
    compiled = onnxlrp.compile(model, rule, **kwargs)
    sess = session(compiled)
    feeds = {sess.get_inputs()[0].name: x.astype(np.float32)}
    if target is not None:
        feeds["target"] = np.asarray(target, dtype=np.int64)
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
