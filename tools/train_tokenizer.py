#!/usr/bin/env python
"""Train the tiny default SentencePiece tokenizer on generated task text (+ optional text files).

    python tools/train_tokenizer.py --output-prefix runs/tokenizer/tiny --vocab-size 1024 \
        [--extra-text gsm8k_questions.txt ...]

Writes <prefix>.model and <prefix>.vocab; load the .model with rspo_mega.data.tokenizer.load_tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rspo_mega.data.tokenizer import load_tokenizer  # noqa: E402
from rspo_mega.data.tokenizer_training import train_sentencepiece_tokenizer  # noqa: E402
from rspo_mega.tasks.corpus import task_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--num-countdown", type=int, default=2000, help="generated Countdown documents")
    parser.add_argument("--num-sudoku", type=int, default=1000, help="generated Sudoku documents")
    parser.add_argument("--extra-text", nargs="*", default=[], help="UTF-8 text files, one document per line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    documents = task_corpus(
        num_countdown=args.num_countdown,
        num_sudoku=args.num_sudoku,
        seed=args.seed,
        extra_text_files=args.extra_text,
    )
    model_path = train_sentencepiece_tokenizer(
        documents, args.output_prefix, vocab_size=args.vocab_size, model_type=args.model_type
    )
    tokenizer = load_tokenizer(model_path)
    print(
        f"wrote {model_path}: vocab_size={tokenizer.vocab_size} special_ids={tokenizer.special_ids} "
        f"documents={len(documents)} in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
