"""verl custom reward function for appo's arithmetic task (correct answer + format rule,
appo.tasks.Arithmetic), used by scripts/verl_main_ppo.sh and the CPU tests; verl loads it by path
(``reward.custom_reward_function.path=scripts/verl_appo_reward.py``) in its reward workers.

It grades ``extra_info["appo_graded_text"]``: the text appo's agent loop (``appo.integrations.verl_agent``)
records for each rollout and branch, the model's own tokens with every tool result an empty block, so no tool
output can earn credit. verl's ``solution_str`` is the whole decoded response, tool output included; it is
graded only for a rollout of another agent loop (which records no graded text), with a warning.
"""

import warnings

from appo.tasks import Arithmetic, Example

_TASK = Arithmetic()


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """float score of one response against ``ground_truth`` (the answer): appo's graded text when the agent
    loop recorded it, else ``solution_str``."""
    extra_info = extra_info or {}
    text = extra_info.get("appo_graded_text")
    if text is None:
        warnings.warn("verl_appo_reward: no appo_graded_text (not appo's agent loop): grading the decoded "
                      "response, tool output included", RuntimeWarning, stacklevel=2)
        text = solution_str
    question = extra_info.get("question", "")
    return _TASK.reward(text, Example(id="", question=question, answer=str(ground_truth))).score
