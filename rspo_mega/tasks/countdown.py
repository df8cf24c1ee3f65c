"""Countdown: combine 3-4 given numbers with + - * / (each exactly once) to reach a target.

Generator: problems are built from a random expression over the numbers, so each one is
solvable by construction (intermediate values stay positive integers). The train/test split
is a fixed hash of the canonical problem (sorted numbers, target), independent of the seed,
so no test problem can ever be generated for train. With ``hold_out_validation`` the next hash
bucket (``VALIDATION_FRACTION`` of the problems) forms a validation split and leaves train.

Verifier: the answer block's equation is parsed with `ast` and evaluated by walking the tree
over a whitelist (integer literals, binary + - * /, parentheses) in exact Fraction arithmetic,
with length, depth and magnitude limits. Score 1.0 correct, 0.1 well-formed but wrong, 0.0 none.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from rspo_mega.data.example import Example, make_uid
from rspo_mega.tasks.answer_format import RESPONSE_FORMAT, clip_completion, extract_answer_block
from rspo_mega.tasks.base import Task

__all__ = [
    "CountdownTask",
    "countdown_split",
    "generate_countdown",
    "solve_countdown",
    "evaluate_equation",
    "score_countdown",
]

CORRECT, WELL_FORMED, NO_ANSWER = 1.0, 0.1, 0.0
MAX_EQUATION_CHARS = 128
MAX_DEPTH = 16
MAX_VALUE_BITS = 128  # numerator/denominator size limit for intermediate results
VALIDATION_FRACTION = 0.05  # hash bucket of the validation problems, right after the test bucket
_EQUATION_CHARS = re.compile(r"[0-9+\-*/() ]+")
_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class InvalidEquation(ValueError):
    """The equation is outside the whitelisted grammar or beyond a size limit."""


def countdown_split(numbers: Sequence[int], target: int, test_fraction: float = 0.1,
                    validation_fraction: float = 0.0) -> str:
    """"train", "validation" or "test" for a problem; a fixed function of (sorted numbers,
    target) (no validation problems with ``validation_fraction=0``)."""
    key = f"{sorted(int(n) for n in numbers)}|{int(target)}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64
    if bucket < test_fraction:
        return "test"
    return "validation" if bucket < test_fraction + validation_fraction else "train"


def _random_problem(
    rng: random.Random, max_number: int, counts: Sequence[int] = (3, 4)
) -> tuple[list[int], int, str]:
    """Numbers (how many: one of `counts`), the value of a random expression over all of them,
    and that expression."""
    numbers = [rng.randint(1, max_number) for _ in range(rng.choice(tuple(counts)))]
    pool = [(n, str(n)) for n in numbers]
    while len(pool) > 1:
        (a, expr_a), (b, expr_b) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        if a < b:
            (a, expr_a), (b, expr_b) = (b, expr_b), (a, expr_a)
        choices = [("+", a + b), ("*", a * b)]
        if a > b:
            choices.append(("-", a - b))
        if a % b == 0 and b > 1:
            choices.append(("/", a // b))
        op, value = rng.choice(choices)
        pool.append((value, f"({expr_a} {op} {expr_b})"))
    value, expr = pool[0]
    return numbers, value, expr[1:-1]


def generate_countdown(
    split: str,
    num_examples: int,
    seed: int,
    *,
    max_number: int = 99,
    min_target: int = 10,
    max_target: int = 100,
    counts: Sequence[int] = (3, 4),
    test_fraction: float = 0.1,
    hold_out_validation: bool = False,
) -> list[Example]:
    """`num_examples` distinct solvable problems of `split`, reproducible from `seed`.

    Each problem has `len(numbers)` in `counts`, numbers in [1, max_number] and a target in
    [min_target, max_target]. Example.answer is the target (int); meta holds "numbers"
    (list[int]) and a reference "solution" expression.
    """
    if split == "validation" and not hold_out_validation:
        raise ValueError("the countdown validation split exists only with hold_out_validation="
                         "True (its problems then leave train)")
    share = VALIDATION_FRACTION if hold_out_validation else 0.0
    rng = random.Random(f"countdown|{split}|{seed}")
    seen: set[tuple[tuple[int, ...], int]] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < num_examples:
        attempts += 1
        if attempts > 1000 * num_examples + 10_000:
            raise RuntimeError(
                f"countdown generator found only {len(examples)} distinct {split} problems of "
                f"{num_examples} requested: numbers 1..{max_number}, {'/'.join(map(str, counts))} "
                f"per problem and targets {min_target}..{max_target} may not hold that many"
            )
        numbers, target, solution = _random_problem(rng, max_number, counts)
        key = (tuple(sorted(numbers)), target)
        if not min_target <= target <= max_target or key in seen:
            continue
        if countdown_split(numbers, target, test_fraction, share) != split:
            continue
        seen.add(key)
        uid = make_uid("countdown", split, f"seed={seed}", len(examples))
        meta = {"numbers": numbers, "solution": solution}
        examples.append(Example(uid, _problem_text(numbers, target), target, "countdown", meta))
    return examples


def solve_countdown(numbers: Sequence[int], target: int) -> str | None:
    """An expression using every number exactly once that equals `target`, or None (exhaustive)."""
    def search(pool: list[tuple[Fraction, str]]) -> str | None:
        if len(pool) == 1:
            return pool[0][1] if pool[0][0] == target else None
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                (a, ea), (b, eb) = pool[i], pool[j]
                rest = [pool[k] for k in range(len(pool)) if k not in (i, j)]
                candidates = [(a + b, f"({ea} + {eb})"), (a - b, f"({ea} - {eb})"), (a * b, f"({ea} * {eb})")]
                if b != 0:
                    candidates.append((a / b, f"({ea} / {eb})"))
                for value, expr in candidates:
                    found = search(rest + [(value, expr)])
                    if found is not None:
                        return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def _evaluate(node: ast.AST, used: list[int], depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise InvalidEquation("equation nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left = _evaluate(node.left, used, depth + 1)
        right = _evaluate(node.right, used, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError("division by zero in equation")
        value = _OPERATORS[type(node.op)](left, right)
        if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_VALUE_BITS:
            raise InvalidEquation("intermediate value too large")
        return value
    raise InvalidEquation(f"disallowed syntax {type(node).__name__}")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]]:
    """(value, integer literals used) of an arithmetic expression; raises InvalidEquation or
    ZeroDivisionError. Nothing is executed: the AST is walked over a whitelist."""
    if len(equation) > MAX_EQUATION_CHARS:
        raise InvalidEquation(f"equation longer than {MAX_EQUATION_CHARS} characters")
    if not _EQUATION_CHARS.fullmatch(equation):
        raise InvalidEquation("equation has characters other than digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(equation.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise InvalidEquation(f"not an expression: {err}") from err
    used: list[int] = []
    return _evaluate(tree.body, used, 0), used


def _equation_from_answer(block: str) -> str:
    """The expression side of "expr", "expr = target" or "target = expr", with ×/÷ spelled as * /."""
    text = block.replace("\\times", "*").replace("\\div", "/").replace("\u00d7", "*").replace("\u00f7", "/")
    text = text.replace("$", "").strip().rstrip(".").strip()
    if "=" in text:
        sides = [side.strip() for side in text.split("=")]
        text = max(sides, key=lambda side: sum(side.count(op) for op in "+-*/"))
    return text


def score_countdown(completion: str, numbers: Sequence[int], target: int) -> float:
    """1.0 if the answer's equation uses each number exactly once and equals `target`;
    0.1 if it is a valid equation but wrong (value or numbers); 0.0 if missing/unparseable."""
    block = extract_answer_block(clip_completion(completion))
    if not block:
        return NO_ANSWER
    equation = _equation_from_answer(block[: 4 * MAX_EQUATION_CHARS])
    try:
        value, used = evaluate_equation(equation)
    except ZeroDivisionError:
        return WELL_FORMED
    except InvalidEquation:
        return NO_ANSWER
    if sorted(used) != sorted(int(n) for n in numbers) or value != target:
        return WELL_FORMED
    return CORRECT


def _problem_text(numbers: Sequence[int], target: int) -> str:
    return f"Numbers: {', '.join(str(n) for n in numbers)}\nTarget: {target}"


def _parse_numbers(value: Any) -> list[int]:
    if isinstance(value, str):
        found = re.findall(r"-?[0-9]+", value)
        if not found:
            raise ValueError(f"field 'numbers' has no integers: {value!r}")
        return [int(n) for n in found]
    try:
        return [int(n) for n in value]
    except (TypeError, ValueError) as err:
        raise ValueError(f"field 'numbers' is not a list of integers: {value!r}") from err


class CountdownTask(Task):
    """Fields: `numbers` (default column "nums"), `target` (default column "target").

    The generator's problem size is set at construction: `min_numbers`-`max_numbers` numbers
    drawn from [1, max_number], targets in [min_target, max_target] (the defaults are d1-style
    problems).
    """

    name = "countdown"
    default_fields = {"numbers": "nums", "target": "target"}
    default_num_examples = {"train": 20_000, "validation": 512, "test": 512}

    def __init__(
        self,
        *,
        max_number: int = 99,
        min_target: int = 10,
        max_target: int = 100,
        min_numbers: int = 3,
        max_numbers: int = 4,
    ) -> None:
        if max_number < 1:
            raise ValueError(f"max_number must be >= 1, got {max_number}")
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"needs 2 <= min_numbers <= max_numbers, got min_numbers={min_numbers}, "
                             f"max_numbers={max_numbers}")
        if not 1 <= min_target <= max_target:
            raise ValueError(f"needs 1 <= min_target <= max_target, got min_target={min_target}, "
                             f"max_target={max_target}")
        self.max_number, self.min_target, self.max_target = max_number, min_target, max_target
        self.counts = tuple(range(min_numbers, max_numbers + 1))

    def generate(self, split: str, *, seed: int, num_examples: int | None,
                 hold_out_validation: bool = False) -> list[Example]:
        return generate_countdown(
            split, num_examples or self.default_num_examples[split], seed, max_number=self.max_number,
            min_target=self.min_target, max_target=self.max_target, counts=self.counts,
            hold_out_validation=hold_out_validation,
        )

    def reference_answer(self, example: Example) -> str:
        """The generator's expression, or one found by the exhaustive solver for file problems."""
        solution = example.meta.get("solution") or solve_countdown(example.meta["numbers"], int(example.answer))
        if solution is None:
            raise ValueError(f"countdown example {example.uid} has no solution to train on")
        return solution

    def example_from_record(self, record: Mapping[str, Any], uid: int) -> Example:
        numbers = _parse_numbers(record["numbers"])
        try:
            target = int(record["target"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"field 'target' is not an integer: {record['target']!r}") from err
        return Example(uid, _problem_text(numbers, target), target, self.name, {"numbers": numbers})

    def prompt(self, example: Example) -> str:
        numbers = ", ".join(str(n) for n in example.meta["numbers"])
        return (
            f"Using the numbers [{numbers}], write an equation that equals {example.answer}. "
            "You may use +, -, * and / with parentheses, and must use every number exactly once. "
            "Put only the equation (for example (4 + 6) * 2) inside the answer tags.\n"
            f"{RESPONSE_FORMAT}"
        )

    def reward(self, completion: str, example: Example) -> float:
        return score_countdown(completion, example.meta["numbers"], int(example.answer))
