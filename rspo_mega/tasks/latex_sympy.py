"""A small LaTeX-math grammar parsed into sympy by recursive descent (no eval, no sympy parsers).

Grammar (after `math_answer.normalize_math_answer`):
    answer   := side ('=' side)*           sides compared pairwise
    side     := items | open items close   top-level commas: tuples, intervals, lists
    expr     := term (('+'|'-') term)*
    term     := unary (('*'|'/'|\\cdot|\\times|\\div) unary | implicit-product power)*
    unary    := ('+'|'-') unary | power
    power    := atom ['^' unary]
    atom     := number | letter | greek | \\pi | \\infty | '(' expr ')' | '{' expr '}'
              | \\frac{expr}{expr} | \\sqrt[expr]{expr} | func (group | power)

Everything outside the grammar raises `LatexParseError`. Guards: input length, nesting depth,
and the size of numeric powers (9^9^9 is rejected before sympy evaluates it). Meant to run inside
`symbolic_worker`, which also bounds wall time.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import sympy

__all__ = ["LatexParseError", "Token", "tokenize", "parse_expression", "expressions_equal"]

MAX_INPUT_CHARS = 512
MAX_DEPTH = 64
MAX_EXPONENT = 1000
MAX_POWER_BITS = 20_000  # |exponent| * log2|base| for numeric powers

_FUNCTIONS = {
    "sqrt": sympy.sqrt,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "cot": sympy.cot,
    "sec": sympy.sec,
    "csc": sympy.csc,
    "arcsin": sympy.asin,
    "arccos": sympy.acos,
    "arctan": sympy.atan,
    "log": sympy.log,
    "ln": sympy.log,
    "exp": sympy.exp,
}
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "phi", "psi", "omega", "sigma", "tau"}
_OPERATOR_COMMANDS = {"cdot": "*", "times": "*", "div": "/"}
_OPEN, _CLOSE = "([{", ")]}"
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+")
_WORD = re.compile(r"[a-zA-Z]+")
# Plain-text function names a model may write without a backslash, longest first.
_PLAIN_FUNCTIONS = sorted(
    ("sqrt", "arcsin", "arccos", "arctan", "sin", "cos", "tan", "log", "ln", "exp", "pi"), key=len, reverse=True
)


class LatexParseError(ValueError):
    """The text is outside the supported grammar or beyond a size guard."""


class Token(NamedTuple):
    kind: str  # num | sym | const | func | frac | op | open | close | comma | eq
    text: str


def tokenize(text: str) -> list[Token]:
    """Split normalised LaTeX into tokens; raises LatexParseError on anything unknown."""
    if len(text) > MAX_INPUT_CHARS:
        raise LatexParseError(f"input longer than {MAX_INPUT_CHARS} characters")
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "0123456789." and (number := _NUMBER.match(text, i)):
            tokens.append(Token("num", number.group(0)))
            i = number.end()
        elif char == "\\":
            word = _WORD.match(text, i + 1)
            if word is None:
                if text[i + 1 : i + 2] in ("{", "}"):  # \{ \} set braces
                    tokens.append(Token("open" if text[i + 1] == "{" else "close", text[i + 1]))
                    i += 2
                    continue
                raise LatexParseError(f"unsupported escape at {text[i:i + 8]!r}")
            tokens.append(_command_token(word.group(0)))
            i = word.end()
        elif char.isascii() and char.isalpha():
            name = next((f for f in _PLAIN_FUNCTIONS if text.startswith(f, i)), char)
            tokens.append(_command_token(name) if len(name) > 1 else Token("sym", char))
            i += len(name)
        elif char == "*" and text.startswith("**", i):
            tokens.append(Token("op", "^"))
            i += 2
        elif char in "+-*/^":
            tokens.append(Token("op", char))
            i += 1
        elif char in _OPEN:
            tokens.append(Token("open", char))
            i += 1
        elif char in _CLOSE:
            tokens.append(Token("close", char))
            i += 1
        elif char in ",=":
            tokens.append(Token("comma" if char == "," else "eq", char))
            i += 1
        else:
            raise LatexParseError(f"unsupported character {char!r}")
    return tokens


def _command_token(name: str) -> Token:
    if name == "frac":
        return Token("frac", name)
    if name in _FUNCTIONS:
        return Token("func", name)
    if name in _CONSTANTS:
        return Token("const", name)
    if name in _GREEK:
        return Token("sym", name)
    if name in _OPERATOR_COMMANDS:
        return Token("op", _OPERATOR_COMMANDS[name])
    raise LatexParseError(f"unsupported command \\{name}")


def _safe_pow(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if exponent.is_Number:
        if abs(exponent) > MAX_EXPONENT:
            raise LatexParseError(f"exponent {exponent} larger than {MAX_EXPONENT}")
        if base.is_Number and abs(base) > 1:
            magnitude_bits = max(abs(base.p), abs(base.q)).bit_length() if base.is_Rational else 64
            if float(abs(exponent)) * magnitude_bits > MAX_POWER_BITS:
                raise LatexParseError("numeric power too large")
    return sympy.Pow(base, exponent)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def parse(self) -> sympy.Expr:
        if not self.tokens:
            raise LatexParseError("empty expression")
        value = self.expr()
        if self.pos != len(self.tokens):
            raise LatexParseError(f"unexpected token {self.tokens[self.pos].text!r}")
        return value

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            raise LatexParseError("unexpected end of expression")
        self.pos += 1
        return token

    def expr(self) -> sympy.Expr:
        value = self.term()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in "+-":
            self.take()
            rhs = self.term()
            value = value + rhs if token.text == "+" else value - rhs
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while (token := self.peek()) is not None:
            if token.kind == "op" and token.text in "*/":
                self.take()
                rhs = self.unary()
                value = value * rhs if token.text == "*" else value / rhs
            elif token.kind in ("num", "sym", "const", "func", "frac") or (
                token.kind == "open" and token.text in "({"
            ):
                value = value * self.power()  # implicit product: 2x, 3\sqrt{2}, (a)(b)
            else:
                break
        return value

    def unary(self) -> sympy.Expr:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise LatexParseError(f"nesting deeper than {MAX_DEPTH}")
            token = self.peek()
            if token is not None and token.kind == "op" and token.text in "+-":
                self.take()
                value = self.unary()
                return -value if token.text == "-" else value
            return self.power()
        finally:
            self.depth -= 1

    def power(self) -> sympy.Expr:
        base = self.atom()
        token = self.peek()
        if token is not None and token.kind == "op" and token.text == "^":
            self.take()
            return _safe_pow(base, self.unary())
        return base

    def group(self, opener: str = "{") -> sympy.Expr:
        token = self.take()
        if token.kind != "open" or token.text != opener:
            raise LatexParseError(f"expected {opener!r}, got {token.text!r}")
        value = self.expr()
        closing = self.take()
        if closing.kind != "close":
            raise LatexParseError(f"expected a closing bracket, got {closing.text!r}")
        return value

    def atom(self) -> sympy.Expr:
        token = self.take()
        if token.kind == "num":
            return sympy.Rational(token.text)
        if token.kind == "sym":
            return sympy.Symbol(token.text)
        if token.kind == "const":
            return _CONSTANTS[token.text]
        if token.kind == "open" and token.text in "({":
            self.pos -= 1
            return self.group(token.text)
        if token.kind == "frac":
            return self.group() / self.group()
        if token.kind == "func":
            return self.function(token.text)
        raise LatexParseError(f"unexpected token {token.text!r}")

    def function(self, name: str) -> sympy.Expr:
        nxt = self.peek()
        if name == "sqrt" and nxt is not None and nxt.text == "[":
            index = self.group("[")
            if not (index.is_Integer and 2 <= index <= MAX_EXPONENT):
                raise LatexParseError(f"unsupported root index {index}")
            return sympy.root(self.group_or_power(), index)
        return _FUNCTIONS[name](self.group_or_power())

    def group_or_power(self) -> sympy.Expr:
        nxt = self.peek()
        if nxt is not None and nxt.kind == "open" and nxt.text in "({":
            return self.group(nxt.text)
        return self.power()


def parse_expression(tokens: list[Token]) -> sympy.Expr:
    """Parse one expression (no top-level commas or '=')."""
    return _Parser(tokens).parse()


def _split(tokens: list[Token], kind: str) -> list[list[Token]]:
    """Split at top-level (bracket depth 0) tokens of `kind`."""
    parts: list[list[Token]] = [[]]
    depth = 0
    for token in tokens:
        depth += (token.kind == "open") - (token.kind == "close")
        if depth == 0 and token.kind == kind:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def _sequence(tokens: list[Token]) -> tuple[str, str, list[list[Token]]]:
    """(open, close, items): "(1,2]" -> ("(", "]", [[1], [2]]); a plain expression -> ("", "", [tokens])."""
    parts = _split(tokens, "comma")
    if len(parts) > 1:
        return "", "", parts
    if len(tokens) >= 2 and tokens[0].kind == "open" and tokens[-1].kind == "close":
        inner = _split(tokens[1:-1], "comma")
        depth = 0
        closes_at_end = True
        for token in tokens[:-1]:
            depth += (token.kind == "open") - (token.kind == "close")
            closes_at_end &= depth > 0
        if len(inner) > 1 and closes_at_end:
            return tokens[0].text, tokens[-1].text, inner
    return "", "", [tokens]


def _values_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a == b:
        return True
    difference = sympy.simplify(a - b)
    if difference == 0:
        return True
    if difference.is_number:
        scale = abs(complex(sympy.N(b))) if b.is_number else 1.0
        return abs(complex(sympy.N(difference))) <= 1e-9 * max(1.0, scale)
    return False


def expressions_equal(a: str, b: str) -> bool:
    """Whether two normalised answers are equal: same '='-sides, same tuple/interval shape and
    brackets, and every pair of items symbolically (or, for constants, numerically) equal."""
    sides_a, sides_b = _split(tokenize(a), "eq"), _split(tokenize(b), "eq")
    if len(sides_a) != len(sides_b):
        return False
    for side_a, side_b in zip(sides_a, sides_b):
        open_a, close_a, items_a = _sequence(side_a)
        open_b, close_b, items_b = _sequence(side_b)
        if (open_a, close_a, len(items_a)) != (open_b, close_b, len(items_b)):
            return False
        for item_a, item_b in zip(items_a, items_b):
            if not _values_equal(parse_expression(item_a), parse_expression(item_b)):
                return False
    return True
