"""Hostile completions: every verifier returns the right score quickly and executes nothing."""

import builtins
import os
import subprocess
import time
from collections.abc import Callable

import pytest

from rspo_mega.tasks import latex_sympy
from rspo_mega.tasks.countdown import score_countdown
from rspo_mega.tasks.gsm8k import score_gsm8k
from rspo_mega.tasks.math500 import score_math
from rspo_mega.tasks.sudoku import score_sudoku

SOLUTION = "1234" "3412" "2143" "4321"
PUZZLE = "1030" "0402" "2100" "4001"

VERIFIERS: dict[str, Callable[[str], float]] = {
    "gsm8k": lambda text: score_gsm8k(text, "18"),
    "math500": lambda text: score_math(text, "18"),
    "countdown": lambda text: score_countdown(text, [4, 6, 2], 5),
    "sudoku": lambda text: score_sudoku(text, PUZZLE, SOLUTION),
}

PAYLOADS = {
    "power_tower": "9**9**9**9",
    "latex_power_tower": "9^{9^{9^{9}}}",
    "nested_parens": "(" * 10_000 + "1" + ")" * 10_000,
    "nested_braces": "\\boxed{" * 5_000 + "1",
    "one_megabyte_digits": "1" * 1_000_000,
    "one_megabyte_text": "x" * 1_000_000,
    "many_answer_tags": "<answer>" * 100_000,
    "import_os": "__import__('os').system('touch {marker}')",
    "open_file": "open('{marker}', 'w').write('x')",
    "arabic_indic_digits": "\u0661\u0668",
    "fullwidth_digits": "\uff11\uff18",
    "fullwidth_sudoku": "\uff11\uff12\uff13\uff14" * 4,
    "nan": "nan",
    "inf": "inf",
    "float_inf": "float('inf')",
    "huge_exponent": "1e999",
    "latex_infinity": "\\infty",
}
FORBIDDEN_IMPORTS = {"os", "subprocess", "shutil", "socket", "ctypes", "importlib"}


IN_PROCESS_EQUALITIES = [("(x+1)^2", "x^2+2x+1"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")]


@pytest.fixture(scope="module", autouse=True)
def warm_up() -> None:
    """Start the symbolic worker and let sympy finish its lazy imports (which exec module code)
    before eval/exec are disabled, so timings and checks below see verification only."""
    assert score_math("<answer>\\boxed{(x+1)^2}</answer>", "x^2+2x+1") == 1.0
    assert all(latex_sympy.expressions_equal(a, b) for a, b in IN_PROCESS_EQUALITIES)


@pytest.fixture
def no_execution(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Make eval/exec/os.system/subprocess raise and record imports of dangerous modules."""
    imported: list[str] = []
    real_import = builtins.__import__

    def recording_import(name, *args, **kwargs):
        imported.append(name.split(".")[0])
        return real_import(name, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("verifier tried to execute something")

    monkeypatch.setattr(builtins, "__import__", recording_import)
    for module, attribute in ((builtins, "eval"), (builtins, "exec"), (os, "system"), (os, "popen")):
        monkeypatch.setattr(module, attribute, forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    yield tmp_path / "pwned", imported
    assert not FORBIDDEN_IMPORTS & set(imported)


@pytest.mark.parametrize("verifier", sorted(VERIFIERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("wrapped", [True, False], ids=["in_answer", "raw"])
def test_payload_scores_zero_fast(verifier: str, payload: str, wrapped: bool, no_execution) -> None:
    marker, _ = no_execution
    body = PAYLOADS[payload].replace("{marker}", str(marker))
    text = f"<reasoning>r</reasoning><answer>{body}</answer>" if wrapped else body
    start = time.perf_counter()
    score = VERIFIERS[verifier](text)
    elapsed = time.perf_counter() - start
    assert score == 0.0
    assert elapsed < 1.0, f"{verifier} took {elapsed:.2f}s on {payload}"
    assert not marker.exists()


def test_non_string_completion_scores_zero() -> None:
    for verify in VERIFIERS.values():
        assert verify(None) == 0.0  # type: ignore[arg-type]


def test_latex_grammar_never_evaluates(no_execution) -> None:
    """The symbolic path itself (normally in the worker) runs here with eval/exec disabled."""
    assert all(latex_sympy.expressions_equal(a, b) for a, b in IN_PROCESS_EQUALITIES)
    for text in ("__import__('os')", "os.system('ls')", "x.__class__", "lambda: 1", "[i for i in x]"):
        with pytest.raises(latex_sympy.LatexParseError):
            latex_sympy.parse_expression(latex_sympy.tokenize(text))
