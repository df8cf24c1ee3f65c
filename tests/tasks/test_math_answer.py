import time

import pytest

from rspo_mega.tasks import latex_sympy
from rspo_mega.tasks.math500 import score_math
from rspo_mega.tasks.math_answer import extract_math_answer, last_boxed, math_answers_equal, normalize_math_answer
from rspo_mega.tasks.symbolic_worker import SymbolicEqualityWorker


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{x^{2}+\\sqrt{\\frac{a}{b}}}", "x^{2}+\\sqrt{\\frac{a}{b}}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 and more", "5"),
        ("\\boxed{unbalanced {", None),
        ("nothing boxed", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_extract_prefers_answer_block() -> None:
    assert extract_math_answer("\\boxed{1} <answer>$\\boxed{2}$</answer>") == "2"
    assert extract_math_answer("<answer> 3\\pi </answer>") == "3\\pi"
    assert extract_math_answer("reasoning \\boxed{4}") == "4"
    assert extract_math_answer("no answer at all") is None


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{1}{2}", "0.5"),
        ("-\\frac{3}{4}", "-0.75"),
        ("10,000", "10000"),
        ("50\\%", "50"),
        ("90^\\circ", "90"),
        ("10\\text{ cm}", "10"),
        ("\\text{(C)}", "(C)"),
        ("x = 5", "5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\sqrt[3]{8}", "2"),
        ("(-\\infty, 3]", "(-\\infty,3]"),
        ("y = 2x + 3", "y=3+2x"),
        ("\\$18.00", "18"),
    ],
)
def test_equivalent(prediction: str, gold: str) -> None:
    assert math_answers_equal(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("\\frac{3}{4}", "0.7"),
        ("0.333", "\\frac{1}{3}"),
        ("(1,2)", "[1,2]"),
        ("(1,2)", "(1,2,3)"),
        ("2x", "2y"),
        ("-5", "5"),
        ("", "5"),
        ("\\text{(B)}", "\\text{(C)}"),
    ],
)
def test_not_equivalent(prediction: str, gold: str) -> None:
    assert not math_answers_equal(prediction, gold)


def test_normalize() -> None:
    assert normalize_math_answer("\\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert normalize_math_answer("  \\left[ 1, 2 \\right) ") == "[1,2)"
    assert normalize_math_answer("x" * 600) == ""


def test_score_math() -> None:
    assert score_math("<reasoning>...</reasoning><answer>\\boxed{\\dfrac{\\pi}{2}}</answer>", "\\frac{\\pi}{2}") == 1.0
    assert score_math("<answer>\\boxed{3}</answer>", "4") == 0.0
    assert score_math("no answer", "4") == 0.0


def test_parser_guards() -> None:
    with pytest.raises(latex_sympy.LatexParseError):
        latex_sympy.parse_expression(latex_sympy.tokenize("9^{9^{9^{9}}}"))
    with pytest.raises(latex_sympy.LatexParseError):
        latex_sympy.parse_expression(latex_sympy.tokenize("(" * 200 + "1" + ")" * 200))
    with pytest.raises(latex_sympy.LatexParseError):
        latex_sympy.tokenize("__import__('os')")
    assert latex_sympy.expressions_equal("2^{10}", "1024")


def test_worker_is_killed_on_timeout_and_restarts() -> None:
    worker = SymbolicEqualityWorker()
    try:
        assert worker.equal("(x+1)^2", "x^2+2x+1", timeout_s=60.0)  # starts the worker
        start = time.perf_counter()
        assert not worker.equal("\\sin(x)^2+\\cos(x)^2", "1", timeout_s=1e-4)
        assert time.perf_counter() - start < 1.0
        assert worker._process is None  # killed
        assert worker.equal("\\sin(x)^2+\\cos(x)^2", "1", timeout_s=60.0)  # a fresh worker
    finally:
        worker.close()
