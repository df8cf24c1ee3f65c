"""Examples, local-file loading, data-parallel prompt batching, tokenizers and prompt templates
(prompt encoding, which needs a task's instructions, is :mod:`rspo_mega.tasks.prompts`).

    examples = get_task("gsm8k").load("train", path=cfg.train_path)          # rspo_mega.tasks
    batches = PromptBatchIterator(examples, global_batch_prompts, dp_rank, dp_size, seed=seed)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.special_tokens)
    prompt_ids = encode_prompt(task, get_template("llada_chat"), tokenizer, example)  # tasks
"""

from rspo_mega.data.example import Example, check_unique_uids, make_uid
from rspo_mega.data.records import PromptBatchIterator, read_records, shard_examples
from rspo_mega.data.templates import PromptTemplate, get_template
from rspo_mega.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "Example",
    "PromptBatchIterator",
    "PromptTemplate",
    "Tokenizer",
    "check_unique_uids",
    "get_template",
    "load_tokenizer",
    "make_uid",
    "read_records",
    "shard_examples",
]
