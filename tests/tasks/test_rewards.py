"""Answer grading and the reward rule on hand-checked cases."""

from fractions import Fraction

import pytest

from appo.tasks import Example, GSM8K, HotpotQA, RewardConfig
from appo.tasks.rewards import (combine, exact_match, normalize_answer, numbers_match, parse_number,
                               precision_times_recall, token_f1)


@pytest.mark.parametrize("text, value", [
    ("72", Fraction(72)),
    ("1,234,567", Fraction(1234567)),
    ("$18.50", Fraction(37, 2)),
    ("72 clips.", Fraction(72)),
    ("-5", Fraction(-5)),
    ("−5", Fraction(-5)),
    ("3/4", Fraction(3, 4)),
    ("\\boxed{\\frac{3}{4}}", Fraction(3, 4)),
    ("The answer is \\boxed{1,000}", Fraction(1000)),
    ("5 + 3 = 8", Fraction(8)),
    ("0.5", Fraction(1, 2)),
    (".25 of it", Fraction(1, 4)),
    ("12.", Fraction(12)),
    ("50%", Fraction(50)),
    ("1 1/2", Fraction(3, 2)),           # a mixed number, not 1/2
    ("-1 1/2 cups", Fraction(-3, 2)),
    ("1e3", Fraction(1000)),             # an exponent, not 3
    ("2.5E-4", Fraction(1, 4000)),
    ("3 / 4", Fraction(3, 4)),
    ("5 - 3 = 2", Fraction(2)),          # what follows the last "=" counts
    ("-3", Fraction(-3)),
    ("it is -3", Fraction(-3)),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "none", "three", None, "1/0",
                                  "5-3",          # an unresolved subtraction, not -3
                                  "2019-2020",    # a range, not -2020
                                  "12,34",        # not a thousands separator: not 34
                                  "1e999999999"])  # model-written: refused at once, never computed
def test_parse_number_none(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("predicted, gold, same", [
    ("18", "18", True), ("$18.00", "18", True), ("18 dollars", "18", True), ("1,000", "1000", True),
    ("0.75", "3/4", True), ("\\boxed{42}", "42", True), ("17", "18", False), ("18.5", "18", False),
    ("no idea", "18", False), (None, "18", False), ("-3", "3", False),
    ("5-3", "2", False), ("5-3", "3", False), ("5-3", "-3", False), ("2019-2020", "2020", False),
    ("1 1/2", "1.5", True), ("1 1/2", "0.5", False), ("1e3", "1000", True), ("1e3", "3", False),
    ("12,34", "34", False), ("12,34", "1234", False),
])
def test_numbers_match(predicted, gold, same):
    assert numbers_match(predicted, gold) is same


def test_normalize_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match(None, "x") == 0.0


def test_token_f1_by_hand():
    # pred tokens [barack, obama, president], gold [barack, obama]: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Barack Obama, president", "Barack Obama") == pytest.approx(0.8)
    # pred [new, york], gold [new, york, city]: P = 1, R = 2/3 -> 0.8; articles dropped first
    assert token_f1("the New York", "New York City") == pytest.approx(0.8)
    # one common token of 3 and 2: P = 1/3, R = 1/2 -> F1 = 0.4
    assert token_f1("red big apple", "green apple") == pytest.approx(0.4)
    assert token_f1("Paris", "paris") == 1.0
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("no", "yes") == 0.0 and token_f1("yes it is", "yes") == 0.0  # HotpotQA yes/no rule
    assert token_f1(None, "Paris") == 0.0


def test_precision_times_recall_by_hand():
    # the same tokens as F1, multiplied: P = 2/3, R = 1 -> 2/3 (F1 0.8); P = 1, R = 2/3 -> 2/3
    assert precision_times_recall("Barack Obama, president", "Barack Obama") == pytest.approx(2 / 3)
    assert precision_times_recall("the New York", "New York City") == pytest.approx(2 / 3)
    assert precision_times_recall("red big apple", "green apple") == pytest.approx(1 / 6)
    assert precision_times_recall("Paris", "paris") == 1.0
    assert precision_times_recall("London", "Paris") == 0.0
    assert precision_times_recall("yes it is", "yes") == 0.0 and precision_times_recall(None, "x") == 0.0


def test_hedging_never_beats_committing_to_the_likeliest_candidate():
    # k one-word candidates, the gold one of them with probability p_i: the hedge listing all scores 1/k
    # (less with "or"), committing to candidate i earns p_i in expectation
    candidates = ["Paris", "London", "Rome"]
    for k in (2, 3):
        hedge = " ".join(candidates[:k])
        assert token_f1(hedge, "Paris") == pytest.approx(2 / (k + 1))  # F1 paid the hedge more than 1/k
        assert precision_times_recall(hedge, "Paris") == pytest.approx(1 / k)
        assert precision_times_recall(" or ".join(candidates[:k]), "London") < 1 / k
    # candidates of different lengths: the expectation over the gold is a weighted mean, <= max p_i
    prior = {"New York City": 0.5, "Boston": 0.5}
    expected = sum(p * precision_times_recall("New York City Boston", gold) for gold, p in prior.items())
    assert expected <= max(prior.values())


def test_combine_rule():
    config = RewardConfig(correct_weight=1.0, format_penalty=0.1)
    assert combine(1.0, True, config) == 1.0
    assert combine(1.0, False, config) == pytest.approx(0.9)
    assert combine(0.0, False, config) == pytest.approx(-0.1)
    assert combine(0.5, True, RewardConfig(correct_weight=2.0, format_penalty=0.0)) == 1.0
    with pytest.raises(ValueError, match="format_penalty"):
        RewardConfig(format_penalty=-1)
    with pytest.raises(ValueError, match="correct_weight"):
        RewardConfig(correct_weight=0)


MATH = Example(id="m", question="q", answer="72")
QA = Example(id="h", question="q", answer="Barack Obama")


def test_math_reward(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "q", "answer": "work\\n#### 72"}\n')
    task = GSM8K(path=path, dev_size=0)
    good = "<python>print(48 + 24)</python><result>72</result><answer>$72</answer>"
    reward = task.reward(good, MATH)
    assert (reward.score, reward.correct, reward.format_ok, reward.answer) == (1.0, 1.0, True, "$72")
    malformed = task.reward("<answer>72</answer> and more", MATH)
    assert (malformed.score, malformed.correct, malformed.format_ok) == (pytest.approx(0.9), 1.0, False)
    wrong = task.reward("<answer>71</answer>", MATH)
    assert (wrong.score, wrong.correct, wrong.format_ok) == (0.0, 0.0, True)
    missing = task.reward("it is 72", MATH)
    assert (missing.score, missing.correct, missing.answer) == (pytest.approx(-0.1), 0.0, None)


def test_qa_reward_uses_precision_times_recall_for_score_and_exact_match_for_correct():
    task = HotpotQA()
    partial = task.reward("<search>who</search><result>...</result><answer>Obama</answer>", QA)
    assert partial.score == pytest.approx(1 / 2)  # P = 1, R = 1/2 (F1 would pay 2/3)
    assert partial.correct == 0.0 and partial.format_ok
    exact = task.reward("<answer>barack obama.</answer>", QA)
    assert (exact.score, exact.correct) == (1.0, 1.0)
