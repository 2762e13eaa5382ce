"""Tiny hand-built ONNX graphs around one pattern, and the float64 numpy equations they are tested against.

:func:`dense_net` builds ``x [B, n] -> MatMul + Add (W1, b1) -> z -> middle(z) -> a -> MatMul + Add (W2, b2) ->
logits``, where ``middle`` is the subgraph under test, written node by node as an exporter writes it. The numpy side
(:func:`epsilon_dense`, :func:`stab`, ...) is written from the rules' equations, independently of the compiler.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-6


class Nodes:
    """Collects nodes and constant initializers for a subgraph (fresh names per call)."""

    def __init__(self, prefix: str = "p"):
        self.prefix, self.nodes, self.inits, self.count = prefix, [], [], 0

    def const(self, value, dtype=np.float32) -> str:
        self.count += 1
        name = f"{self.prefix}_c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        """A node (named like its output when ``output`` is given)."""
        self.count += 1
        name = output or f"{self.prefix}_{op_type}_{self.count}"
        output = output or f"{self.prefix}_t{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def dense_net(middle, n: int = 6, hidden: int = 8, classes: int = 4, opset: int = 17, seed: int = 0,
              batch=2) -> tuple[onnx.ModelProto, dict]:
    """The model and its weights ``{"W1", "b1", "W2", "b2"}`` (W as [in, out]); ``middle(nodes, z) -> a``."""
    rng = np.random.default_rng(seed)
    weights = {"W1": rng.normal(0, 0.5, (n, hidden)), "b1": rng.normal(0, 0.2, hidden),
               "W2": rng.normal(0, 0.5, (hidden, classes)), "b2": rng.normal(0, 0.2, classes)}
    g = Nodes()
    z = g.op("Add", [g.op("MatMul", ["x", g.const(weights["W1"])]), g.const(weights["b1"])], "z")
    a = middle(g, z)
    g.op("Add", [g.op("MatMul", [a, g.const(weights["W2"])]), g.const(weights["b2"])], "logits")
    graph = helper.make_graph(g.nodes, "handbuilt", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [batch, n])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def epsilon_dense(x, W, b, R, eps=EPS):
    """LRP-epsilon for ``z = x W + b``: ``R_x = x * (R / stab(z)) W^T``."""
    return x * ((R / stab(x @ W + b, eps)) @ W.T)


def one_hot_logits(logits, target=None):
    target = logits.argmax(1) if target is None else np.asarray(target)
    return np.eye(logits.shape[1])[target] * logits


def rlrp_scaled(r, explained):
    """R-LRP's final scaling: ``sum |R| = |explained value|`` per sample."""
    flat = r.reshape(len(r), -1)
    return (flat * (np.abs(explained) / np.abs(flat).sum(1))[:, None]).reshape(r.shape)


def layer_norm(x, axes, w=None, b=None, eps=1e-5, centered=True):
    """``y = w (x - mean) / sigma + b`` (``centered=False``: RMS norm ``y = w x / sqrt(mean(x^2) + eps)``), and
    ``sigma``."""
    d = x - x.mean(axes, keepdims=True) if centered else x
    sigma = np.sqrt((d * d).mean(axes, keepdims=True) + eps)
    y = d / sigma
    return (y if w is None else y * w) + (0 if b is None else b), sigma


def linearized_norm(x, y, sigma, R, axes, w=None, centered=True, eps=EPS):
    """The epsilon rule on the normalization with ``sigma`` constant: ``R_x = x * (h - mean(h))``, ``h = w R /
    (sigma stab(y))`` (``x * h`` for RMS norm)."""
    h = (1.0 if w is None else w) * R / (sigma * stab(y, eps))
    return x * (h - h.mean(axes, keepdims=True) if centered else h)


def relative_norm(x, sigma, R, axes, w=None, centered=True):
    """R-LRP Eq. 8 on the linearized normalization (up to a uniform factor): ``x * (h - mean(h))``, ``h = w R /
    sigma``."""
    h = (1.0 if w is None else w) * R / sigma
    return x * (h - h.mean(axes, keepdims=True) if centered else h)


def unbroadcast(r, shape):
    axes = tuple(a for a, (d, e) in enumerate(zip(shape, r.shape, strict=True)) if d == 1 and e != 1)
    return r.sum(axes, keepdims=True) if axes else r
