import pytest

from rspo_mega.tasks import get_task
from rspo_mega.tasks.sudoku import all_grids, count_solutions, generate_sudoku, grid_split, score_sudoku

PUZZLE = "1000" "0040" "0200" "0003"


def test_there_are_288_valid_grids() -> None:
    grids = all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(count_solutions(grid) == 1 for grid in grids)  # complete and valid


def test_count_solutions() -> None:
    assert count_solutions("0" * 16, limit=10**6) == 288
    assert count_solutions("1100" + "0" * 12) == 0  # clashing clues
    with pytest.raises(ValueError, match="puzzle"):
        count_solutions("12345")


@pytest.mark.parametrize("split", ["train", "test"])
def test_generated_puzzles_have_unique_solutions(split: str) -> None:
    for example in generate_sudoku(split, 200, seed=1):
        puzzle, solution = example.meta["puzzle"], example.answer
        assert count_solutions(puzzle) == 1
        assert 6 <= puzzle.count("0") <= 12
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert grid_split(solution) == split


def test_seed_reproducibility_and_distinct_puzzles() -> None:
    first = generate_sudoku("train", 300, seed=5)
    assert first == generate_sudoku("train", 300, seed=5)
    assert first != generate_sudoku("train", 300, seed=6)
    assert len({e.meta["puzzle"] for e in first}) == 300


def test_train_test_disjoint_by_solution() -> None:
    train = {e.answer for e in generate_sudoku("train", 2000, seed=0)}
    test = {e.answer for e in generate_sudoku("test", 300, seed=0)}
    assert train and test and not train & test
    split_of = {grid: grid_split(grid) for grid in all_grids()}
    assert 30 <= sum(s == "test" for s in split_of.values()) <= 90


def test_validation_split_is_held_out_of_train_only_when_asked() -> None:
    def grids(split, hold):
        return {e.answer for e in generate_sudoku(split, 1500 if split == "train" else 200, seed=0,
                                                  hold_out_validation=hold)}

    validation, test = grids("validation", True), grids("test", True)
    held_train, default_train = grids("train", True), grids("train", False)
    assert not validation & test and not validation & held_train and not test & held_train
    assert validation <= default_train  # without the hold-out, its grids are train grids
    assert {grid_split(g, 0.2, 0.1) for g in validation} == {"validation"}
    assert sum(grid_split(g, 0.2, 0.1) == "validation" for g in all_grids()) == 23
    assert grids("test", False) == test  # the test split does not depend on it
    with pytest.raises(ValueError, match="hold_out_validation"):
        generate_sudoku("validation", 10, seed=0)
    task = get_task("sudoku")
    assert len(task.load("validation", seed=3, num_examples=40, hold_out_validation=True)) == 40


def test_scores() -> None:
    solution = "1234" "3412" "2143" "4321"
    puzzle = "1030" "0402" "2100" "4001"  # 8 empty cells
    assert score_sudoku(f"<answer>{solution}</answer>", puzzle, solution) == 1.0
    rows = "\n".join(" ".join(solution[i : i + 4]) for i in range(0, 16, 4))
    assert score_sudoku(f"<answer>\n{rows}\n</answer>", puzzle, solution) == 1.0
    wrong_two = "1434" "3412" "2143" "4313"  # empty cells 1 and 14 wrong; clue cell 15 changed too
    assert score_sudoku(f"<answer>{wrong_two}</answer>", puzzle, solution) == pytest.approx(6 / 8)
    assert score_sudoku(f"<answer>{solution[:15]}</answer>", puzzle, solution) == 0.0
    assert score_sudoku(solution, puzzle, solution) == 0.0  # no answer block


def test_task_interface() -> None:
    task = get_task("sudoku")
    example = task.load("test", seed=0, num_examples=3)[1]
    assert example.meta["puzzle"] in task.prompt(example)
    assert task.reward(f"<answer>{example.answer}</answer>", example) == 1.0


def test_rows_columns_reasoning_states_the_solution_by_rows_and_columns() -> None:
    from rspo_mega.tasks.sudoku import rows_columns

    text = rows_columns("1432321443212143")
    lines = text.splitlines()
    assert lines[0] == "rows:" and lines[5] == "columns:" and len(lines) == 10
    assert lines[1:5] == ["1 4 3 2", "3 2 1 4", "4 3 2 1", "2 1 4 3"]
    assert lines[6:] == ["1 3 4 2", "4 2 3 1", "3 1 2 4", "2 4 1 3"]


def test_rows_columns_response_scores_and_prompt_says_so() -> None:
    plain, long = get_task("sudoku"), get_task("sudoku", reasoning="rows_columns")
    example = long.load("test", seed=0, num_examples=2)[1]
    response = long.reference_response(example)
    assert response.startswith("<reasoning>\nrows:\n") and long.reward(response, example) == 1.0
    assert plain.reference_response(example) == \
        f"<reasoning>\n\n</reasoning>\n<answer>\n{example.answer}\n</answer>"
    assert "by rows, then by columns" in long.prompt(example)
    assert "by rows, then by columns" not in plain.prompt(example)
    with pytest.raises(ValueError, match="sudoku reasoning 'steps': expected one of"):
        get_task("sudoku", reasoning="steps")
