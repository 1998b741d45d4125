"""HotpotQA, distractor setting (data_dir()/hotpotqa/dev_distractor_50.jsonl, 50 questions, split "dev").

The grade is token F1 of the answer against the gold (the score), with exact match reported as ``correct``
(both after SQuAD normalisation). The search tool's corpus is the union of all questions' context paragraphs
(``appo.tools.search.build_hotpotqa_corpus``), so every question's two gold paragraphs are retrievable.
"""

from __future__ import annotations

from pathlib import Path

from appo.tasks.base import Example, Task
from appo.tasks.data import data_dir, read_jsonl
from appo.tasks.rewards import RewardConfig, exact_match, token_f1


class HotpotQA(Task):
    """Multi-hop QA with the search tool. meta: type, level, supporting_titles (the gold paragraphs)."""

    name = "hotpotqa"
    tools = ("search",)
    splits = ("dev",)

    def __init__(self, path: str | Path | None = None, reward_config: RewardConfig | None = None):
        super().__init__(reward_config)
        self.path = Path(path) if path is not None else data_dir() / "hotpotqa" / "dev_distractor_50.jsonl"

    def examples(self, split: str = "dev") -> list[Example]:
        self._check_split(split)
        return [Example(id=f"hotpotqa-{i}", question=row["question"], answer=row["answer"],
                        meta={"type": row.get("type"), "level": row.get("level"),
                              "supporting_titles": sorted(set(row["supporting_facts"]["title"]))})
                for i, row in enumerate(read_jsonl(self.path))]

    def grade(self, answer: str, example: Example) -> tuple[float, float]:
        return token_f1(answer, example.answer), exact_match(answer, example.answer)
