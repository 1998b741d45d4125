"""What a task is: examples with gold answers, the tools an agent may use, and a reward for a response."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from appo.tasks.parsing import TOOL_TAGS, check_format, extract_answer
from appo.tasks.rewards import RewardConfig, combine


@dataclass(frozen=True)
class Example:
    """One question. id: unique within the task; answer: the gold answer as a string; meta: task extras."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """score: the scalar RL reward; correct: the task metric (1/0 accuracy, or exact match for QA);
    format_ok: check_format's verdict; answer: the extracted <answer> content (None when absent)."""

    score: float
    correct: float
    format_ok: bool
    answer: str | None


class Task(ABC):
    """A task: ``examples(split)``, ``grade(answer, example)`` and the shared ``reward`` rule.

    name: identifier; tools: default tool tags for prompts and the rollout engine; splits: valid split names.
    """

    name: str = "task"
    tools: tuple[str, ...] = ("python",)
    splits: tuple[str, ...] = ("train", "dev")

    def __init__(self, reward_config: RewardConfig | None = None):
        self.reward_config = reward_config or RewardConfig()

    @abstractmethod
    def examples(self, split: str = "train") -> list[Example]:
        """All examples of ``split`` in a fixed order. Raises ValueError for an unknown split."""

    @abstractmethod
    def grade(self, answer: str, example: Example) -> tuple[float, float]:
        """(correctness in [0, 1] used in the score, task metric reported as ``correct``) of an answer."""

    def reward(self, response: str, example: Example) -> Reward:
        """Reward of a whole response (model text with its result blocks); rule in appo.tasks.rewards.

        The response is hostile: it is only scanned (never compiled or evaluated), in linear time, and no text
        makes this raise. Should a parse or the grader fail all the same, the response gets no credit and a
        failed format check, with a warning naming the error. Pass the text the model wrote, as
        ``appo.rollout.tool_loop.graded_text`` builds it (every backend does): tool output never reaches the
        grade there. Given a text that still holds tool output, the parser cuts result blocks out of the
        answer, but only escaped output (``escape_tool_output``) is sure to stay inside its block."""
        if not isinstance(response, str):
            raise ValueError(f"response: expected a string, got {type(response).__name__}")
        try:
            format_ok, _ = check_format(response, tool_tags=TOOL_TAGS)
            answer = extract_answer(response)
        except Exception as error:  # noqa: BLE001 - a parser bug must not end a training run
            warnings.warn(f"{self.name}: parsing a response failed ({type(error).__name__}: {error}); "
                          "graded as malformed with no answer", RuntimeWarning, stacklevel=2)
            format_ok, answer = False, None
        correctness, correct = 0.0, 0.0
        if answer is not None:
            try:
                correctness, correct = self.grade(answer, example)
            except Exception as error:  # noqa: BLE001
                warnings.warn(f"{self.name}: grading an answer failed ({type(error).__name__}: {error}); "
                              "no credit given", RuntimeWarning, stacklevel=2)
        return Reward(combine(correctness, format_ok, self.reward_config), correct, format_ok, answer)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split: {self.name} has splits {self.splits}, got {split!r}")
