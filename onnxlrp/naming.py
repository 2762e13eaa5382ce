"""Make strings that come from a model safe to use in file names and to print on a terminal.

Node, tensor and class names inside an ONNX file are chosen by whoever wrote the file.  They can
contain path separators (``../../etc/cron.d/x``), control characters, escape sequences that drive a
terminal, or be megabytes long.  Every such name goes through :func:`safe_filename` before it becomes
part of an output path, and through :func:`escape_terminal` before it is printed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["safe_filename", "escape_terminal"]

# Characters kept as they are in a file name; everything else becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Runs of two or more dots ("..", "...") become "_" so no piece of a name reads as a parent folder.
_DOTS = re.compile(r"\.{2,}")
_UNDERSCORES = re.compile(r"_{2,}")
# Names Windows reserves for devices, whatever the extension.
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9]|conin\$|conout\$)(\..*)?$", re.IGNORECASE)
_HASH_LEN = 8
_FALLBACK = "unnamed"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


def safe_filename(name: str, max_len: int = 100) -> str:
    """Turn an arbitrary (model-provided) string into one safe path component.

    The result:

    - contains only ASCII letters, digits, ``.``, ``_`` and ``-`` (path separators, spaces, non-ASCII
      and all other characters become ``_``; control characters and NUL are dropped);
    - contains no ``..`` (runs of dots become ``_``), does not start with ``.``, ``-`` or ``_`` (no
      hidden files, nothing a command line reads as an option) and does not end with ``.``;
    - is never empty (``"unnamed"``) and never a Windows device name (``CON``, ``NUL``... get a
      leading ``_``, the one exception to the rule above);
    - is at most ``max_len`` characters.  A longer name is cut and ends in ``_`` plus 8 hex digits of
      the SHA-256 of the *original* name, so distinct long names stay distinct.

    Distinct short names may still map to the same result (``"a/b"`` and ``"a_b"``); callers that
    need unique names must deduplicate.
    """
    if not isinstance(name, str):
        raise TypeError(f"safe_filename expects a str, got {type(name).__name__}")
    if max_len < _HASH_LEN + 2:
        raise ValueError(f"max_len must be at least {_HASH_LEN + 2}")
    original = name
    # Drop control characters (C0, DEL, C1), NUL included, and other invisible format characters.
    text = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
    text = _DOTS.sub("_", text)
    text = _UNSAFE.sub("_", text)
    text = _UNDERSCORES.sub("_", text)
    text = text.lstrip("._-").rstrip(".")
    if not text or set(text) <= {"_"}:
        text = _FALLBACK if not original else f"{_FALLBACK}_{_digest(original)}"
    if _WINDOWS_RESERVED.match(text):
        text = "_" + text
    if len(text) > max_len:
        keep = max_len - _HASH_LEN - 1
        text = f"{text[:keep].rstrip('.')}_{_digest(original)}"
    return text


# C0 controls, DEL and C1 controls, plus the Unicode line/paragraph separators and the bidirectional
# overrides/isolates that can make a printed name read differently from what it is.
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_terminal(text: str) -> str:
    """Return ``text`` with every character that could drive a terminal written as an escape.

    C0 controls (ESC, BEL, CR, LF, TAB, NUL...), DEL, the C1 controls U+0080-U+009F (CSI U+009B among
    them), the Unicode line/paragraph separators and the bidirectional override characters become
    ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x07``, ``\\u202e`` and so on, so the result is one line of
    inert text.  Printable characters, non-ASCII letters included, are kept.
    """
    return _TERMINAL_UNSAFE.sub(_escape_char, str(text))
