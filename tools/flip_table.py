#!/usr/bin/env python
"""The flip test (``onnxlrp evaluate --flip 10``) on the bundled digits CNN and its 1,000 held-out digits, for every
flip mode, beside the Keras LRP thesis's numbers (Sec. 5.1): rewrites the tables of docs/flip.md (everything after
its MARKER line) and docs/flip.png:

    python tools/flip_table.py [--rules epsilon,...] [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from onnxlrp.apps.flip import THESIS, run_flip

ROOT = Path(__file__).resolve().parents[1]
RULES = "epsilon,lrp0,alpha-beta:2,1,alpha-beta:3,2,epsilon-alpha2-beta1,rlrp,taylor"
MARKER = "<!-- the tables below are written by tools/flip_table.py -->"
HEADER = ["| rule | flipped | mean | std | improved | worsened | largest | smallest |",
          "|---|---|---|---|---|---|---|---|"]


def rows(results: dict, output: str, thesis: bool) -> list[str]:
    out = []
    for which in ("least", "most"):
        if thesis:
            t = THESIS[which]
            out.append(f"| **thesis** (a/b rule, 500 MNIST digits) | {which} | {t['mean']:+.3f} | {t['std']:.3f} | "
                       f"{t['improved']:.0%} | {t['worsened']:.0%} | {t['max']:+.3f} | {t['min']:+.3f} |")
        for label, per_output in results["rules"].items():
            s = per_output[output][which]
            out.append(f"| {label} | {which} | {s['mean']:+.3f} | {s['std']:.3f} | {s['improved']:.0%} | "
                       f"{s['worsened']:.0%} | {s['max']:+.3f} | {s['min']:+.3f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default=RULES)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    model = ROOT / "models" / "digits_cnn.onnx"
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("invert", "negate"):
            results = run_flip(model, k=args.k, rules=args.rules, mode=mode, out_dir=f"{tmp}/{mode}")
            logits = next(o for o in next(iter(results["rules"].values())) if o != results["score"])
            lines += [f"### {results['flip']} ({mode}), {results['samples']} digits, K = {args.k}", "",
                      f"Change of the Softmax probability ({results['score']!r}) of the explained class:", "",
                      *HEADER, *rows(results, results["score"], thesis=True), "",
                      "Change of the explained logit (the Softmax's input):", "", *HEADER,
                      *rows(results, logits, thesis=False), ""]
            if mode == "invert":
                shutil.copy(Path(tmp) / mode / "flip.png", Path(args.out) / "flip.png")
    page = Path(args.out) / "flip.md"
    prose = page.read_text().split(MARKER)[0]
    page.write_text(prose + MARKER + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
