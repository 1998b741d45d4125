"""The test suite's fixtures. What tests/ and bench/ share (the environment, the gpu/data markers,
``appo_data_dir``) lives in tests/support/shared_conftest.py, imported first; test doubles in
tests/support/fakes.py (both on sys.path through pyproject's pytest ``pythonpath``)."""

from pathlib import Path

import pytest
import torch
from shared_conftest import appo_data_dir, pytest_collection_modifyitems  # noqa: F401 (read by pytest)


@pytest.fixture
def seeded():
    """A seeded CPU generator (torch's global RNG seeded too) for reproducible random inputs."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) trained in memory on the arithmetic task's prompts,
    with a ChatML template and SmolLM2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from appo.tasks import Arithmetic, build_messages

    texts = [m["content"] for e in Arithmetic(num_train=20, num_dev=5).examples("train")
             for m in build_messages(e, tools=("python",), few_shot=1)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random llama (hidden 32, 2 layers) and ``tiny_tokenizer()``, saved as a transformers model
    folder: what ``model.name_or_path`` accepts besides SmolLM2, so `appo train` runs in seconds."""
    from appo.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=2, kv_heads=1)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
