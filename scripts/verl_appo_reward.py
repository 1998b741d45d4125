"""verl custom reward function for scripts/verl_main_ppo.sh: appo's arithmetic task reward (correct answer +
format rule, appo.tasks.Arithmetic) of one response. verl loads it by path
(``reward.custom_reward_function.path=scripts/verl_appo_reward.py``) in its reward workers."""

from appo.tasks import Arithmetic, Example

_TASK = Arithmetic()


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """float score of ``solution_str`` (the decoded response) against ``ground_truth`` (the answer)."""
    question = (extra_info or {}).get("question", "")
    return _TASK.reward(solution_str, Example(id="", question=question, answer=str(ground_truth))).score
