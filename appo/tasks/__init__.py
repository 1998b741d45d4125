"""Tasks: datasets with gold answers, rewards (math answers, QA token overlap, format) and prompts.

``get_task("gsm8k" | "arithmetic" | "hotpotqa", **options)`` builds one (``path=``: a local data file or
folder for the tasks with data; ``appo.tasks.data`` says where data is looked for). Parsing helpers for the
rollout engine live in ``appo.tasks.parsing`` (find_tool_call, extract_answer, check_format, and the one
closing-tag rule, closing_tag_counts).
"""

from __future__ import annotations

from appo.tasks.arithmetic import Arithmetic
from appo.tasks.base import Example, Reward, Task
from appo.tasks.data import data_dir, load_rows, read_jsonl
from appo.tasks.gsm8k import GSM8K
from appo.tasks.hotpotqa import HotpotQA
from appo.tasks.parsing import check_format, closing_tag_counts, extract_answer, find_tool_call, tool_call_span
from appo.tasks.prompts import build_messages, render_prompt, system_prompt
from appo.tasks.rewards import (RewardConfig, exact_match, numbers_match, parse_number, precision_times_recall,
                                token_f1)

TASKS = {"gsm8k": GSM8K, "arithmetic": Arithmetic, "hotpotqa": HotpotQA}
DATA_TASKS = ("gsm8k", "hotpotqa")  # the tasks that read data (appo.tasks.data.SOURCES)

__all__ = ["Arithmetic", "Example", "GSM8K", "HotpotQA", "Reward", "RewardConfig", "TASKS", "Task",
           "build_messages", "check_format", "closing_tag_counts", "data_dir", "exact_match", "extract_answer",
           "find_tool_call", "get_task", "load_rows", "numbers_match", "parse_number", "precision_times_recall",
           "read_jsonl", "render_prompt", "system_prompt", "token_f1", "tool_call_span"]


def get_task(name: str, **options) -> Task:
    """Build the task called ``name`` with its constructor's keyword ``options``. ``path=None`` is dropped
    (every task's default); a path for a task that reads no data is a ValueError."""
    if name not in TASKS:
        raise ValueError(f"name: unknown task {name!r}; known: {sorted(TASKS)}")
    if options.get("path", "absent") is None:
        options.pop("path")
    if "path" in options and name not in DATA_TASKS:
        raise ValueError(f"path (data.path): the {name} task is generated and reads no data file, got "
                         f"{options['path']!r}")
    return TASKS[name](**options)
