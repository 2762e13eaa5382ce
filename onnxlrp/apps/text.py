"""``onnxlrp explain MODEL --text "..." --tokenizer tokenizer.json``: token relevance of a text model.

The text is tokenized with a local ``tokenizer.json`` (the ``tokenizers`` library; nothing is downloaded), fed to
the compiled model (its token input gets the ids; ``attention_mask`` ones, ``token_type_ids`` the tokenizer's type
ids, ``position_ids`` 0, 1, ...), and per text three files are written: ``text-<k>.json`` (the tokens, their ids and
relevance, the explained class and its logit), ``text-<k>.html`` (the tokens coloured by relevance: red positive,
blue negative, the strongest at full colour) and ``text-<k>.png`` (the same picture).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import click
import numpy as np

from onnxlrp.contract import RELEVANCE_OUTPUT, TARGET_INPUT
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, write_atomic
from onnxlrp.messages import show

from .files import check_out_dir, ensure_dir

__all__ = ["load_tokenizer", "run_explain_text", "token_colours"]

PNG_WIDTH_INCHES = 10.0


def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``, or a one-line error."""
    try:
        import tokenizers
    except ImportError:
        raise OnnxlrpError("explain --text needs the tokenizers package: pip install tokenizers") from None
    path = Path(path)
    if not path.is_file():
        raise OnnxlrpError(f"{show(path)}: no such tokenizer file")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises plain Exceptions for every malformed file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise OnnxlrpError(f"{show(path)}: not a tokenizer.json file: {first}") from None


def feeds_for(model, encoding) -> tuple[dict[str, np.ndarray], str]:
    """The inputs of the compiled ``model`` for one encoded text, and the name of its token input (the input that
    has a ``relevance.<name>`` output)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits and i.name != TARGET_INPUT]
    outputs = {o.name for o in model.graph.output}
    tokens = [i.name for i in inputs if f"{RELEVANCE_OUTPUT}.{i.name}" in outputs]
    if len(tokens) != 1:
        raise OnnxlrpError(f"explain --text needs a model with one token input (integer ids looked up in an embedding "
                           f"table); this one has {len(tokens)}")
    n = len(encoding.ids)
    known = {tokens[0]: encoding.ids, "attention_mask": encoding.attention_mask, "token_type_ids": encoding.type_ids,
             "position_ids": list(range(n))}
    feeds = {}
    for vi in inputs:
        if vi.name not in known:
            raise OnnxlrpError(f"explain --text: input {vi.name!r} is neither the token input nor attention_mask, "
                               "token_type_ids or position_ids")
        feeds[vi.name] = np.asarray(known[vi.name], dtype=np.int64).reshape(1, n)
    return feeds, tokens[0]


def token_colours(relevance: np.ndarray) -> list[tuple[int, int, int]]:
    """Red for positive, blue for negative relevance, white for 0; full colour at the largest ``|R|``."""
    peak = float(np.abs(relevance).max()) or 1.0
    colours = []
    for r in relevance / peak:
        fade = int(round(255 * (1 - min(abs(float(r)), 1.0))))
        colours.append((255, fade, fade) if r >= 0 else (fade, fade, 255))
    return colours


def html_page(text: str, tokens: list[str], relevance: np.ndarray, title: str) -> str:
    spans = "".join(f'<span title="{r:.4g}" style="background:rgb{c};padding:2px 3px;margin:1px;'
                    f'display:inline-block">{html.escape(t)}</span>'
                    for t, r, c in zip(tokens, relevance, token_colours(relevance), strict=True))
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
            f"<body style=\"font-family:monospace\"><p>{html.escape(title)}</p>\n<p>{html.escape(text)}</p>\n"
            f"<p>{spans}</p>\n</body></html>\n")


def png_picture(tokens: list[str], relevance: np.ndarray, title: str):
    """A writer of the tokens on their colours, wrapped into lines, as a PNG."""
    def write(tmp: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        line_chars = 80
        lines, line, used = [], [], 0
        for token, colour in zip(tokens, token_colours(relevance), strict=True):
            if line and used + len(token) + 1 > line_chars:
                lines.append(line)
                line, used = [], 0
            line.append((token, colour, used))
            used += len(token) + 1
        lines.append(line)
        height = 0.6 + 0.32 * len(lines)
        fig = plt.figure(figsize=(PNG_WIDTH_INCHES, height), dpi=100)
        fig.text(0.01, 1 - 0.25 / height, title, fontsize=9, family="monospace", va="top")
        for row, items in enumerate(lines):
            y = 1 - (0.55 + 0.32 * row) / height
            for token, colour, column in items:
                fig.text(0.01 + 0.98 * column / line_chars, y, token, fontsize=9, family="monospace", va="top",
                         bbox={"facecolor": tuple(c / 255 for c in colour), "edgecolor": "none", "pad": 1.5})
        fig.savefig(tmp, format="png")
        plt.close(fig)

    return write


def run_explain_text(model, texts, tokenizer, *, out_dir, target="predicted", rule="attnlrp", **compile_kwargs):
    """Explain each of ``texts`` (see the module docstring); returns one dict per text (the JSON's content and the
    written paths). Every text is tokenized before anything is compiled or written."""
    from onnxlrp.compiler import compile as compile_model
    from onnxlrp.compiler import is_compiled
    from onnxlrp.runtime import Explainer

    from .explain import _parse_target

    wanted = _parse_target(target)
    check_out_dir(out_dir)
    tok = load_tokenizer(tokenizer)
    encodings = [tok.encode(text) for text in texts]
    if any(len(e.ids) == 0 for e in encodings):
        raise OnnxlrpError("explain --text: a text has no tokens")
    source, _ = read_model(model)
    compiled = source if is_compiled(source) else compile_model(model, rule, **compile_kwargs)
    used_rule = next((p.value for p in compiled.metadata_props if p.key == "onnxlrp.rule"), rule)
    explainer = Explainer(compiled)
    click.echo(f"explaining {len(texts)} text(s) with {used_rule} on {explainer.provider}")
    out = Path(out_dir)
    results = []
    for k, (text, encoding) in enumerate(zip(texts, encodings, strict=True), start=1):
        feeds, token_input = feeds_for(compiled, encoding)
        result = explainer(**feeds, target=wanted)
        relevance = np.asarray(result.relevance[f"{RELEVANCE_OUTPUT}.{token_input}"], dtype=np.float64)[0]
        if not np.all(np.isfinite(relevance)):
            raise OnnxlrpError(f"explain --text: text {k}: the relevance is not finite; nothing written for it")
        cls = int(np.asarray(result.explained_class).reshape(-1)[0])
        record = {"text": text, "tokens": list(encoding.tokens), "ids": [int(i) for i in encoding.ids],
                  "relevance": [float(r) for r in relevance], "class": cls, "rule": used_rule}
        title = f"class {cls}, {used_rule}; red: for the class, blue: against"
        ensure_dir(out)
        paths = {kind: out / f"text-{k}.{kind}" for kind in ("json", "html", "png")}
        write_atomic(paths["json"], lambda tmp, r=record: tmp.write_text(json.dumps(r, indent=1), encoding="utf-8"))
        page = html_page(text, record["tokens"], relevance, title)
        write_atomic(paths["html"], lambda tmp, p=page: tmp.write_text(p, encoding="utf-8"))
        write_atomic(paths["png"], png_picture(record["tokens"], relevance, title))
        click.echo(f"text {k}: class {cls} -> {show(paths['json'])}, {show(paths['html'])}, {show(paths['png'])}")
        results.append({**record, **{kind: str(p) for kind, p in paths.items()}})
    return results
