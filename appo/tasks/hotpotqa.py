"""HotpotQA, distractor setting, split "dev".

Data: ``path`` (a HotpotQA distractor .jsonl or a folder holding one), else
``$APPO_DATA_DIR/hotpotqa/dev_distractor_50.jsonl`` (50 questions), else the hub dataset
``hotpotqa/hotpot_qa`` (config "distractor", split "validation", 7,405 questions with the same fields); see
``appo.tasks.data``.

The grade is token precision x recall of the answer against the gold (the score: unlike token F1 it does not
pay hedging, ``appo.tasks.rewards.precision_times_recall``), with exact match reported as ``correct`` (both
after SQuAD normalisation). The search tool's corpus is the union of all questions' context paragraphs
(``appo.tools.search.build_hotpotqa_corpus``), so every question's two gold paragraphs are retrievable.
"""

from __future__ import annotations

from pathlib import Path

from appo.tasks.base import Example, Task
from appo.tasks.data import load_rows
from appo.tasks.rewards import RewardConfig, exact_match, precision_times_recall


class HotpotQA(Task):
    """Multi-hop QA with the search tool. meta: type, level, supporting_titles (the gold paragraphs)."""

    name = "hotpotqa"
    tools = ("search",)
    splits = ("dev",)

    def __init__(self, path: str | Path | None = None, reward_config: RewardConfig | None = None):
        super().__init__(reward_config)
        self.path = Path(path) if path is not None else None  # None: $APPO_DATA_DIR, then the hub

    def examples(self, split: str = "dev") -> list[Example]:
        self._check_split(split)
        return [Example(id=f"hotpotqa-{i}", question=row["question"], answer=row["answer"],
                        meta={"type": row.get("type"), "level": row.get("level"),
                              "supporting_titles": sorted(set(row["supporting_facts"]["title"]))})
                for i, row in enumerate(load_rows("hotpotqa", self.path))]

    def grade(self, answer: str, example: Example) -> tuple[float, float]:
        return precision_times_recall(answer, example.answer), exact_match(answer, example.answer)
