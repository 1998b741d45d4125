"""Datasets: where data is found, GSM8K's fixed split, the arithmetic generator, HotpotQA examples."""

import ast
import operator
import re

import pytest

from appo.tasks import Arithmetic, GSM8K, HotpotQA, data_dir, get_task
from appo.tasks.gsm8k import gold_answer


def test_data_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("APPO_DATA_DIR", raising=False)
    assert (data_dir() / "gsm8k" / "train.jsonl").is_file()
    monkeypatch.setenv("APPO_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("APPO_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="APPO_DATA_DIR"):
        data_dir()


def test_gsm8k_split_is_deterministic_disjoint_and_complete():
    train, dev = GSM8K().examples("train"), GSM8K().examples("dev")
    assert (len(train), len(dev)) == (6973, 500)
    train_ids, dev_ids = {e.id for e in train}, {e.id for e in dev}
    assert not train_ids & dev_ids
    assert len(train_ids | dev_ids) == 7473
    assert [e.id for e in GSM8K().examples("dev")] == [e.id for e in dev]
    assert [e.id for e in GSM8K(seed=1).examples("dev")] != [e.id for e in dev]
    with pytest.raises(ValueError, match="split"):
        GSM8K().examples("test")


def test_gsm8k_gold_answers():
    examples = {e.id: e for e in GSM8K().examples("train") + GSM8K().examples("dev")}
    first = examples["gsm8k-0"]
    assert first.question.startswith("Natalia sold clips")
    assert first.answer == "72"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.answer) for e in examples.values())
    assert gold_answer("a\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="solution"):
        gold_answer("no marker")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _reference_value(expression):
    """Independent evaluation through Python's own parser (fractions-free: true division, then checked)."""
    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand)
        return _OPS[type(node.op)](walk(node.left), walk(node.right))
    return walk(ast.parse(expression, mode="eval").body)


def test_arithmetic_answers_are_exact_integers():
    task = Arithmetic(num_train=200, num_dev=50, min_operands=2, max_operands=5, max_operand=30,
                      operators="+-*/", seed=3)
    examples = task.examples("train") + task.examples("dev")
    for example in examples:
        value = _reference_value(example.meta["expression"])
        assert value == int(example.answer), example
        assert 2 <= example.meta["operands"] <= 5
    assert any("/" in e.question for e in examples) and any("(" in e.question for e in examples)


def test_arithmetic_is_seeded_and_disjoint():
    task = Arithmetic(num_train=300, num_dev=100, max_operand=20, max_operands=2)
    train, dev = task.examples("train"), task.examples("dev")
    assert (len(train), len(dev)) == (300, 100)
    assert not {e.question for e in train} & {e.question for e in dev}
    assert [e.question for e in Arithmetic(num_train=300, num_dev=100, max_operand=20, max_operands=2)
            .examples("train")] == [e.question for e in train]
    other = Arithmetic(num_train=300, num_dev=100, max_operand=20, max_operands=2, seed=1).examples("train")
    assert [e.question for e in other] != [e.question for e in train]


def test_arithmetic_bad_options():
    with pytest.raises(ValueError, match="operators"):
        Arithmetic(operators="+^")
    with pytest.raises(ValueError, match="min_operands"):
        Arithmetic(min_operands=4, max_operands=2)
    with pytest.raises(ValueError, match="max_operand"):
        Arithmetic(num_train=500, max_operand=2, max_operands=1).examples("train")


def test_hotpotqa_examples():
    examples = HotpotQA().examples("dev")
    assert len(examples) == 50
    assert examples[0].question == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert examples[0].answer == "yes"
    assert examples[0].meta["supporting_titles"] == ["Ed Wood", "Scott Derrickson"]
    assert len({e.id for e in examples}) == 50


def test_get_task():
    assert isinstance(get_task("arithmetic", num_dev=5), Arithmetic)
    assert get_task("hotpotqa").tools == ("search",)
    with pytest.raises(ValueError, match="name"):
        get_task("mmlu")
