"""A task of one's own: sort a few numbers ascending (docs/DATA.md, "Tasks of your own").

    cd examples/tasks && rspo-train data.task=sort_numbers:SortNumbersTask \
        data.train_path=sort_numbers_train.jsonl data.test_path=sort_numbers_test.jsonl

A record of the data file: {"numbers": "7 2 9", "sorted": "2 7 9"}. The reward is the share of
the answer's places that hold the right number (1.0: exactly the sorted list).
"""

from rspo_mega.data.example import Example
from rspo_mega.tasks.answer_format import RESPONSE_FORMAT, clip_completion, extract_answer_block
from rspo_mega.tasks.base import Task


class SortNumbersTask(Task):
    name = "sort_numbers"  # part of every example's uid
    default_fields = {"numbers": "numbers", "sorted": "sorted"}  # logical field -> file column

    def example_from_record(self, record, uid):
        numbers = [int(x) for x in str(record["numbers"]).split()]  # a ValueError names the row
        if [int(x) for x in str(record["sorted"]).split()] != sorted(numbers):
            raise ValueError(f"field 'sorted' is not the sorted numbers: {record['sorted']!r}")
        return Example(uid=uid, prompt=" ".join(map(str, numbers)), answer=sorted(numbers),
                       task=self.name)

    def prompt(self, example):  # the instructions a chat model gets (data.template=llada_chat)
        return f"Sort these numbers from smallest to largest: {example.prompt}\n{RESPONSE_FORMAT}"

    def reference_answer(self, example):  # what an SFT target puts in the answer tags
        return " ".join(map(str, example.answer))

    def reward(self, completion, example):  # in [0, 1], bounded time, never runs the text
        words = (extract_answer_block(clip_completion(completion)) or "").split()
        hits = sum(w == str(x) for w, x in zip(words, example.answer))
        return hits / max(len(words), len(example.answer))
