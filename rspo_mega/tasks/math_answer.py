"""MATH-style answers: \\boxed{} extraction, normalisation and (time-limited) equivalence.

Equivalence is decided in three tiers, cheapest first:
  1. normalised strings equal ("\\dfrac12" == "\\frac{1}{2}", "10\\text{ cm}" == "10");
  2. both are plain numbers (ints, decimals, a/b, \\frac{a}{b}) with equal exact values;
  3. symbolic: both are parsed by `latex_sympy` (own grammar, no eval) and compared with sympy
     in a separate process that is killed when it exceeds `timeout_s`.
"""

from __future__ import annotations

import re

from rspo_mega.tasks.answer_format import MAX_COMPLETION_CHARS, clip_completion, extract_answer_block
from rspo_mega.tasks.numeric import parse_number

__all__ = [
    "MAX_ANSWER_CHARS",
    "DEFAULT_SYMBOLIC_TIMEOUT_S",
    "last_boxed",
    "extract_math_answer",
    "normalize_math_answer",
    "math_answers_equal",
]

MAX_ANSWER_CHARS = 512
DEFAULT_SYMBOLIC_TIMEOUT_S = 2.0

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed 5`.

    Returns None when there is none or its braces never close.
    """
    text = text[-MAX_COMPLETION_CHARS:]
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None
    match = re.match(r"[^\s$<]+", text[i:])
    return match.group(0) if match and i > start + len(command) else None


def extract_math_answer(completion: str) -> str | None:
    """The answer string: the last \\boxed{} inside the answer block, else the whole block;
    without an answer block, the last \\boxed{} of the completion."""
    text = clip_completion(completion)
    block = extract_answer_block(text)
    if block is not None:
        boxed = last_boxed(block)
        return boxed if boxed is not None else (block or None)
    return last_boxed(text)


_LITERAL_REPLACEMENTS = (
    ("\n", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", ""),
    ("~", ""),
    ("\\displaystyle", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("^\\circ", ""),
    ("^{\\circ}", ""),
    ("\u00b0", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\$", ""),
    ("$", ""),
    ("\u2212", "-"),
)
_REGEX_REPLACEMENTS = (
    (re.compile(r"\\(?:left|right|big|Big|bigl|bigr|Bigl|Bigr)(?![a-zA-Z])"), ""),
    # a unit after a number: 10\text{ cm} -> 10
    (re.compile(r"([0-9}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(?:\^[0-9])?"), r"\1"),
    (re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*([0-9a-zA-Z])\s*\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\s*\{([^{}]*)\}\s*([0-9a-zA-Z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt\s*([0-9a-zA-Z])"), r"\\sqrt{\1}"),
    (re.compile(r"\s+"), ""),
    (re.compile(r"(?<![0-9])\.([0-9])"), r"0.\1"),
)
_GROUPED_INT = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_SINGLE_VAR_LHS = re.compile(r"[a-zA-Z]=([^=]+)")


def normalize_math_answer(answer: str) -> str:
    """Canonical string form of an answer; "" for empty or over-long (> MAX_ANSWER_CHARS) input."""
    s = answer.strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return ""
    if s.startswith(_BOX_COMMANDS):
        s = last_boxed(s) or s
    for old, new in _LITERAL_REPLACEMENTS:
        s = s.replace(old, new)
    for pattern, replacement in _REGEX_REPLACEMENTS:
        s = pattern.sub(replacement, s)
    single_var = _SINGLE_VAR_LHS.fullmatch(s)
    if single_var:
        s = single_var.group(1)
    if _GROUPED_INT.fullmatch(s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _closes_at_end(s):
        s = s[1:-1]
    return s


def _closes_at_end(s: str) -> bool:
    """True when the opening brace at s[0] is matched by the closing brace at s[-1]."""
    depth = 0
    for j, char in enumerate(s):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return j == len(s) - 1
    return False


def math_answers_equal(
    prediction: str, gold: str, *, timeout_s: float = DEFAULT_SYMBOLIC_TIMEOUT_S
) -> bool:
    """Whether two answers are mathematically equal (see the module docstring for the tiers)."""
    pred, ref = normalize_math_answer(prediction), normalize_math_answer(gold)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    pred_value, ref_value = parse_number(pred), parse_number(ref)
    if pred_value is not None and ref_value is not None:
        return pred_value == ref_value

    from rspo_mega.tasks import latex_sympy, symbolic_worker

    try:  # reject what the grammar cannot read without a process round trip
        latex_sympy.tokenize(pred)
        latex_sympy.tokenize(ref)
    except latex_sympy.LatexParseError:
        return False
    return symbolic_worker.symbolic_equal(pred, ref, timeout_s=timeout_s)
