import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels run on the CPU interpreter. It must be chosen before any @triton.jit
# function is defined (importing torch defines none). On a CUDA machine the kernels compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the network: a Hugging Face hub lookup fails at once instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

DATA_REASON = ("needs this project's GSM8K / HotpotQA files: set APPO_DATA_DIR to a folder with "
               "gsm8k/train.jsonl and hotpotqa/dev_distractor_50.jsonl (.ci/run sets it when ../shared/data "
               "exists)")


def project_data_dir() -> Path | None:
    """The folder $APPO_DATA_DIR names, when it holds both data files; else None. The only way tests reach
    the project's data (a bare clone has none, and its tests skip the ones marked ``data``)."""
    configured = os.environ.get("APPO_DATA_DIR")
    if not configured:
        return None
    path = Path(configured)
    files = (path / "gsm8k" / "train.jsonl", path / "hotpotqa" / "dev_distractor_50.jsonl")
    return path if all(f.is_file() for f in files) else None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=DATA_REASON)
    has_data = project_data_dir() is not None
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("data") and not has_data:
            item.add_marker(skip_data)


@pytest.fixture
def appo_data_dir() -> Path:
    """This project's data folder ($APPO_DATA_DIR); the test skips when it is not set (see DATA_REASON)."""
    path = project_data_dir()
    if path is None:
        pytest.skip(DATA_REASON)
    return path


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
