"""``onnxlrp explain MODEL --text ... --tokenizer tokenizer.json``: token relevance as JSON, HTML and PNG, equal to
the compiled model's ``relevance.input_ids`` on the tokenized text; one-line errors for missing pieces."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

pytest.importorskip("transformers", reason="the transformer tests need Hugging Face transformers")
tokenizers = pytest.importorskip("tokenizers", reason="explain --text needs the tokenizers package")

import transformer_models as tm  # noqa: E402

import onnxlrp  # noqa: E402
from onnxlrp.runtime import Explainer  # noqa: E402

WORDS = [f"w{i}" for i in range(tm.VOCAB - 4)]


def word_tokenizer(path):
    """A word-level tokenizer over the test BERT's vocabulary: [PAD] [UNK] [CLS] [SEP] w0 w1 ..., with
    ``[CLS] text [SEP]`` around each text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    tok.save(str(path))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_explain_text_writes_json_html_png(tmp_path, name):
    model_path = tmp_path / f"{name}.onnx"
    onnx.save(tm.exported(name, "ts", 17, "eager"), model_path)
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    text = "w1 w7 w3 oops w12"
    done = run_cli("explain", model_path, "--text", text, "--text", "w5 w6", "--tokenizer", tokenizer,
                   "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "text-1.json").read_text())
    assert record["tokens"] == ["[CLS]", "w1", "w7", "w3", "[UNK]", "w12", "[SEP]"] and record["rule"] == "attnlrp"
    ids = np.array([record["ids"]], np.int64)
    expected = Explainer(onnxlrp.compile(tm.exported(name, "ts", 17, "eager"), "attnlrp"))(
        input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_allclose(record["relevance"], expected.relevance["relevance.input_ids"][0], rtol=1e-5,
                               atol=1e-7)
    assert record["class"] == int(expected.explained_class[0])
    page = (tmp_path / "out" / "text-1.html").read_text()
    assert "w12" in page and "[UNK]" in page and "background:rgb(" in page
    assert Image.open(tmp_path / "out" / "text-2.png").size[0] == 1000


def test_explain_text_errors_are_one_line(tmp_path):
    model_path = tmp_path / "bert.onnx"
    onnx.save(tm.exported("bert", "ts", 17, "eager"), model_path)
    missing = run_cli("explain", model_path, "--text", "w1", "--tokenizer", tmp_path / "none.json")
    assert missing.returncode == 1 and "none.json: no such tokenizer file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text("{not json")
    bad = run_cli("explain", model_path, "--text", "w1", "--tokenizer", tmp_path / "bad.json")
    assert bad.returncode == 1 and "not a tokenizer.json file" in bad.stderr
    no_tokenizer = run_cli("explain", model_path, "--text", "w1")
    assert no_tokenizer.returncode == 1 and "needs --tokenizer" in no_tokenizer.stderr
    assert not (tmp_path / "onnxlrp-explain").exists()


def test_evaluate_text_faithfulness(tmp_path):
    """``evaluate --text ... --tokenizer``: per rule, delta_AF averaged over the texts as the API computes it on the
    tokenized texts; one-line error without the tokenizer."""
    from onnxlrp.apps.token_faithfulness import token_faithfulness

    model_path = tmp_path / "bert.onnx"
    onnx.save(tm.exported("bert", "ts", 17, "eager"), model_path)
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    texts = ["w1 w7 w3 w12 w2", "w5 w6 w9"]
    done = run_cli("evaluate", model_path, "--text", texts[0], "--text", texts[1], "--tokenizer", tokenizer,
                   "--rules", "attnlrp,epsilon", "--steps", "4", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["rules"]) == {"attnlrp", "epsilon"} and results["steps"] == 4
    tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    compiled = onnxlrp.compile(tm.exported("bert", "ts", 17, "eager"), "attnlrp")
    expected = []
    for text in texts:
        ids = np.array([tok.encode(text).ids], np.int64)
        expected.append(token_faithfulness(compiled, {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                                           steps=4)["delta_af"])
    assert results["rules"]["attnlrp"]["delta_af"] == pytest.approx(np.mean(expected), rel=1e-5, abs=1e-7)
    missing = run_cli("evaluate", model_path, "--text", "w1", "-o", tmp_path / "none")
    assert missing.returncode == 1 and "needs --tokenizer" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
