"""A procedural arithmetic task with exact integer answers, for fast tests and the CPU demo.

Expressions are random binary trees over integer literals; parentheses appear exactly where precedence needs
them. Division is only generated when exact (the left operand is made a multiple of the right one).
Difficulty knobs: ``min_operands``/``max_operands``, ``max_operand`` (literal size), ``operators``.
Each split has its own seeded stream (``random.Random(f"arithmetic/{seed}/{split}")``); a training question
that also occurs in "dev" is skipped, so the splits are disjoint.
"""

from __future__ import annotations

import random

from appo.tasks.base import Example, Task
from appo.tasks.rewards import RewardConfig, numbers_match

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class Arithmetic(Task):
    """Questions "What is 12 + 7 * 3?" with integer answers; splits "train" and "dev"."""

    name = "arithmetic"
    tools = ("python",)

    def __init__(self, num_train: int = 1000, num_dev: int = 100, min_operands: int = 2,
                 max_operands: int = 3, max_operand: int = 100, operators: str = "+-*", seed: int = 0,
                 reward_config: RewardConfig | None = None):
        super().__init__(reward_config)
        if num_train < 0 or num_dev < 0:
            raise ValueError("num_train, num_dev: must be >= 0")
        if not 1 <= min_operands <= max_operands:
            raise ValueError(f"min_operands: need 1 <= min_operands <= max_operands, got {min_operands}, "
                             f"{max_operands}")
        if max_operand < 1:
            raise ValueError(f"max_operand: must be >= 1, got {max_operand}")
        if not operators or set(operators) - set(_PRECEDENCE):
            raise ValueError(f"operators: a non-empty string over '+-*/', got {operators!r}")
        self.sizes = {"train": num_train, "dev": num_dev}
        self.min_operands, self.max_operands, self.max_operand = min_operands, max_operands, max_operand
        self.operators, self.seed = operators, seed

    def examples(self, split: str = "train") -> list[Example]:
        self._check_split(split)
        excluded = {e.question for e in self.examples("dev")} if split == "train" else set()
        rng = random.Random(f"arithmetic/{self.seed}/{split}")
        examples, seen = [], set(excluded)
        attempts = 0
        while len(examples) < self.sizes[split]:
            attempts += 1
            if attempts > 100 * self.sizes[split] + 1000:
                raise ValueError(f"max_operand, operators: too few distinct expressions for "
                                 f"{self.sizes[split]} examples")
            n_operands = rng.randint(self.min_operands, self.max_operands)
            text, value, _ = self._expression(rng, n_operands)
            question = f"What is {text}?"
            if question in seen:
                continue
            seen.add(question)
            examples.append(Example(id=f"arithmetic-{split}-{len(examples)}", question=question,
                                    answer=str(value), meta={"expression": text, "operands": n_operands}))
        return examples

    def grade(self, answer: str, example: Example) -> tuple[float, float]:
        correct = float(numbers_match(answer, example.answer))
        return correct, correct

    def _expression(self, rng: random.Random, n_operands: int) -> tuple[str, int, int]:
        """A random expression over ``n_operands`` literals -> (text, exact int value, precedence)."""
        if n_operands == 1:
            value = rng.randint(1, self.max_operand)
            return str(value), value, 3
        n_left = rng.randint(1, n_operands - 1)
        op = rng.choice(self.operators)
        right, right_value, right_prec = self._expression(rng, n_operands - n_left)
        if op == "/" and right_value == 0:
            op = "+"
        if op == "/":  # exact division: the left operand becomes a literal multiple of the right value
            quotient = rng.randint(1, self.max_operand)
            left_value = quotient * right_value
            left, left_prec = str(left_value), 3 if left_value >= 0 else 0
        else:
            left, left_value, left_prec = self._expression(rng, n_left)
        prec = _PRECEDENCE[op]
        if left_prec < prec:
            left = f"({left})"
        if right_prec < prec or (right_prec == prec and op in "-/"):
            right = f"({right})"
        value = {"+": left_value + right_value, "-": left_value - right_value, "*": left_value * right_value,
                 "/": left_value // right_value if op == "/" else 0}[op]
        return f"{left} {op} {right}", value, prec
