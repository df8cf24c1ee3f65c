"""4x4 Sudoku (2x2 boxes): puzzles with a unique solution, split disjointly by solution grid.

Grids are 16-character strings read row by row, digits 1-4; puzzles use "0" for empty cells.
Only 288 complete grids exist. Each grid is assigned to train or test by a fixed hash, and
puzzles are carved from their split's grids only, so no test solution is ever seen in train.
With ``hold_out_validation`` the next hash bucket (``VALIDATION_FRACTION`` of the grids, 23 of
288, next to the 49 test grids) forms a validation split and leaves train; without it those grids
are train grids (the default split, which the shipped checkpoint was fine-tuned on).
Uniqueness during carving is checked against all 288 grids at once with bitsets; tests use the
independent backtracking `count_solutions`.

Reward: the fraction of the puzzle's empty cells that the answer fills with the right digit.

With ``reasoning="rows_columns"`` the reference response (SFT target) writes the solved grid by
rows, then by columns, in the reasoning, then the 16-digit answer: 99 tokens of the built-in
tokenizer instead of 28, at fixed places, so a completion spans four 32-token blocks and states
every cell three times.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from rspo_mega.config.schema import SudokuReasoning, choices
from rspo_mega.data.example import Example, make_uid
from rspo_mega.tasks.answer_format import (
    RESPONSE_FORMAT, clip_completion, extract_answer_block, format_response,
)
from rspo_mega.tasks.base import Task

__all__ = [
    "SudokuTask",
    "all_grids",
    "grid_split",
    "count_solutions",
    "generate_sudoku",
    "score_sudoku",
    "rows_columns",
]

SIZE = 4
CELLS = SIZE * SIZE
_UNITS = (
    [[r * SIZE + c for c in range(SIZE)] for r in range(SIZE)]
    + [[r * SIZE + c for r in range(SIZE)] for c in range(SIZE)]
    + [[(br + r) * SIZE + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)
_PEERS = [sorted({p for unit in _UNITS if i in unit for p in unit} - {i}) for i in range(CELLS)]
_GRID_RE = re.compile(r"[0-4]{16}")
VALIDATION_FRACTION = 0.1  # hash bucket of the validation grids, right after the test bucket


def _candidates(grid: list[str], cell: int) -> list[str]:
    taken = {grid[p] for p in _PEERS[cell]}
    return [d for d in "1234" if d not in taken]


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of completions of `puzzle` ("0" = empty), counting at most `limit` (backtracking)."""
    if not _GRID_RE.fullmatch(puzzle):
        raise ValueError(f"not a 16-character 4x4 puzzle: {puzzle!r}")
    grid = list(puzzle)
    if any(d != "0" and any(grid[p] == d for p in _PEERS[i]) for i, d in enumerate(grid)):
        return 0  # the clues already clash

    def search() -> int:
        empty = [i for i, d in enumerate(grid) if d == "0"]
        if not empty:
            return 1
        cell = min(empty, key=lambda i: len(_candidates(grid, i)))
        found = 0
        for digit in _candidates(grid, cell):
            grid[cell] = digit
            found += search()
            grid[cell] = "0"
            if found >= limit:
                break
        return found

    return search()


@lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """All 288 valid complete 4x4 grids, sorted."""
    grids: list[str] = []
    grid = ["0"] * CELLS

    def fill(cell: int) -> None:
        if cell == CELLS:
            grids.append("".join(grid))
            return
        for digit in _candidates(grid, cell):
            grid[cell] = digit
            fill(cell + 1)
        grid[cell] = "0"

    fill(0)
    return tuple(sorted(grids))


def grid_split(solution: str, test_fraction: float = 0.2, validation_fraction: float = 0.0) -> str:
    """"train", "validation" or "test" for a solution grid; a fixed hash, independent of any
    seed (no validation grids with ``validation_fraction=0``)."""
    bucket = int.from_bytes(hashlib.blake2b(solution.encode(), digest_size=8).digest(), "little") / 2**64
    if bucket < test_fraction:
        return "test"
    return "validation" if bucket < test_fraction + validation_fraction else "train"


@lru_cache(maxsize=1)
def _clue_masks() -> tuple[tuple[int, ...], ...]:
    """masks[cell][digit] = bitset over all_grids() of grids holding `digit` at `cell`."""
    grids = all_grids()
    masks = [[0] * (SIZE + 1) for _ in range(CELLS)]
    for index, grid in enumerate(grids):
        for cell, digit in enumerate(grid):
            masks[cell][int(digit)] |= 1 << index
    return tuple(tuple(row) for row in masks)


def _is_unique(solution: str, clues: set[int]) -> bool:
    masks = _clue_masks()
    consistent = (1 << len(all_grids())) - 1
    for cell in clues:
        consistent &= masks[cell][int(solution[cell])]
    return consistent & (consistent - 1) == 0  # exactly one bit (the solution's) left


def _carve(solution: str, num_empty: int, rng: random.Random) -> str:
    """Blank cells in random order while the solution stays unique; at most `num_empty` blanks."""
    clues = set(range(CELLS))
    for cell in rng.sample(range(CELLS), CELLS):
        if CELLS - len(clues) == num_empty:
            break
        clues.discard(cell)
        if not _is_unique(solution, clues):
            clues.add(cell)
    return "".join(solution[i] if i in clues else "0" for i in range(CELLS))


def generate_sudoku(
    split: str,
    num_examples: int,
    seed: int,
    *,
    min_empty: int = 6,
    max_empty: int = 12,
    test_fraction: float = 0.2,
    hold_out_validation: bool = False,
) -> list[Example]:
    """`num_examples` distinct uniquely-solvable puzzles carved from `split`'s grids.

    Example.answer is the 16-char solution; meta["puzzle"] the 16-char puzzle ("0" = empty).
    """
    if split == "validation" and not hold_out_validation:
        raise ValueError("the sudoku validation split exists only with hold_out_validation=True "
                         "(its grids then leave train)")
    share = VALIDATION_FRACTION if hold_out_validation else 0.0
    grids = [g for g in all_grids() if grid_split(g, test_fraction, share) == split]
    if not grids:
        raise ValueError(f"no sudoku grids fall in split {split!r} with test_fraction={test_fraction}")
    rng = random.Random(f"sudoku|{split}|{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < num_examples:
        attempts += 1
        if attempts > 100 * num_examples + 10_000:
            raise RuntimeError(
                f"sudoku generator found only {len(examples)} distinct {split} puzzles of {num_examples} requested"
            )
        solution = rng.choice(grids)
        puzzle = _carve(solution, rng.randint(min_empty, max_empty), rng)
        if puzzle.count("0") < min_empty or puzzle in seen:
            continue
        seen.add(puzzle)
        uid = make_uid("sudoku", split, f"seed={seed}", len(examples))
        examples.append(Example(uid, _puzzle_text(puzzle), solution, "sudoku", {"puzzle": puzzle}))
    return examples


def score_sudoku(completion: str, puzzle: str, solution: str) -> float:
    """Fraction of `puzzle`'s empty cells whose digit in the answer matches `solution`.

    The answer block's first 16 ASCII digits are read as the grid (separators ignored);
    fewer than 16 digits, or no answer block, scores 0.0.
    """
    block = extract_answer_block(clip_completion(completion))
    if block is None:
        return 0.0
    digits = re.findall(r"[0-9]", block[:1024])
    if len(digits) < CELLS:
        return 0.0
    empty = [i for i, d in enumerate(puzzle) if d == "0"]
    if not empty:
        return float(digits[:CELLS] == list(solution))
    return sum(digits[i] == solution[i] for i in empty) / len(empty)


def rows_columns(solution: str) -> str:
    """The reasoning ``rows:`` (the grid's rows, digits spaced) then ``columns:`` (its columns)."""
    rows = [" ".join(solution[r * SIZE:(r + 1) * SIZE]) for r in range(SIZE)]
    columns = [" ".join(solution[c::SIZE]) for c in range(SIZE)]
    return "rows:\n" + "\n".join(rows) + "\ncolumns:\n" + "\n".join(columns)


def _puzzle_text(puzzle: str) -> str:
    rows = "\n".join(" ".join(puzzle[r * SIZE : (r + 1) * SIZE]) for r in range(SIZE))
    return f"Puzzle: {puzzle}\n{rows}"


def _parse_grid(value: Any, field: str, allow_empty: bool) -> str:
    text = str(value).strip()
    if text.isdigit() and len(text) < CELLS:  # a numeric column lost its leading zeros
        text = text.zfill(CELLS)
    if not _GRID_RE.fullmatch(text) or (not allow_empty and "0" in text):
        raise ValueError(f"field {field!r} is not a 16-character 4x4 grid: {value!r}")
    return text


class SudokuTask(Task):
    """Fields: `puzzle` (default column "Puzzle"), `solution` (default column "Solution"), as in
    the d1 CSV files."""

    name = "sudoku"
    default_fields = {"puzzle": "Puzzle", "solution": "Solution"}
    default_num_examples = {"train": 10_000, "validation": 256, "test": 256}

    def __init__(self, reasoning: str = "none") -> None:
        if reasoning not in choices(SudokuReasoning):
            raise ValueError(f"sudoku reasoning {reasoning!r}: expected one of "
                             f"{list(choices(SudokuReasoning))}")
        self.reasoning = reasoning

    def generate(self, split: str, *, seed: int, num_examples: int | None,
                 hold_out_validation: bool = False) -> list[Example]:
        return generate_sudoku(split, num_examples or self.default_num_examples[split], seed,
                               hold_out_validation=hold_out_validation)

    def example_from_record(self, record: Mapping[str, Any], uid: int) -> Example:
        puzzle = _parse_grid(record["puzzle"], "puzzle", allow_empty=True)
        solution = _parse_grid(record["solution"], "solution", allow_empty=False)
        if any(p != "0" and p != s for p, s in zip(puzzle, solution)):
            raise ValueError(f"field 'solution' {solution} contradicts the clues of puzzle {puzzle}")
        return Example(uid, _puzzle_text(puzzle), solution, self.name, {"puzzle": puzzle})

    def prompt(self, example: Example) -> str:
        return (
            "Solve this 4x4 Sudoku. Fill every 0 with a digit 1-4 so that each row, each column "
            "and each 2x2 box contains 1, 2, 3 and 4 exactly once. The puzzle is given as a "
            f"16-digit string read row by row and as a grid:\n{example.prompt}\n"
            f"{self._reasoning_instruction()}"
            "Put the completed grid as a 16-digit string inside the answer tags.\n"
            f"{RESPONSE_FORMAT}"
        )

    def _reasoning_instruction(self) -> str:
        if self.reasoning == "none":
            return ""
        return ("In the reasoning, write the completed grid by rows, then by columns, digits "
                "separated by spaces.\n")

    def reference_response(self, example: Example) -> str:
        if self.reasoning == "none":
            return super().reference_response(example)
        return format_response(rows_columns(str(example.answer)), str(example.answer))

    def reward(self, completion: str, example: Example) -> float:
        return score_sudoku(completion, example.meta["puzzle"], str(example.answer))
