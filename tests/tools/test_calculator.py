"""The calculator evaluates arithmetic exactly where it can, refuses everything else with a message, and
answers every input (the hostile worst cases included) within its time limit, from a worker process."""

import math
import os
import random
import time

import pytest

from appo.tools.calculator import CalculatorTool, Evaluator


@pytest.fixture(scope="module")
def calc():
    return CalculatorTool()


@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("7 / 2", "3.5"),
    ("6 / 3", "2"),
    ("7 // 2", "3"),
    ("-7 % 3", "2"),
    ("2 ** 10", "1024"),
    ("-(3 - 10)", "7"),
    ("0.1 + 0.2", "0.3"),
    ("12 × 3 ÷ 4 =", "9"),
    ("sqrt(2)", "1.41421356237"),
    ("factorial(20)", "2432902008176640000"),
    ("max(3, 11, 5) - min(4, 2)", "9"),
    ("round(2 * pi, 3)", "6.283"),
    ("log(e ** 2)", "2"),
    ("123456789 * 987654321", "121932631112635269"),
])
def test_values(calc, expression, expected):
    assert calc.run(expression) == expected


def test_random_integer_expressions_match_python(calc):
    rng = random.Random(7)
    for _ in range(50):
        a, b, c = (rng.randint(-999, 999) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expression = f"{a} {op1} ({b} {op2} {c})"
        inner = {"+": b + c, "-": b - c, "*": b * c}[op2]
        expected = {"+": a + inner, "-": a - inner, "*": a * inner}[op1]
        assert calc.run(expression) == str(expected)


@pytest.mark.parametrize("expression, message", [
    ("2 ** 100000", "exponent 100000 exceeds"),
    ("10 ** 200", "exceed 10**100"),
    ("9 ** 9 ** 9", "exceeds"),
    ("1e308 * 10", "exceeds 10**100"),
    ("exp(1000)", "OverflowError"),
    ("factorial(100000)", "factorial argument above 500"),
    ("__import__('os')", "unsupported call"),
    ("x + 1", "unknown name 'x'"),
    ("(1).__class__", "unsupported syntax: Attribute"),
    ("math.sqrt(4)", "unsupported call"),
    ("'a' * 3", "unsupported syntax: Constant"),
    ("2 ^ 3", "write a ** b"),
    ("1 < 2", "unsupported syntax: Compare"),
    ("[1, 2]", "unsupported syntax: List"),
    ("lambda: 1", "unsupported syntax: Lambda"),
    ("", "empty expression"),
    ("2 +", "not an arithmetic expression"),
    ("1 / 0", "ZeroDivisionError"),
    ("sqrt(-1)", "ValueError"),
    ("(-8) ** 0.5", "complex result"),
])
def test_refusals_are_error_strings(calc, expression, message):
    result = calc.run(expression)
    assert result.startswith("Error: ")
    assert message in result


def test_long_input_is_refused_quickly(calc):
    assert calc.run("1 + " * 1000 + "1").startswith("Error: expression longer than")


def test_evaluator_returns_numbers():
    evaluator = Evaluator()
    assert evaluator.evaluate("3 * 7") == 21
    assert math.isclose(evaluator.evaluate("sin(pi / 6)"), 0.5, rel_tol=1e-12)


WORST_CASES = [
    "round(1, -10**9)",               # never returned when evaluated in the trainer
    "round(1.5, 10**9)",
    "-" * 499 + "1",                  # deep unary nesting
    "(" * 199 + "1" + ")" * 199,      # deep parentheses
    "9 ** 9 ** 9",
    "factorial(500) * factorial(500)",
    "9" * 100 + " * " + "9" * 100,
    "gcd(" + ",".join(["9" * 99] * 4) + ")",
    "exp(exp(exp(10)))",
    "2 ** -1000 ** 2",
    "1" * 10_000_000,                 # 10 MB of digits
    "\x00" * 100,
]


@pytest.mark.parametrize("expression", WORST_CASES, ids=range(len(WORST_CASES)))
def test_worst_cases_return_within_one_second(calc, expression):
    calc.run("1")  # the worker is up
    start = time.monotonic()
    result = calc.run(expression)
    assert time.monotonic() - start < 1.0
    assert isinstance(result, str) and result


def test_round_digits_are_bounded(calc):
    assert calc.run("round(1, -10**9)") == "Error: rounding to more than 100 digits"
    assert calc.run("round(123.456, -2)") == "100"


def test_time_limit_kills_the_worker_and_the_next_call_starts_a_new_one():
    calc = CalculatorTool(time_limit_s=1e-9)  # no answer can arrive in time
    calc.run("1")
    assert calc.run("2 + 2") == "Error: the calculation exceeded the time limit of 1e-09 s"
    assert calc._worker is None  # killed
    calc.time_limit_s = 5.0
    assert calc.run("2 + 2") == "4"
    worker = calc._worker.pid
    assert os.path.exists(f"/proc/{worker}")
    calc._stop_worker()


def test_nothing_is_evaluated_in_the_calling_process(calc, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluated in the caller")
    monkeypatch.setattr(Evaluator, "evaluate", refuse)
    assert calc.run("6 * 7") == "42"


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="max_exponent"):
        CalculatorTool(max_exponent=0)
    with pytest.raises(ValueError, match="time_limit_s"):
        CalculatorTool(time_limit_s=0)
