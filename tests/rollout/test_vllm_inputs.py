"""Bad input to the vLLM backend is refused before vLLM is needed (runs without vLLM installed)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from appo.rollout.vllm import VLLMRolloutEngine, make_llm


def fake_llm(prefix_caching=True, logprobs_mode="processed_logprobs"):
    config = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
                             model_config=SimpleNamespace(logprobs_mode=logprobs_mode))
    return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))


def test_importing_the_backend_does_not_import_vllm():
    code = "import sys, appo.rollout.vllm; print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("kwargs, word", [({"enable_prefix_caching": False}, "enable_prefix_caching"),
                                          ({"logprobs_mode": "raw_logprobs"}, "logprobs_mode")])
def test_make_llm_refuses_settings_the_engine_cannot_use(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_llm("some/model", max_model_len=128, **kwargs)


def test_engine_names_a_wrong_llm():
    with pytest.raises(ValueError, match="llm: expected a vllm.LLM"):
        VLLMRolloutEngine(object())
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        VLLMRolloutEngine(fake_llm(prefix_caching=False))
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMRolloutEngine(fake_llm(logprobs_mode="raw_logprobs"))
    with pytest.raises(ValueError, match="llm_kwargs"):
        VLLMRolloutEngine(fake_llm(), dtype="float32")
