"""Prompt text cleaning applied before tokenisation, as Wan's UMT5 path does (`clean='whitespace'`).

Embeddings must match the reference system bit for bit on the token level, so the cleaning is
exactly: ftfy fix, HTML-unescape twice, strip, collapse every whitespace run to one space, strip.
"""

from __future__ import annotations

import html
import re

import ftfy

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Return `text` repaired by ftfy, HTML-unescaped twice and with whitespace runs collapsed."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()
