"""Red team, config and data files: a malformed YAML config or JSONL data file is refused with the file and the
line named, and a data row missing a field names the field and the line, before any model loads."""

import pytest

import appo.models
from appo.cli import main
from appo.config import load_config
from appo.tasks.data import read_jsonl


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(appo.models, "load_model", refuse)


@pytest.mark.parametrize("text, line, fragment", [
    ("steps: 3\nalgo: {rollouts_per_prompt: 4\nseed: 2\n", 3, "invalid YAML"),           # unclosed flow mapping
    ("steps: 3\noptim:\n  lr: 1e-5\n   betas: [0.9, 0.99]\n", 4, "invalid YAML"),  # bad indentation
    ("steps: 3\n\tseed: 1\n", 2, "invalid YAML"),                       # a tab
    ("steps: 3\nrollout: {temperature: 0.7}\nsteps: 4\n", 3, "steps: given twice (first on line 1)"),
    ("steps: 3\nrollout:\n  temprature: 0.7\n", 3, "rollout.temprature: unknown config key"),
    ("steps: 3\noptim:\n  grad_clip: -1\n", 3, "optim.grad_clip: must be in (0, 1000000], got -1"),
    ("algo: {rollouts_per_prompt: 8}\n", 1, "algo.rollouts_per_prompt: APPO needs M = (B + 1) * N"),
    ("steps: 3\nalgo: {M: 8}\n", 2, "algo.M: renamed: use algo.rollouts_per_prompt"),  # an old name
    ("- steps\n- 3\n", 1, "expected a mapping"),
    ("steps: 3\nseed: \xff\n".encode("latin-1"), 2, "not UTF-8"),
])
def test_config_file_errors_name_the_file_and_the_line(tmp_path, text, line, fragment):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}:") and fragment in message, message


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of eight aliases stand for 8**9 values: walking or copying them would never end."""
    lines = ["rollout:", "  vllm:", "    l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for level in range(1, 9):
        refs = ", ".join(f"k{i}: *l{level - 1}" for i in range(8))
        lines.append(f"    l{level}: &l{level} {{{refs}}}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: rollout\.vllm: expected plain YAML values"):
        load_config(path)


def test_override_wins_over_a_bad_file_value_and_its_own_errors_name_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: -1\n")
    assert load_config(path, ["optim.lr=1e-6"]).optim.lr == 1e-6  # the bad file value never applies
    with pytest.raises(ValueError, match=r"^overrides: 'optim.lr=\[1,': the value is not valid YAML"):
        load_config(path, ["optim.lr=[1,"])


def test_appo_train_reports_a_broken_config_file_in_one_line(tmp_path, capsys, no_model_load):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\nalgo: {rollouts_per_prompt: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path), f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{path}:" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lines, line, fragment", [
    (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": 2'], 2, "invalid JSON"),
    (['{"question": "a", "answer": "1"}', "", "[1, 2]"], 3, "expected a JSON object"),
    (['{"question": "a", "answer": "1"}', '"just text"'], 2, "expected a JSON object"),
    (['{"question": "a", "answer": "1"}', "{'question': 'b'}"], 2, "invalid JSON"),
])
def test_jsonl_errors_name_the_file_and_the_line(tmp_path, lines, line, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as error:
        read_jsonl(path)
    assert str(error.value).startswith(f"{path}:{line}:") and fragment in str(error.value)


def test_jsonl_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "\xff", "answer": "2"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not UTF-8"):
        read_jsonl(path)


@pytest.mark.parametrize("row, fragment", [
    ('{"answer": "2"}', "no 'question' field"),
    ('{"question": "What is 1 + 1?"}', "no 'answer' field"),
    ('{"question": null, "answer": "2"}', "'question' must be str"),
    ('{"question": ["What"], "answer": "2"}', "'question' must be str"),
    ('{"question": "What is 1 + 1?", "answer": true}', "'answer' must be str or int or float"),
])
def test_appo_eval_names_the_missing_field_and_the_line_before_loading(tmp_path, capsys, no_model_load, row,
                                                                     fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n\n' + row + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(path), "device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{path}:3:" in err and fragment in err, err
    assert "Traceback" not in err and "KeyError" not in err


def test_appo_eval_refuses_an_output_file_it_could_not_write(tmp_path, capsys, no_model_load):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(path), "--out", str(tmp_path / "missing" / "out.jsonl")])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_evaluate_itself_names_the_missing_field(tmp_path):
    """The Python API refuses the row too (the tiny model never generates: the rows are read first)."""
    import string

    from appo.config import load_config as load
    from appo.models import tiny_model
    from appo.trainer import evaluate

    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n{"answer": "5"}\n')

    class Tokenizer:
        pad_token_id, eos_token_id = 0, 2

        def apply_chat_template(self, messages, **options):
            return [3 + string.printable.index(c) % 90 for c in messages[-1]["content"]]

    with pytest.raises(ValueError, match=rf"{path}:2: the row has no 'question' field"):
        evaluate(load(None, ["device=cpu"]), data_path=str(path), model=tiny_model(vocab_size=128),
                 tokenizer=Tokenizer())
