from fractions import Fraction

import pytest

from rspo_mega.tasks import get_task
from rspo_mega.tasks.countdown import (
    InvalidEquation,
    countdown_split,
    evaluate_equation,
    generate_countdown,
    score_countdown,
    solve_countdown,
)


def _key(example):
    return tuple(sorted(example.meta["numbers"])), example.answer


def test_generated_problems_are_solvable_and_well_shaped() -> None:
    for split in ("train", "test"):
        examples = generate_countdown(split, 150, seed=3)
        for example in examples:
            numbers, target = example.meta["numbers"], example.answer
            assert len(numbers) in (3, 4) and all(1 <= n <= 99 for n in numbers)
            assert 10 <= target <= 100
            solution = solve_countdown(numbers, target)
            assert solution is not None
            assert score_countdown(f"<answer>{solution}</answer>", numbers, target) == 1.0
            assert score_countdown(f"<answer>{example.meta['solution']}</answer>", numbers, target) == 1.0


def test_seed_reproducibility() -> None:
    first = generate_countdown("train", 200, seed=7)
    assert first == generate_countdown("train", 200, seed=7)
    assert [_key(e) for e in first] != [_key(e) for e in generate_countdown("train", 200, seed=8)]
    assert len({e.uid for e in first}) == 200


def test_train_test_disjoint() -> None:
    train = {_key(e) for e in generate_countdown("train", 3000, seed=0)}
    test = {_key(e) for e in generate_countdown("test", 300, seed=0)}
    test_other_seed = {_key(e) for e in generate_countdown("test", 300, seed=1)}
    assert len(train) == 3000 and len(test) == 300
    assert not train & test and not train & test_other_seed
    assert all(countdown_split(list(n), t) == "test" for n, t in test)


def test_validation_split_is_held_out_of_train_only_when_asked() -> None:
    def keys(split, hold, n=300):
        return {_key(e) for e in generate_countdown(split, n, seed=0, hold_out_validation=hold)}

    validation, held_train = keys("validation", True), keys("train", True, 3000)
    assert len(validation) == 300 and not validation & held_train
    assert not validation & keys("test", True)
    assert all(countdown_split(list(n), t, 0.1, 0.05) == "validation" for n, t in validation)
    assert all(countdown_split(list(n), t) == "train" for n, t in validation)  # by default
    with pytest.raises(ValueError, match="hold_out_validation"):
        generate_countdown("validation", 10, seed=0)


def test_solver_reports_unsolvable() -> None:
    assert solve_countdown([1, 1, 1], 100) is None
    assert solve_countdown([4, 6, 2], 5) is not None  # (4 + 6) / 2


@pytest.mark.parametrize(
    "answer, score",
    [
        ("(4 + 6) / 2", 1.0),
        ("6 - 4 / 2 + 2", 0.1),  # valid but wrong value (and reuses 2)
        ("4 + 6 / 2", 0.1),  # uses all numbers, value 7
        ("(4 + 6) / 2 = 5", 1.0),
        ("5 = (4 + 6) / 2", 1.0),
        ("(4 \\times 6) \\div 2 - 7", 0.1),  # numbers 4, 6, 2, 7: wrong multiset
        ("(4 + 6) / (2 - 2)", 0.1),  # division by zero: well-formed, wrong
        ("(4 + 6) // 2", 0.0),
        ("4.0 + 6 - 2", 0.0),
        ("-(4 - 6) + 2", 0.0),  # unary minus is not an allowed operation
        ("five", 0.0),
        ("", 0.0),
    ],
)
def test_scores(answer: str, score: float) -> None:
    assert score_countdown(f"<reasoning>r</reasoning><answer>{answer}</answer>", [4, 6, 2], 5) == score


def test_missing_answer_block_scores_zero() -> None:
    assert score_countdown("(4 + 6) / 2", [4, 6, 2], 5) == 0.0


def test_evaluate_equation_is_exact() -> None:
    assert evaluate_equation("(1 + 2) / 3 * 7") == (Fraction(7), [1, 2, 3, 7])
    with pytest.raises(InvalidEquation):
        evaluate_equation("2 ** 3")


def test_task_interface() -> None:
    task = get_task("countdown")
    example = task.load("test", seed=0, num_examples=5)[0]
    message = task.prompt(example)
    assert str(example.answer) in message and all(str(n) in message for n in example.meta["numbers"])
    assert task.reward(f"<answer>{example.meta['solution']}</answer>", example) == 1.0


def test_problem_size_options() -> None:
    task = get_task("countdown", max_number=9, min_target=1, max_target=30, min_numbers=3, max_numbers=3)
    examples = task.load("train", seed=0, num_examples=200)
    assert len({_key(e) for e in examples}) == 200
    for example in examples:
        numbers = example.meta["numbers"]
        assert len(numbers) == 3 and all(1 <= n <= 9 for n in numbers)
        assert 1 <= example.answer <= 30
        assert task.reward(f"<answer>{task.reference_answer(example)}</answer>", example) == 1.0
    default = get_task("countdown").load("train", seed=0, num_examples=200)
    assert max(max(e.meta["numbers"]) for e in default) > 9  # the options are not the defaults


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_number": 0}, "max_number must be >= 1"),
        ({"min_numbers": 1}, "2 <= min_numbers <= max_numbers"),
        ({"min_numbers": 4, "max_numbers": 3}, "2 <= min_numbers <= max_numbers"),
        ({"min_target": 0}, "1 <= min_target <= max_target"),
    ],
)
def test_bad_problem_size_is_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("countdown", **options)


def test_reference_answer_of_file_problems_comes_from_the_solver() -> None:
    task = get_task("countdown")
    example = task.example_from_record({"numbers": "[4, 6, 2]", "target": 5}, uid=1)
    assert task.reward(f"<answer>{task.reference_answer(example)}</answer>", example) == 1.0
    unsolvable = task.example_from_record({"numbers": [1, 1, 1], "target": 100}, uid=2)
    with pytest.raises(ValueError, match="no solution"):
        task.reference_answer(unsolvable)


def test_too_small_a_problem_space_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"found only \d+ distinct train problems of 500 requested: "
                       r"numbers 1..3, 3 per problem and targets 1..10"):
        generate_countdown("train", 500, 0, max_number=3, min_target=1, max_target=10, counts=(3,))
