"""Red team, the ``latest`` pointer: a run folder's checkpoint lies inside it, whatever the pointer says and
whether checksums are verified or not (issue 20, item 3). A pointer that names anything but a ``step-*``
directory of its own folder (``../other/step-*``, an absolute path) and a step directory that is a link leading
out of the folder are refused with one line naming them; nothing is loaded from outside."""

import pytest
import torch

import appo.models
from appo.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from appo.cli import main


class TinyLM(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(6, 5)


def weights(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def same(model, expected):
    return all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


CONFIG = {"model": {"name_or_path": "smollm2-135m-instruct"}}


@pytest.fixture
def run_and_intruder(tmp_path):
    """A run folder ``run/checkpoints`` with steps 2 and 4, and beside it ``intruder/step-00000009``, an intact
    checkpoint of other weights that an attacker wants the run to load. Returns (checkpoints, intruder step,
    weights at 4, the intruder's weights)."""
    checkpoints = tmp_path / "run" / "checkpoints"
    save_checkpoint(checkpoints, 2, TinyLM(2), None, CONFIG)
    own = TinyLM(4)
    save_checkpoint(checkpoints, 4, own, None, CONFIG)
    intruder_model = TinyLM(9)
    intruder = save_checkpoint(tmp_path / "intruder", 9, intruder_model, None,
                               {"model": {"name_or_path": "/intruder/model"}})
    return checkpoints, intruder, weights(own), weights(intruder_model)


def pointer_values(intruder):
    return {"relative": "../../intruder/step-00000009", "absolute": str(intruder),
            "a name with a path after it": "step-00000004/../../../intruder/step-00000009",
            "two lines": "step-00000004\n../../intruder/step-00000009"}


@pytest.mark.parametrize("kind", ["relative", "absolute", "a name with a path after it", "two lines"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_pointer_out_of_the_folder_is_refused_naming_it(run_and_intruder, kind, verify):
    checkpoints, intruder, _, theirs = run_and_intruder
    (checkpoints / "latest").write_text(pointer_values(intruder)[kind])
    model = TinyLM(0)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(checkpoints, model, restore_rng=False, verify=verify)
    message = str(error.value)
    assert message.startswith(f"{checkpoints / 'latest'}: holds ") and "\n" not in message, message
    assert not same(model, theirs)
    with pytest.raises(CheckpointError, match="latest: holds"):
        latest_checkpoint(checkpoints)
    with pytest.raises(CheckpointError, match="latest: holds"):
        find_checkpoint(checkpoints)


def test_a_pointer_that_is_not_text_or_too_long_is_refused(run_and_intruder):
    checkpoints, _, _, _ = run_and_intruder
    (checkpoints / "latest").write_bytes(b"step-\xff\xfe")
    with pytest.raises(CheckpointError, match="holds bytes that are not UTF-8"):
        load_checkpoint(checkpoints, verify=False)
    (checkpoints / "latest").write_text("step-00000004" + " " * 10_000)
    with pytest.raises(CheckpointError, match="latest: holds"):
        load_checkpoint(checkpoints, verify=False)


def test_an_empty_pointer_is_a_lost_one_not_a_refusal(run_and_intruder):
    """What a file system may leave after a crash during the pointer's update: the newest intact checkpoint
    is found by name, with a warning."""
    checkpoints, _, ours, _ = run_and_intruder
    (checkpoints / "latest").write_text("")
    model = TinyLM(0)
    with pytest.warns(CheckpointWarning, match="latest is missing"):
        assert load_checkpoint(checkpoints, model, restore_rng=False).step == 4
    assert same(model, ours) and latest_checkpoint(checkpoints).name == "step-00000004"


@pytest.mark.parametrize("verify", [True, False])
def test_a_step_directory_linking_out_is_never_loaded(run_and_intruder, verify):
    """``step-00000008`` inside the folder is a symbolic link to the intruder's checkpoint: verified loading
    skips it (naming it) for the newest checkpoint really inside; unverified loading refuses it."""
    checkpoints, intruder, ours, theirs = run_and_intruder
    (checkpoints / "step-00000008").symlink_to(intruder, target_is_directory=True)
    (checkpoints / "latest").write_text("step-00000008")
    model = TinyLM(0)
    if verify:
        with pytest.warns(CheckpointWarning, match=r"step-00000008: a link to .*intruder.*, outside"):
            assert load_checkpoint(checkpoints, model, restore_rng=False).step == 4
        assert same(model, ours)
    else:
        with pytest.raises(CheckpointError, match=r"step-00000008: a link to .*intruder.*, outside") as error:
            load_checkpoint(checkpoints, model, restore_rng=False, verify=False)
        assert "\n" not in str(error.value) and not same(model, theirs)


def test_only_links_leading_out_fail_with_no_checkpoint_left(tmp_path, run_and_intruder):
    _, intruder, _, _ = run_and_intruder
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "step-00000009").symlink_to(intruder, target_is_directory=True)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_checkpoint(lone)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(appo.models, "load_model", refuse)


def test_appo_eval_of_a_run_with_a_pointer_out_is_one_line(run_and_intruder, capsys, no_model_load):
    checkpoints, _, _, _ = run_and_intruder
    (checkpoints / "latest").write_text("../../intruder/step-00000009")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(checkpoints.parent), "device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{checkpoints / 'latest'}: holds '../../intruder/step-00000009'" in err


def test_appo_train_resuming_with_a_pointer_out_is_one_line(run_and_intruder, capsys, no_model_load):
    checkpoints, _, _, _ = run_and_intruder
    (checkpoints / "latest").write_text("/etc/step-00000001")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"output_dir={checkpoints.parent}", "device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{checkpoints / 'latest'}: holds '/etc/step-00000001'" in err
