"""Names from models never escape the output folder nor drive the terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxlrp.naming import escape_terminal, safe_filename

SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/abs/path",
        "a/b\\c",
        "..",
        ".",
        "...",
        "",
        "-rf",
        ".hidden",
        "nul\x00byte",
        "bell\x07esc\x1b[2Jcr\rnl\n",
        "c1\x9bcontrol",
        "x" * 10_000,
        "CON",
        "nul.txt",
        "trailing.",
        "\u202eevil",
        "日本語",
        "a\udcffb",
    ],
)
def test_safe_filename_properties(tmp_path: Path, name: str) -> None:
    out = safe_filename(name)
    assert out and len(out) <= 100
    assert SAFE.match(out), out
    assert ".." not in out and "/" not in out and "\\" not in out
    assert not out.endswith(".")
    assert out.split(".")[0].upper() not in {"CON", "NUL", "PRN", "AUX"}
    assert (tmp_path / out).resolve().parent == tmp_path.resolve()
    (tmp_path / out).write_text("ok")  # a real file can be made with it
    assert safe_filename(out) == out  # stable


def test_safe_filename_examples() -> None:
    assert safe_filename("conv1.weight") == "conv1.weight"
    assert safe_filename("../../etc/passwd") == "etc_passwd"
    assert safe_filename("layer/0/conv") == "layer_0_conv"
    assert safe_filename("nul\x00byte") == "nulbyte"
    assert safe_filename("") == "unnamed"
    assert safe_filename("..").startswith("unnamed_")


def test_long_names_are_capped_and_stay_distinct() -> None:
    a, b = "x" * 10_000 + "a", "x" * 10_000 + "b"
    assert safe_filename(a) != safe_filename(b)
    assert len(safe_filename(a)) == 100
    assert len(safe_filename(a, max_len=20)) == 20
    assert safe_filename("y" * 100) == "y" * 100  # exactly at the limit: untouched
    with pytest.raises(ValueError):
        safe_filename("abc", max_len=5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plain text", "plain text"),
        ("esc\x1b[31mred", "esc\\x1b[31mred"),
        ("cr\rlf\ntab\t", "cr\\rlf\\ntab\\t"),
        ("bell\x07nul\x00del\x7f", "bell\\x07nul\\x00del\\x7f"),
        ("csi\x9b2J", "csi\\x9b2J"),
        ("rlo\u202eabc", "rlo\\u202eabc"),
        ("ümlaut 日本", "ümlaut 日本"),
    ],
)
def test_escape_terminal(text: str, expected: str) -> None:
    out = escape_terminal(text)
    assert out == expected
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in out)
