"""Datasets: where data is found (a path, $APPO_DATA_DIR, the hub), GSM8K's fixed split, the arithmetic
generator, HotpotQA examples.

The hub is never reached: a stand-in for ``datasets.load_dataset`` records what was asked and returns rows.
Tests on the project's real files are marked ``data`` and read them only through $APPO_DATA_DIR.
"""

import ast
import json
import operator
import re
import sys
import types

import pytest

from appo.tasks import Arithmetic, GSM8K, HotpotQA, data_dir, get_task, load_rows
from appo.tasks import data as data_module
from appo.tasks.gsm8k import gold_answer


# ------------------------------------------------------------------------------------------- tiny data
def gsm8k_rows(count, offset=0):
    """GSM8K-shaped rows whose answers differ (question i, answer i + offset)."""
    return [{"question": f"Question {i}: what is {i} + {offset}?",
             "answer": f"{i} + {offset}\n#### {i + offset:,}"} for i in range(count)]


def hotpotqa_rows(count, tag="local"):
    return [{"question": f"{tag} question {i}?", "answer": f"answer {i}", "type": "bridge", "level": "easy",
             "supporting_facts": {"title": [f"B{i}", f"A{i}"], "sent_id": [0, 1]},
             "context": {"title": [f"A{i}", f"B{i}"], "sentences": [["a."], ["b."]]}} for i in range(count)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def hub(monkeypatch):
    """A stand-in ``datasets`` module: ``load_dataset(repo, config, split=...)`` returns the rows put in
    ``hub.rows[repo]`` and records every call in ``hub.calls``. Caches are cleared around the test."""
    stand_in = types.ModuleType("datasets")
    stand_in.rows, stand_in.calls = {}, []

    def load_dataset(repo, config=None, *, split=None):
        stand_in.calls.append((repo, config, split))
        if repo not in stand_in.rows:
            raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (offline)")
        return list(stand_in.rows[repo])

    stand_in.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", stand_in)
    monkeypatch.delenv("APPO_DATA_DIR", raising=False)
    data_module._hub_rows.cache_clear()
    data_module._local_rows.cache_clear()
    yield stand_in
    data_module._hub_rows.cache_clear()
    data_module._local_rows.cache_clear()


# ------------------------------------------------------------------------------------------- sources
def test_data_dir_is_the_variable_or_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("APPO_DATA_DIR", raising=False)
    assert data_dir() is None
    monkeypatch.setenv("APPO_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("APPO_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="APPO_DATA_DIR"):
        data_dir()


def test_sources_in_order_path_then_variable_then_hub(hub, monkeypatch, tmp_path):
    hub.rows["openai/gsm8k"] = gsm8k_rows(30, offset=300)
    env = tmp_path / "env"
    write_jsonl(env / "gsm8k" / "train.jsonl", gsm8k_rows(20, offset=200))
    given = write_jsonl(tmp_path / "given" / "mine.jsonl", gsm8k_rows(10, offset=100))

    assert load_rows("gsm8k")[3]["answer"].endswith("#### 303")  # nothing local: the hub
    assert hub.calls == [("openai/gsm8k", "main", "train")]
    monkeypatch.setenv("APPO_DATA_DIR", str(env))
    assert len(load_rows("gsm8k")) == 20  # $APPO_DATA_DIR beats the hub
    assert len(load_rows("gsm8k", given)) == 10  # a path beats both
    assert len(load_rows("gsm8k", given.parent.parent / "env")) == 20  # a folder laid out like the variable's
    write_jsonl(tmp_path / "flat" / "train.jsonl", gsm8k_rows(7))
    assert len(load_rows("gsm8k", tmp_path / "flat")) == 7  # or a folder holding train.jsonl itself
    assert len(hub.calls) == 1


def test_variable_without_the_file_falls_through_to_the_hub(hub, monkeypatch, tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", gsm8k_rows(5))  # no hotpotqa/ here
    hub.rows["hotpotqa/hotpot_qa"] = hotpotqa_rows(4, tag="hub")
    monkeypatch.setenv("APPO_DATA_DIR", str(tmp_path))
    examples = HotpotQA().examples("dev")
    assert [e.question for e in examples] == [f"hub question {i}?" for i in range(4)]
    assert hub.calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert examples[2].meta["supporting_titles"] == ["A2", "B2"]


def test_no_source_names_every_place_looked_at(hub, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        GSM8K().examples("train")
    message = str(error.value)
    for place in ("data.path", "$APPO_DATA_DIR/gsm8k/train.jsonl", "openai/gsm8k", "ConnectionError"):
        assert place in message
    with pytest.raises(FileNotFoundError, match=r"path \(data.path\): no such file or folder"):
        GSM8K(path=tmp_path / "nope.jsonl").examples("train")
    with pytest.raises(FileNotFoundError, match="holds neither gsm8k/train.jsonl nor train.jsonl"):
        GSM8K(path=tmp_path).examples("train")


def test_a_malformed_local_file_names_the_file_line_and_field(hub, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(3))
    path.write_text(path.read_text() + '{"question": "no answer here"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:4: the row has no 'answer' field"):
        GSM8K(path).examples("train")
    rows = hotpotqa_rows(2)
    rows[1]["context"] = "not a mapping"
    with pytest.raises(ValueError, match=r"h.jsonl:2: field 'context' must be dict"):
        HotpotQA(write_jsonl(tmp_path / "h.jsonl", rows)).examples("dev")


def test_hub_without_datasets_installed_says_so(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(FileNotFoundError, match="datasets` is not installed"):
        load_rows("hotpotqa")


@pytest.fixture
def real_datasets(monkeypatch):
    """The real ``datasets`` library (part of appo[train]), with the row caches cleared around the test."""
    datasets = pytest.importorskip("datasets", reason="the real `datasets` library is part of appo[train]")
    monkeypatch.delenv("APPO_DATA_DIR", raising=False)
    data_module._hub_rows.cache_clear()
    yield datasets
    data_module._hub_rows.cache_clear()


def test_hub_rows_from_a_real_datasets_dataset(real_datasets, monkeypatch):
    """The real library's Dataset (nested features as in hotpot_qa) turns into the same rows as the file."""
    rows = hotpotqa_rows(3, tag="real")
    monkeypatch.setattr(real_datasets, "load_dataset",
                        lambda repo, config, split: real_datasets.Dataset.from_list(rows))
    assert list(load_rows("hotpotqa")) == rows


def test_train_without_data_stops_in_one_line_before_loading_the_model(hub, monkeypatch, tmp_path, capsys):
    import appo.models
    from appo.cli import main

    monkeypatch.setattr(appo.models, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "data.task=gsm8k", f"output_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("appo train: error: data.path: no gsm8k data") and "openai/gsm8k" in error
    assert len(error.splitlines()) == 1


def test_get_task_passes_path_to_data_tasks_only(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12))
    assert len(get_task("gsm8k", path=str(path), dev_size=2).examples("train")) == 10
    assert isinstance(get_task("arithmetic", path=None), Arithmetic)
    with pytest.raises(ValueError, match=r"path \(data.path\): the arithmetic task is generated"):
        get_task("arithmetic", path=str(path))
    with pytest.raises(ValueError, match="name"):
        get_task("mmlu")
    assert get_task("hotpotqa").tools == ("search",)


# ------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_split_is_deterministic_disjoint_and_complete_on_generated_rows(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(40, offset=1000))
    train, dev = GSM8K(path, dev_size=8).examples("train"), GSM8K(path, dev_size=8).examples("dev")
    assert (len(train), len(dev)) == (32, 8)
    assert not {e.id for e in train} & {e.id for e in dev}
    assert {e.id for e in train} | {e.id for e in dev} == {f"gsm8k-{i}" for i in range(40)}
    assert [e.id for e in train] == sorted((e.id for e in train), key=lambda i: int(i.split("-")[1]))
    assert [e.id for e in GSM8K(path, dev_size=8, seed=1).examples("dev")] != [e.id for e in dev]
    assert all(e.answer == str(1000 + int(e.id.split("-")[1])) for e in train + dev)  # commas removed
    with pytest.raises(ValueError, match="split"):
        GSM8K(path).examples("test")
    with pytest.raises(ValueError, match="dev_size"):
        GSM8K(path, dev_size=40).examples("train")


@pytest.mark.data
def test_gsm8k_split_of_the_real_file(appo_data_dir):
    train, dev = GSM8K().examples("train"), GSM8K().examples("dev")
    assert (len(train), len(dev)) == (6973, 500)
    assert len({e.id for e in train} | {e.id for e in dev}) == 7473
    assert [e.id for e in GSM8K(appo_data_dir / "gsm8k").examples("dev")] == [e.id for e in dev]
    examples = {e.id: e for e in train + dev}
    assert examples["gsm8k-0"].question.startswith("Natalia sold clips")
    assert examples["gsm8k-0"].answer == "72"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.answer) for e in examples.values())


def test_gold_answer():
    assert gold_answer("a\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="solution"):
        gold_answer("no marker")


# ------------------------------------------------------------------------------------------- HotpotQA
def test_hotpotqa_examples_from_a_file(tmp_path):
    examples = HotpotQA(write_jsonl(tmp_path / "h.jsonl", hotpotqa_rows(5))).examples("dev")
    assert [e.id for e in examples] == [f"hotpotqa-{i}" for i in range(5)]
    assert examples[1].answer == "answer 1" and examples[1].meta["supporting_titles"] == ["A1", "B1"]


@pytest.mark.data
def test_hotpotqa_examples_of_the_real_file(appo_data_dir):
    examples = HotpotQA().examples("dev")
    assert len(examples) == 50
    assert examples[0].question == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert examples[0].answer == "yes"
    assert examples[0].meta["supporting_titles"] == ["Ed Wood", "Scott Derrickson"]
    assert len({e.id for e in examples}) == 50


# ------------------------------------------------------------------------------------------- arithmetic
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
