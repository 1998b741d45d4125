"""data.task_options: the task's constructor options from the config, checked before anything loads, and
passed to the task by ``appo.trainer.load_task_data``."""

import pytest

from appo.config import ConfigError, load_config, resume_changes, to_dict
from appo.models import smollm2_path
from appo.trainer import load_task_data


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


HARD = ["data.task_options={min_operands: 3, max_operands: 4, max_operand: 500, num_dev: 300}"]


def test_options_reach_the_task_and_change_its_questions(tokenizer):
    config = load_config(None, [*HARD, "data.eval_size=300"])
    dev = load_task_data(config, tokenizer, "dev", 300)
    train = load_task_data(config, tokenizer, "train", 50)
    assert len(dev.examples) == 300
    assert {e.meta["operands"] for e in dev.examples} == {3, 4}
    assert dev.task.max_operand == 500 and dev.task.sizes["dev"] == 300
    # held-out questions stay disjoint from the training ones under the new options
    assert not {e.question for e in train.examples} & {e.question for e in dev.examples}
    default = load_task_data(load_config(), tokenizer, "dev", 16)
    assert {e.meta["operands"] for e in default.examples} <= {2, 3}


def test_an_override_changes_one_option_and_keeps_the_others(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  task_options: {max_operands: 4, max_operand: 500}\n")
    config = load_config(path, ["data.task_options.max_operand=50"])
    assert config.data.task_options == {"max_operands": 4, "max_operand": 50}


@pytest.mark.parametrize("override, key, words", [
    ("data.task_options={colour: red}", "data.task_options.colour", "no option 'colour'"),
    ("data.task_options.path=x.jsonl", "data.task_options.path", "data.path"),
    ("data.task_options.max_operand=0", "data.task_options.max_operand", "in [1, 1000000000000]"),
    ("data.task_options.max_operand=10000000000000", "data.task_options.max_operand",
     "must be in [1, 1000000000000], got 10000000000000"),
    ("data.task_options.num_dev=-1", "data.task_options.num_dev", "in [0, 10000000]"),
    ("data.task_options.max_operand=2.5", "data.task_options.max_operand", "expected int"),
    ("data.task_options.operators=true", "data.task_options.operators", "expected str"),
    ("data.task_options.operators='+%'", "data.task_options.operators", "'+-*/'"),
    ("data.task_options.min_operands=5", "data.task_options.min_operands", "max_operands"),
    ("data.eval_size=101", "data.eval_size", "num_dev"),
    ("data.task_options=[1]", "data.task_options", "dict"),
])
def test_bad_options_are_refused_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert error.value.key == key and str(error.value).startswith(f"{key}: ") and words in str(error.value)


def test_a_bad_option_in_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: 2\ndata:\n  task: arithmetic\n  task_options: {max_operand: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: data.task_options.max_operand: must be in \[1, "):
        load_config(path)


def test_options_of_other_tasks_are_checked_against_their_own_signature():
    assert load_config(None, ["data.task=gsm8k", "data.task_options.dev_size=100"]).data.task_options == {
        "dev_size": 100}
    with pytest.raises(ConfigError, match="hotpotqa task has no option 'seed' \\(it takes none\\)"):
        load_config(None, ["data.task=hotpotqa", "data.tool=search", "data.task_options.seed=1"])


def test_a_changed_option_is_a_config_change_on_resume():
    saved = to_dict(load_config(None, HARD))
    changes, _ = resume_changes(saved, load_config(None, [*HARD, "data.task_options.max_operand=9"]))
    assert list(changes) == ["data.task_options"]
    assert changes["data.task_options"][1]["max_operand"] == 9
