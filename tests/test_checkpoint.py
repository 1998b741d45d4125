import random

import numpy as np
import pytest
import torch

from appo import checkpoint as ckpt
from appo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_directories
from appo.config import load_config, to_dict


class TiedLM(torch.nn.Module):
    """Embedding and output head share one weight, like SmolLM2."""

    def __init__(self, vocab=37, width=11):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def train_steps(model, optimizer, generator, steps):
    for _ in range(steps):
        tokens = torch.randint(0, 37, (3, 5), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def make_run(seed=0):
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.Generator().manual_seed(seed + 1)


def draws(generator):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.rand(2, generator=generator).tolist())


def test_exact_resume_of_weights_optimizer_and_rng(tmp_path):
    model, optimizer, gen = make_run()
    train_steps(model, optimizer, gen, 3)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    config = load_config()
    extra = {"cursor": 12, "ids": torch.arange(4)}
    save_checkpoint(tmp_path, 3, model, optimizer, config, {"data": gen}, extra)
    expected_draws = draws(gen)
    train_steps(model, optimizer, gen, 2)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh_model, fresh_optimizer, fresh_gen = make_run(seed=9)
    random.seed(0)
    np.random.seed(0)
    loaded = load_checkpoint(tmp_path, fresh_model, fresh_optimizer, {"data": fresh_gen})
    assert loaded.step == 3 and loaded.config == to_dict(config)
    assert loaded.extra["cursor"] == 12 and torch.equal(loaded.extra["ids"], torch.arange(4))
    assert draws(fresh_gen) == expected_draws
    assert fresh_model.head.weight is fresh_model.embed.weight  # tying survives the load
    train_steps(fresh_model, fresh_optimizer, fresh_gen, 2)
    for key, value in fresh_model.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key


def test_interrupted_save_leaves_previous_checkpoint_valid(tmp_path, monkeypatch):
    model, optimizer, gen = make_run()
    first = save_checkpoint(tmp_path, 1, model, optimizer, {"lr": 1}, {"data": gen})
    saved_weight = model.mix.weight.detach().clone()
    train_steps(model, optimizer, gen, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt, "_fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, {"lr": 1}, {"data": gen})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert step_directories(tmp_path) == [first]
    restored, _, _ = make_run(seed=4)
    assert load_checkpoint(tmp_path, restored, restore_rng=False).step == 1
    assert torch.equal(restored.mix.weight, saved_weight)


def test_keep_last_k_and_resave_same_step(tmp_path):
    model, optimizer, _ = make_run()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert [p.name for p in step_directories(tmp_path)] == ["step-00000006", "step-00000008"]
    save_checkpoint(tmp_path, 8, model, None, {}, keep=2)
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(tmp_path, model, optimizer)


def test_missing_checkpoint_and_unknown_generator(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_checkpoint(tmp_path)
    model, optimizer, gen = make_run()
    save_checkpoint(tmp_path, 0, model, optimizer, {}, {"data": gen})
    with pytest.raises(ValueError, match="generators"):
        load_checkpoint(tmp_path, generators={"other": torch.Generator()})
