"""Red team, checkpoint files: a flipped bit, a truncated or missing file, a lost ``latest`` pointer or a lost
meta.json never loads silently and never sends a run back to step 0 while an intact checkpoint exists."""

import json

import pytest
import torch

from appo.checkpoint import (CheckpointError, CheckpointWarning, find_checkpoint, latest_checkpoint,
                             load_checkpoint, save_checkpoint, step_directories, verify_checkpoint)

FILES = ("model.safetensors", "optimizer.pt", "state.pt", "meta.json")


class TinyLM(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(31, 8)
        self.head = torch.nn.Linear(8, 31)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def trained(seed=0, steps=2):
    """A model and AdamW after ``steps`` updates on random tokens (so the optimizer state is not empty)."""
    model = TinyLM(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 31, (2, 5))
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints at steps 2 and 4 (different weights) under tmp_path; returns (dir, weights at 2, at 4)."""
    model, optimizer = trained(seed=0)
    save_checkpoint(tmp_path, 2, model, optimizer, {"optim": {"lr": 1e-2}}, extra={"cursor": 2})
    at_2 = {k: v.clone() for k, v in model.state_dict().items()}
    model, optimizer = trained(seed=1, steps=3)
    save_checkpoint(tmp_path, 4, model, optimizer, {"optim": {"lr": 1e-2}}, extra={"cursor": 4})
    return tmp_path, at_2, {k: v.clone() for k, v in model.state_dict().items()}


def flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def weights_equal(model, expected):
    return all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def assert_loads_with_warning(directory, match, step, weights):
    """load_checkpoint(directory) warns (a CheckpointWarning matching ``match``), resumes at ``step`` and
    loads ``weights`` into a fresh model (seeded apart from both saved ones)."""
    model = TinyLM(3)
    with pytest.warns(CheckpointWarning, match=match):
        assert load_checkpoint(directory, model, restore_rng=False).step == step
    assert weights_equal(model, weights)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_flipped_bit_in_any_file_is_detected(two_checkpoints, name, where):
    directory, _, _ = two_checkpoints
    file = directory / "step-00000004" / name
    size = file.stat().st_size
    flip_bit(file, {"start": 20 if name != "meta.json" else size // 3, "middle": size // 2, "end": size - 3}[where])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        verify_checkpoint(directory / "step-00000004")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(directory / "step-00000004", TinyLM(5))


def test_a_weight_bit_flip_that_still_parses_is_caught_by_the_checksum(two_checkpoints):
    directory, _, at_4 = two_checkpoints
    file = directory / "step-00000004" / "model.safetensors"
    flip_bit(file, file.stat().st_size - 3)  # inside the last tensor: safetensors itself loads it fine
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 does not match"):
        load_checkpoint(directory / "step-00000004", TinyLM(5))
    loaded = TinyLM(5)
    load_checkpoint(directory / "step-00000004", loaded, verify=False, restore_rng=False)
    assert not weights_equal(loaded, at_4)  # what resuming without the checksum would have done


@pytest.mark.parametrize("name", FILES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, name):
    directory, at_2, _ = two_checkpoints
    file = directory / "step-00000004" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated, as by a full disk or a copy
    model, optimizer = trained(seed=9, steps=1)
    with pytest.warns(CheckpointWarning, match=rf"step-00000004.*{name.replace('.', '[.]')}"):
        loaded = load_checkpoint(directory, model, optimizer, restore_rng=False)
    assert loaded.step == 2 and loaded.extra == {"cursor": 2} and weights_equal(model, at_2)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json"])
def test_a_missing_file_falls_back_to_the_previous_checkpoint(two_checkpoints, name):
    directory, at_2, _ = two_checkpoints
    (directory / "step-00000004" / name).unlink()
    assert_loads_with_warning(directory, name.replace(".", "[.]"), 2, at_2)


def test_a_lost_or_stale_latest_pointer_still_finds_the_newest_checkpoint(two_checkpoints):
    directory, _, at_4 = two_checkpoints
    (directory / "latest").unlink()
    with pytest.warns(CheckpointWarning, match="latest is missing"):
        assert find_checkpoint(directory).name == "step-00000004"
    assert latest_checkpoint(directory).name == "step-00000004"
    (directory / "latest").write_text("step-00000002")  # a crash between the rename and the pointer update
    assert_loads_with_warning(directory, "names 'step-00000002'", 4, at_4)


def test_no_intact_checkpoint_is_an_error_naming_each_file(two_checkpoints):
    directory, _, _ = two_checkpoints
    flip_bit(directory / "step-00000004" / "state.pt", 40)
    (directory / "step-00000002" / "model.safetensors").write_bytes(b"")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as error:
        load_checkpoint(directory, TinyLM(0))
    message = str(error.value)
    assert "step-00000004/state.pt" in message and "step-00000002/model.safetensors" in message
    assert len(step_directories(directory)) == 2  # nothing was deleted


def test_meta_json_edited_by_hand_is_detected(two_checkpoints):
    directory, _, _ = two_checkpoints
    meta_file = directory / "step-00000004" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["optim"]["lr"] = 1.0  # valid JSON, other content
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta\.json: its checksum does not match"):
        verify_checkpoint(directory / "step-00000004")
    meta["step"] = 2
    (directory / "step-00000002" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="meta.json"):
        verify_checkpoint(directory / "step-00000002")


def test_weights_of_another_model_are_named_not_a_bare_traceback(two_checkpoints):
    directory, _, _ = two_checkpoints
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be loaded"):
        load_checkpoint(directory, torch.nn.Linear(3, 3), restore_rng=False)


def test_a_checkpoint_from_before_checksums_loads_with_a_warning(two_checkpoints):
    directory, _, at_4 = two_checkpoints
    meta_file = directory / "step-00000004" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({"step": meta["step"], "config": meta["config"]}))  # appo's old format
    assert_loads_with_warning(directory, "without checksums", 4, at_4)


def test_a_meta_json_nested_too_deep_is_named_not_a_recursion_error(two_checkpoints):
    directory, _, _ = two_checkpoints
    meta_file = directory / "step-00000004" / "meta.json"
    meta_file.write_text('{"step": 4, "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"meta\.json: unreadable \(nested too deep"):
        verify_checkpoint(directory / "step-00000004")
    with pytest.warns(CheckpointWarning, match="nested too deep"):
        assert load_checkpoint(directory, TinyLM(0), restore_rng=False).step == 2
