"""GSM8K grade-school math (the official training set, 7,473 problems) with a fixed train/dev split.

Data: ``path`` (a gsm8k train.jsonl or a folder holding one), else ``$APPO_DATA_DIR/gsm8k/train.jsonl``, else
the hub dataset ``openai/gsm8k`` (config "main", split "train"); see ``appo.tasks.data``. All three hold the
same rows in the same order, so ids and splits do not depend on where the data came from.

Split: the line indices 0..n-1 are permuted by ``random.Random(seed)`` (seed 0 by default, the Mersenne
Twister, stable across Python versions); the first ``dev_size`` (500) indices form "dev", the rest "train";
each split is returned in file order. Ids are ``gsm8k-<line index>``, so they are stable too.
The gold answer is the number after "####" with thousands commas removed; the grade is numeric equivalence.
"""

from __future__ import annotations

import random
from pathlib import Path

from appo.tasks.base import Example, Task
from appo.tasks.data import load_rows
from appo.tasks.rewards import RewardConfig, numbers_match


class GSM8K(Task):
    """GSM8K with splits "train" (6,973) and "dev" (500) carved from the official training file."""

    name = "gsm8k"
    tools = ("python",)

    def __init__(self, path: str | Path | None = None, dev_size: int = 500, seed: int = 0,
                 reward_config: RewardConfig | None = None):
        super().__init__(reward_config)
        self.path = Path(path) if path is not None else None  # None: $APPO_DATA_DIR, then the hub
        if dev_size < 0:
            raise ValueError(f"dev_size: must be >= 0, got {dev_size}")
        self.dev_size, self.seed = dev_size, seed

    def examples(self, split: str = "train") -> list[Example]:
        self._check_split(split)
        all_examples = _examples(load_rows("gsm8k", self.path))
        if self.dev_size >= len(all_examples):
            raise ValueError(f"dev_size: {self.dev_size} leaves no training data ({len(all_examples)} items)")
        order = list(range(len(all_examples)))
        random.Random(self.seed).shuffle(order)
        chosen = sorted(order[: self.dev_size] if split == "dev" else order[self.dev_size:])
        return [all_examples[i] for i in chosen]

    def grade(self, answer: str, example: Example) -> tuple[float, float]:
        correct = float(numbers_match(answer, example.answer))
        return correct, correct


def gold_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after the last "####", commas removed."""
    if "####" not in solution:
        raise ValueError("solution: no '####' final-answer marker")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _examples(rows: tuple[dict, ...]) -> tuple[Example, ...]:
    return tuple(Example(id=f"gsm8k-{i}", question=row["question"], answer=gold_answer(row["answer"]),
                         meta={"solution": row["answer"]}) for i, row in enumerate(rows))
