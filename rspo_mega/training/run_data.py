"""A run's task, tokenizer, template and encoded examples, prepared before any model exists.

With ``data.tokenizer`` unset (the embedded default) a small SentencePiece tokenizer is trained
on generated task text into ``<logging.output_dir>/tokenizer`` by rank 0 and loaded by every
rank. The model section took its vocabulary size and special ids when the run's config was set
up (:mod:`rspo_mega.setup.resolve`); the tokenizer must agree with it
(:func:`rspo_mega.data.tokenizer_ids.check_tokenizer_ids`), else the error names the key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path


from rspo_mega.config import TrainConfig
from rspo_mega.data import Example
from rspo_mega.data.templates import PromptTemplate, get_template
from rspo_mega.data.tokenizer import Tokenizer, load_tokenizer
from rspo_mega.data.tokenizer_ids import check_tokenizer_ids
from rspo_mega.data.tokenizer_training import BUILTIN_VOCAB, train_sentencepiece_tokenizer
from rspo_mega.errors import ConfigError
from rspo_mega.setup.hf_start import is_hf_start
from rspo_mega.tasks import get_task
from rspo_mega.tasks.base import Task
from rspo_mega.tasks.corpus import task_corpus
from rspo_mega.tasks.prompts import EncodedExample, encode_prompt, encode_prompts, prompt_message
from rspo_mega.parallel.ranks import barrier, rank

log = logging.getLogger(__name__)


@dataclass
class RunData:
    task: Task
    tokenizer: Tokenizer
    template: PromptTemplate
    train: list[EncodedExample]
    test: list[Example]
    validation: list[Example] = dataclasses.field(default_factory=list)

    @property
    def held_out(self) -> bool:
        """Whether the run has a test or a validation set to evaluate."""
        return bool(self.test or self.validation)

    def prompt_message(self, example: Example) -> str:
        """The user message of ``example`` (the prompt as the model sees it, before the template)."""
        return prompt_message(self.task, self.template, example)

    def encode_prompt(self, example: Example) -> list[int]:
        """The prompt token ids of ``example``."""
        return encode_prompt(self.task, self.template, self.tokenizer, example)

    def sft_target(self, example: Example) -> list[int]:
        """Token ids of the task's reference response (in the verifier's format)."""
        return self.tokenizer.encode(self.task.reference_response(example))


def _builtin_tokenizer(cfg: TrainConfig) -> Tokenizer:
    out = Path(cfg.logging.output_dir) / "tokenizer"
    model = out / "tokenizer.model"
    if rank() == 0 and not model.is_file():
        out.mkdir(parents=True, exist_ok=True)
        docs = task_corpus(seed=cfg.data.seed)
        train_sentencepiece_tokenizer(docs, out / "tokenizer", vocab_size=BUILTIN_VOCAB)
    barrier()
    return load_tokenizer(model)


def _same_as_start(cfg: TrainConfig, tok: Tokenizer) -> None:
    """An HF start's own tokenizer and the run's (``data.tokenizer`` set to another file) must
    map every id to the same token: the model learned those ids."""
    start = cfg.checkpoint.init_from
    if not is_hf_start(cfg) or Path(tok.path).resolve().parent == Path(start).resolve():
        return
    own = load_tokenizer(start)
    ids = range(max(own.vocab_size, tok.vocab_size))
    differ = [i for i in ids if own.id_to_token(i) != tok.id_to_token(i)]
    if differ:
        i = differ[0]
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of checkpoint.init_from="
            f"{start}: {len(differ)} of {len(ids)} ids map to other tokens (id {i}: "
            f"{tok.id_to_token(i)!r}, the checkpoint's {own.id_to_token(i)!r}); leave "
            "data.tokenizer unset to use the checkpoint's")


def build_task(cfg: TrainConfig) -> Task:
    """The configured task, with the options of its own section of ``data`` (``data.countdown``,
    ``data.sudoku``) where it has one (checked by validate)."""
    section = getattr(cfg.data, cfg.data.task, None)
    options = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}
    return get_task(cfg.data.task, **options)


def prepare_run_data(cfg: TrainConfig) -> RunData:
    """Load the task's splits and the tokenizer, and encode every training prompt."""
    task = build_task(cfg)
    if cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        tokenizer = _builtin_tokenizer(cfg)
        log.info("built-in tokenizer: vocab %d, mask %d, eos %d", tokenizer.vocab_size,
                 tokenizer.mask_id, tokenizer.eos_id)
    check_tokenizer_ids(cfg, tokenizer)
    _same_as_start(cfg, tokenizer)
    d = cfg.data
    template = get_template(d.template)
    generated = d.train_path is None
    files = dict(fields=d.fields or None, json_field=d.json_field,
                 hold_out_validation=generated and d.num_validation_examples > 0)
    train = task.load("train", path=d.train_path, seed=d.seed, num_examples=d.num_train_examples,
                      **files)
    if not train:
        raise ConfigError(f"data.train_path: the {task.name} training set "
                          f"'{d.train_path or 'generated'}' is empty")
    has_test = d.test_path or (generated and d.num_test_examples)
    test = task.load("test", path=d.test_path, seed=d.seed, num_examples=d.num_test_examples,
                     **files) if has_test else []
    has_validation = d.validation_path or (generated and d.num_validation_examples)
    validation = task.load("validation", path=d.validation_path, seed=d.seed,
                           num_examples=d.num_validation_examples or None,
                           **files) if has_validation else []
    encoded = encode_prompts(train, task, template, tokenizer, d.max_prompt_length)
    return RunData(task, tokenizer, template, encoded, test, validation)

