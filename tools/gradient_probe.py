#!/usr/bin/env python
"""A plain gradient x input graph made from a compiled ``epsilon`` graph, to time against it (a benchmark probe).

Behind each ReLU the epsilon rule multiplies the cofactor ``c`` by the ratio ``Softsign(v * (1/eps)) =
v / (v + eps)``. A plain gradient multiplies by the ReLU's mask instead. This script rewrites every
``Mul(c, Softsign(Mul(v, 1/eps)))`` of a compiled graph into ``Where(v > 0, c, 0)`` (``--mask where``) or
``Mul(c, Sign(v))`` (``--mask sign``) and leaves everything else (the transposed products, the sums at joins, the
max-pool routing) as it was. A ReLU whose relevance reaches it in another form (``R / (v + eps)``, e.g. through a
Flatten) keeps that division, which equals the mask up to ``eps / v``. The result is an ONNX gradient x input on
the same linear products, so timing it against the compiled graph tells what the ratios cost compared with the
masks any backward pass needs:

    onnxlrp compile resnet50.onnx --rule epsilon -o eps.onnx
    python tools/gradient_probe.py eps.onnx where.onnx --mask where
    python tools/bench.py --model resnet50 --rule epsilon --variant where=where.onnx --no-memory --no-zennit

Its relevance differs from the compiled graph's where ``v`` is within a few eps of 0 and at joins, so use it for
timing only.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import helper, numpy_helper

ZERO = "gradient_probe/zero"


def masks_for_ratios(model: onnx.ModelProto, mask: str) -> int:
    """Rewrite each ``c * Softsign(v * k)`` (k a constant) of ``model`` in place; return how many."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replaced: dict[int, list] = {}  # id(product Mul) -> its replacement nodes
    dropped: set[int] = set()
    count = 0
    for ratio in graph.node:
        scale = producer.get(ratio.input[0]) if ratio.op_type == "Softsign" else None
        if scale is None or scale.op_type != "Mul" or len(readers[scale.output[0]]) != 1:
            continue
        v = [name for name in scale.input if name not in constants]
        users = readers.get(ratio.output[0], [])
        if len(v) != 1 or len(users) != 1 or users[0].op_type != "Mul":
            continue
        product = users[0]
        (c,) = [name for name in product.input if name != ratio.output[0]]
        out = product.output[0]
        if mask == "where":
            positive = f"{out}/positive"
            replaced[id(product)] = [
                helper.make_node("Greater", [v[0], ZERO], [positive], name=f"{product.name}/greater"),
                helper.make_node("Where", [positive, c, ZERO], [out], name=f"{product.name}/where")]
            dropped |= {id(scale), id(ratio)}
        else:
            ratio.op_type, ratio.input[0] = "Sign", v[0]
            dropped.add(id(scale))
        count += 1
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if mask == "where":
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), ZERO))
    return count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("compiled", help="a model compiled with --rule epsilon")
    p.add_argument("out", help="where to write the gradient x input graph")
    p.add_argument("--mask", choices=("where", "sign"), default="where",
                   help="the ReLU mask: Where(v > 0, c, 0) or c * Sign(v)")
    args = p.parse_args(argv)
    model = onnx.load(args.compiled)
    count = masks_for_ratios(model, args.mask)
    if count == 0:
        raise SystemExit(f"{args.compiled}: no ratio c * Softsign(v * (1/eps)) found (compile with --rule epsilon)")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, args.out)
    print(f"wrote {args.out}: {count} ratios replaced by ReLU masks ({args.mask})")


if __name__ == "__main__":
    main()
