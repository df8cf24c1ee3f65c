"""Examples, local-file loading, data-parallel prompt batching, tokenizers, prompt templates and
prompt encoding.

    examples = get_task("gsm8k").load("train", path=cfg.train_path)          # rspo_mega.tasks
    batches = PromptBatchIterator(examples, global_batch_prompts, dp_rank, dp_size, seed=seed)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.special_tokens)
    prompt_ids = encode_prompt(task, get_template("llada_chat"), tokenizer, example)
"""

from rspo_mega.data.example import Example, check_unique_uids, make_uid
from rspo_mega.data.loader import DataFieldError, PromptBatchIterator, read_records, shard_examples
from rspo_mega.data.prompts import EncodedExample, encode_prompt, encode_prompts, prompt_message
from rspo_mega.data.templates import PromptTemplate, get_template
from rspo_mega.data.tokenizer import MissingSpecialTokenError, Tokenizer, load_tokenizer

__all__ = [
    "DataFieldError",
    "EncodedExample",
    "Example",
    "MissingSpecialTokenError",
    "PromptBatchIterator",
    "PromptTemplate",
    "Tokenizer",
    "check_unique_uids",
    "encode_prompt",
    "encode_prompts",
    "get_template",
    "load_tokenizer",
    "make_uid",
    "prompt_message",
    "read_records",
    "shard_examples",
]
