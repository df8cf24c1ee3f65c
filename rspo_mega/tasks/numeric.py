"""Exact parsing of numbers written in model output (ASCII digits only, no evaluation)."""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MAX_NUMBER_CHARS", "parse_number", "last_number", "strip_number_decorations"]

# Longer digit runs are not answers; they are also kept far below int()'s 4300-digit limit.
MAX_NUMBER_CHARS = 40

_INT = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"  # 1,234,567 or 1234567
_DEC = rf"{_INT}(?:\.[0-9]+)?|\.[0-9]+"
# Optional sign, optional fraction "a/b"; '$' and '%' are stripped before matching.
# A '-' right after a digit, letter or ')' is subtraction, not a sign.
NUMBER_RE = re.compile(rf"(?:(?<![0-9A-Za-z)])-)?(?:{_DEC})(?:\s*/\s*(?:{_DEC}))?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[0-9.,]+)\s*\}\s*\{\s*(-?[0-9.,]+)\s*\}")

_DECORATIONS = (
    ("\u2212", "-"),  # unicode minus
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("{,}", ","),  # LaTeX thousands separator 1{,}000
)


def strip_number_decorations(text: str) -> str:
    """Remove currency/percent signs and LaTeX spacing; rewrite \\frac{a}{b} with numeric a, b as a/b."""
    for old, new in _DECORATIONS:
        text = text.replace(old, new)
    return _FRAC_RE.sub(r"\1/\2", text)


def _to_fraction(token: str) -> Fraction | None:
    token = token.replace(",", "").replace(" ", "")
    if not token or len(token) > MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """Exact value of a string that is just a number, e.g. "-1,234.50", "$5", "50%", "3/4",
    "\\frac{3}{4}", "18." ; None otherwise (including NaN/inf spellings and non-ASCII digits)."""
    text = strip_number_decorations(text.strip()).strip().rstrip(".").strip()
    if len(text) > 2 * MAX_NUMBER_CHARS:
        return None
    match = NUMBER_RE.fullmatch(text)
    if match is None:
        return None
    numerator, _, denominator = text.partition("/")
    value = _to_fraction(numerator)
    if value is None:
        return None
    if denominator:
        divisor = _to_fraction(denominator)
        if divisor is None or divisor == 0:
            return None
        value /= divisor
    return value


def last_number(text: str) -> Fraction | None:
    """Value of the last number-looking token in free text (units and words around it ignored)."""
    text = strip_number_decorations(text)
    last = None
    for match in NUMBER_RE.finditer(text):
        last = match.group(0)
    return None if last is None else parse_number(last)
