"""A real multi-turn rollout: SmolLM2-135M-Instruct with the sandboxed python tool on GSM8K prompts."""

from __future__ import annotations

import pytest
import torch

DEMOS = [("Tom has 3 boxes of 12 eggs and eats 5 eggs. How many eggs are left?",
          "<python>3 * 12 - 5</python>\n<result>31</result>\n<answer>31</answer>"),
         ("Sam reads 14 pages a day for 2 weeks. How many pages does he read?",
          "<python>14 * 7 * 2</python>\n<result>196</result>\n<answer>196</answer>")]


@pytest.mark.slow
@pytest.mark.data  # GSM8K prompts: $APPO_DATA_DIR
def test_smollm2_gsm8k_rollouts_call_python_and_keep_logprobs_aligned():
    from appo.models import load_model
    from appo.rollout.engine import RolloutConfig, RolloutEngine
    from appo.tasks import GSM8K, build_messages
    from appo.tools import make_tools

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    task = GSM8K()
    examples = task.examples("train")[:4]
    demos = [m for q, a in DEMOS
             for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    prompts = []
    for example in examples:
        messages = build_messages(example, tools=("python",), few_shot=0)
        ids = tokenizer.apply_chat_template(messages[:1] + demos + messages[1:], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append([int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
    config = RolloutConfig(temperature=0.3, max_new_tokens_per_turn=24, max_total_tokens=640,
                           max_tool_calls=2,
                           result_template="<result>{result}</result>\n", response_prefix="<python>")
    engine = RolloutEngine(model, tokenizer, make_tools(["python"], python={"max_output_chars": 200}), config)

    def score(group, text):
        reward = task.reward(text, examples[group])
        return reward.score, reward.correct

    batch = engine.generate(prompts, [0, 1, 2, 3], score=score)

    calls = [c for row in batch.tool_calls for c in row]
    assert calls, f"no rollout ran a python call: {batch.texts}"
    for r, row_calls in enumerate(batch.tool_calls):
        for call in row_calls:
            assert not batch.mask[r, call.result_span[0]:call.result_span[1]].any()
            assert tokenizer.decode(batch.tokens[r, call.result_span[0]:call.result_span[1]].tolist()) == \
                f"<result>{call.result}</result>\n"
    assert engine.stats.forward_tokens == int(batch.lengths.sum()) - batch.num_rollouts
    assert set(batch.finish_reasons) <= {"answer", "eos", "length", "tool_limit", "error"}
    rewards = [score(g, t)[0] for g, t in zip(range(4), batch.texts)]
    assert batch.rewards.tolist() == pytest.approx(rewards)

    generated = batch.mask[:, 1:]  # token t+1 is scored from the hidden state at t
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=batch.tokens, attention_mask=batch.attention_mask())
        logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][generated])
    ref = torch.log_softmax(logits.double() / config.temperature, dim=-1)
    ref = ref.gather(-1, batch.tokens[:, 1:][generated][:, None]).squeeze(-1)
    assert (ref - batch.behaviour_logprobs[:, 1:][generated].double()).abs().max() < 1e-4
