from fractions import Fraction

import pytest

from rspo_mega.tasks.gsm8k import extract_gsm8k_prediction, parse_gsm8k_gold, score_gsm8k


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("<reasoning>6*3</reasoning><answer>18</answer>", "18"),
        ("<answer>1,234</answer>", "1234"),
        ("<answer>$1,234.00</answer>", "1234"),
        ("<answer>18 dollars.</answer>", "18"),
        ("<answer>She has 18 eggs left.</answer>", "18"),
        ("<answer>\\boxed{18}</answer>", "18"),
        ("<answer>The total is $\\boxed{\\$18}$.</answer>", "18"),
        ("<answer>-5</answer>", "-5"),
        ("<answer>\u22125</answer>", "-5"),
        ("<answer>50%</answer>", "50"),
        ("<answer>\\frac{1}{2}</answer>", "0.5"),
        ("<answer>\\dfrac{3}{4}</answer>", "0.75"),
        ("<answer>3/4</answer>", "0.75"),
        ("<answer>.5</answer>", "0.5"),
        ("<answer>18.</answer>", "18"),
        ("<answer>1{,}000</answer>", "1000"),
        ("no tags, so the last number counts: 7 + 11 = 18", "18"),
        ("no tags but boxed \\boxed{42} then 7 more words 3", "42"),
        ("<answer>18</answer><|eot_id|> junk 99", "18"),
        ("<answer>unterminated 18", "18"),
    ],
)
def test_correct_variants(completion: str, gold: str) -> None:
    assert score_gsm8k(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("<answer>17</answer>", "18"),
        ("<answer>5</answer>", "-5"),
        ("<answer>0.49</answer>", "0.5"),
        ("<answer>no number here</answer> 18", "18"),  # the block wins over the fallback
        ("", "18"),
        ("<answer></answer>", "18"),
        ("<answer>18</answer> <answer>19</answer>", "18"),  # the last block counts
    ],
)
def test_wrong_or_missing(completion: str, gold: str) -> None:
    assert score_gsm8k(completion, gold) == 0.0


def test_gold_parsing() -> None:
    assert parse_gsm8k_gold("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,234") == 1234
    assert parse_gsm8k_gold("#### -7") == -7
    assert parse_gsm8k_gold("42") == 42
    with pytest.raises(ValueError, match="answer"):
        parse_gsm8k_gold("reasoning without a final number ####")


def test_prediction_is_exact_rational() -> None:
    assert extract_gsm8k_prediction("<answer>2.50</answer>") == Fraction(5, 2)
    assert extract_gsm8k_prediction("<answer>ten</answer>") is None
