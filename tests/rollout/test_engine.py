"""Rollout engine on a tiny random Llama, a character tokenizer, a calculator tool and steered sampling."""

from __future__ import annotations

import pytest
import torch
from fakes import Calculator, CharTokenizer, SteeredModel

from appo.models import tiny_model
from appo.rollout.engine import RolloutConfig, RolloutEngine

# previous token -> steered next token: "Q:" <python>6*7</python> <result>..</result>\n <answer>42</answer>
ANSWER_SCRIPT = {":": "<python>", "<python>": "6", "6": "*", "*": "7", "7": "</python>", "\n": "<answer>",
                 "<answer>": "4", "4": "2", "2": "</answer>"}
# same, but after every result the model calls the tool again
LOOP_SCRIPT = {**ANSWER_SCRIPT, "\n": "<python>"}


# The settings these tests were written with, where they differ from RolloutConfig's (the CPU demo's) defaults.
LIBRARY = {"temperature": 1.0, "result_template": "<result>\n{result}\n</result>\n", "response_prefix": "",
           "max_batch_rows": None}


def make_engine(script, strength, *, tools=True, seed=0, arch="llama", **config):
    tokenizer = CharTokenizer()
    model = SteeredModel(tiny_model(arch, vocab_size=128, seed=seed), tokenizer, script, strength)
    config = RolloutConfig(**{**LIBRARY, "max_new_tokens_per_turn": 12, "max_total_tokens": 96,
                              "max_tool_calls": 2, **config})
    return RolloutEngine(model, tokenizer, {"python": Calculator()} if tools else {}, config, seed=seed)


def prompts_for(engine, count):
    """Prompts of odd, different lengths, all ending in ':' (the steering hook)."""
    return [engine.tokenizer.encode("abcdefg"[: 1 + (2 * i) % 7] * (i % 3 + 1) + "Q:") for i in range(count)]


def reference_logprobs(engine, batch):
    """fp64 log-probs of every token (given its predecessors) from one plain forward over the padded batch."""
    with torch.no_grad():
        logits = engine.model(input_ids=batch.tokens, attention_mask=batch.attention_mask()).logits
    logp = torch.log_softmax(logits[:, :-1].double() / engine.config.temperature, dim=-1)
    return logp.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)


def assert_logprobs_match(engine, batch, tol=1e-4):
    ref = reference_logprobs(engine, batch)
    generated = batch.mask[:, 1:]
    assert generated.sum() > 0
    err = (ref - batch.behaviour_logprobs[:, 1:].double())[generated].abs().max().item()
    assert err < tol, f"recorded behaviour_logprobs differ from a full forward by {err}"
    assert (batch.behaviour_logprobs[~batch.mask] == 0).all()


@pytest.mark.parametrize("arch,temperature,top_p", [("llama", 1.0, 1.0), ("qwen2", 0.7, 0.9)])
def test_logprobs_match_full_forward_across_tool_turns(arch, temperature, top_p):
    engine = make_engine(ANSWER_SCRIPT, 9.0, arch=arch, temperature=temperature, top_p=top_p)
    batch = engine.generate(prompts_for(engine, 7), list(range(7)))
    calls = [c for row in batch.tool_calls for c in row]
    assert len(calls) >= 3, "the steered model should call the tool in several rows"
    assert len({c.result_span[1] - c.result_span[0] for c in calls}) >= 2, "results should be ragged (holes)"
    assert_logprobs_match(engine, batch)


def test_tool_results_are_masked_and_spans_are_exact():
    engine = make_engine(LOOP_SCRIPT, 30.0)
    batch = engine.generate(prompts_for(engine, 5), [0, 0, 1, 1, 2])
    tok = engine.tokenizer
    for r in range(batch.num_rollouts):
        assert batch.finish_reasons[r] == "tool_limit"
        assert len(batch.tool_calls[r]) == 2
        for call in batch.tool_calls[r]:
            a, b = call.call_span
            assert tok.decode(batch.tokens[r, a:b].tolist()) == "<python>6*7</python>"
            assert batch.mask[r, a:b].all()
            a, b = call.result_span
            assert tok.decode(batch.tokens[r, a:b].tolist()) == f"<result>\n{call.result}\n</result>\n"
            assert not batch.mask[r, a:b].any()
            assert call.query == "6*7" and call.result.strip() == "42"
        assert not batch.mask[r, : batch.prompt_lengths[r]].any()
        assert batch.mask[r, batch.lengths[r] - 1]  # the final closing tag was generated
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2]
    assert (batch.parent == -1).all() and (batch.branch_pos == -1).all()


def test_finish_reasons_answer_eos_length_error():
    answer = make_engine(ANSWER_SCRIPT, 30.0)
    batch = answer.generate(prompts_for(answer, 3), [0, 1, 2],
                            score=lambda g, text: (1.0 if "<answer>42</answer>" in text else 0.0, 1.0))
    assert batch.finish_reasons == ["answer"] * 3
    assert batch.answers == ["42"] * 3 and batch.rewards.tolist() == [1.0] * 3 and batch.correct == [1.0] * 3

    engine = make_engine({":": "<eos>"}, 30.0)
    batch = engine.generate(prompts_for(engine, 2), [0, 1])
    assert batch.finish_reasons == ["eos", "eos"] and (batch.lengths == batch.prompt_lengths + 1).all()

    per_turn = make_engine({":": "a", "a": "a"}, 30.0, max_new_tokens_per_turn=5)
    batch = per_turn.generate(prompts_for(per_turn, 2), [0, 1])
    assert batch.finish_reasons == ["length", "length"] and (batch.lengths - batch.prompt_lengths == 5).all()

    total = make_engine({":": "a", "a": "a"}, 30.0, max_total_tokens=20, max_new_tokens_per_turn=50)
    batch = total.generate(prompts_for(total, 3), [0, 1, 2])
    assert batch.finish_reasons == ["length"] * 3 and (batch.lengths == 20).all()

    no_tool = make_engine(ANSWER_SCRIPT, 30.0, tools=False)  # </python> closed with no python tool
    assert no_tool.generate(prompts_for(no_tool, 1), [0]).finish_reasons == ["error"]

    unopened = make_engine({":": "6", "6": "</python>"}, 30.0)  # closing tag without an opening one
    assert unopened.generate(prompts_for(unopened, 1), [0]).finish_reasons == ["error"]


def test_tool_limit_zero_calls_no_tool():
    engine = make_engine(ANSWER_SCRIPT, 30.0, max_tool_calls=0)
    batch = engine.generate(prompts_for(engine, 2), [0, 1])
    assert batch.finish_reasons == ["tool_limit"] * 2 and batch.tool_calls == [[], []]
    assert engine.tools["python"].calls == 0


def test_forward_counter_shows_no_reprefill():
    """Every token of every row is fed exactly once, except each row's last sampled token."""
    engine = make_engine(LOOP_SCRIPT, 9.0, max_tool_calls=3)
    batch = engine.generate(prompts_for(engine, 6), list(range(6)))
    n_results = sum(c.result_span[1] - c.result_span[0] for row in batch.tool_calls for c in row)
    assert n_results > 0
    assert engine.stats.forward_tokens == int(batch.lengths.sum()) - batch.num_rollouts
    assert engine.stats.prefill_tokens == int(batch.prompt_lengths.sum())
    assert engine.stats.result_tokens == n_results
    assert engine.stats.generated_tokens == int(batch.mask.sum())


def test_reprefill_baseline_gives_same_rollouts_with_more_forward_tokens():
    cached = make_engine(LOOP_SCRIPT, 30.0)
    naive = make_engine(LOOP_SCRIPT, 30.0, reuse_cache=False)
    prompts = prompts_for(cached, 4)
    a, b = cached.generate(prompts, [0, 1, 2, 3]), naive.generate(prompts, [0, 1, 2, 3])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.behaviour_logprobs, b.behaviour_logprobs, atol=1e-4)
    assert naive.stats.forward_tokens > cached.stats.forward_tokens
    assert naive.stats.prefill_tokens > cached.stats.prefill_tokens
    assert_logprobs_match(naive, b)


def test_max_batch_rows_decodes_in_chunks_with_the_same_bundle():
    """Strongly steered sampling is near-deterministic: chunked and all-at-once decoding agree row by row (the
    fake calculator pads its results by call count, so result texts differ with the call order)."""
    whole = make_engine(LOOP_SCRIPT, 30.0)
    chunked = make_engine(LOOP_SCRIPT, 30.0, max_batch_rows=2)
    prompts = prompts_for(whole, 5)
    a, b = whole.generate(prompts, [4, 3, 2, 1, 0]), chunked.generate(prompts, [4, 3, 2, 1, 0])
    assert b.group_ids.tolist() == [4, 3, 2, 1, 0]
    assert a.finish_reasons == b.finish_reasons
    assert [[c.query for c in row] for row in a.tool_calls] == [[c.query for c in row] for row in b.tool_calls]
    assert chunked.stats.decode_steps > whole.stats.decode_steps  # three chunks decode one after another
    assert_logprobs_match(chunked, b)
    branches = chunked.continue_branches(b, torch.tensor([0, 1, 2, 3, 4]), b.prompt_lengths + 1)
    assert branches.parent.tolist() == [0, 1, 2, 3, 4]
    assert_logprobs_match(chunked, branches)


def gather_prefix_cache(engine, batch, src, pos, include_token=False):
    """The gathered prefix cache of appo.prefix_cache from a plain forward over the finished batch."""
    from appo.prefix_cache import gather_prefix_kv

    with torch.no_grad():
        out = engine.model(input_ids=batch.tokens, attention_mask=batch.attention_mask(), use_cache=True)
    return gather_prefix_kv(out.past_key_values, src, pos, include_token=include_token)


def branch_setup():
    engine = make_engine(LOOP_SCRIPT, 7.0, max_tool_calls=3, max_total_tokens=120)
    batch = engine.generate(prompts_for(engine, 4), [0, 0, 1, 1])
    src, pos = [], []
    for r in range(batch.num_rollouts):
        generated = batch.mask[r].nonzero().flatten()
        src += [r, r]
        pos += [int(generated[0]), int(generated[len(generated) // 2])]  # first token; a middle one
    return engine, batch, torch.tensor(src), torch.tensor(pos)


def test_continue_branches_with_gathered_cache_matches_prefill_fallback():
    engine, batch, src, pos = branch_setup()
    cache = gather_prefix_cache(engine, batch, src, pos)

    engine.stats.reset()
    engine.model.logits_seen.clear()
    engine.generator.manual_seed(123)
    engine.tools["python"].calls = 0  # same ragged result lengths in both runs
    cached = engine.continue_branches(batch, src, pos, past_key_values=cache)
    first_cached = engine.model.logits_seen[0]
    assert engine.stats.prefill_tokens == 0  # only each prefix's last token, then the new tokens
    assert engine.stats.forward_tokens == int((cached.lengths - pos).sum())

    engine.stats.reset()
    engine.model.logits_seen.clear()
    engine.generator.manual_seed(123)
    engine.tools["python"].calls = 0  # same ragged result lengths in both runs
    fallback = engine.continue_branches(batch, src, pos)
    first_fallback = engine.model.logits_seen[0]
    assert engine.stats.prefill_tokens == int(pos.sum())
    assert engine.stats.forward_tokens == int((fallback.lengths - 1).sum())

    assert torch.allclose(first_cached, first_fallback, atol=1e-4)
    assert torch.equal(cached.tokens, fallback.tokens)
    for out in (cached, fallback):
        assert out.parent.tolist() == src.tolist() and out.branch_pos.tolist() == pos.tolist()
        assert out.group_ids.tolist() == batch.group_ids[src].tolist()
        for k, (s, p) in enumerate(zip(src.tolist(), pos.tolist())):
            assert torch.equal(out.tokens[k, :p], batch.tokens[s, :p])
            assert torch.equal(out.mask[k, :p], batch.mask[s, :p])
            assert torch.equal(out.behaviour_logprobs[k, :p], batch.behaviour_logprobs[s, :p])
        assert_logprobs_match(engine, out)


def test_continue_branches_counts_prefix_tool_calls():
    engine = make_engine(LOOP_SCRIPT, 30.0, max_tool_calls=2)
    batch = engine.generate(prompts_for(engine, 2), [0, 1])
    assert all(len(calls) == 2 for calls in batch.tool_calls)
    after_first = torch.tensor([c[0].result_span[1] for c in batch.tool_calls])  # "<python>" of call 2
    after_second = torch.tensor([c[1].result_span[1] for c in batch.tool_calls])  # final "<python>"
    src = torch.tensor([0, 1, 0, 1])
    pos = torch.cat([after_first, after_second])
    calls_before = engine.tools["python"].calls
    cache = gather_prefix_cache(engine, batch, src, pos)
    out = engine.continue_branches(batch, src, pos, past_key_values=cache)
    assert out.finish_reasons == ["tool_limit"] * 4
    assert [len(c) for c in out.tool_calls] == [2, 2, 2, 2]
    assert engine.tools["python"].calls - calls_before == 2  # one new call each for the first two branches
    assert [c[0].call_span for c in out.tool_calls] == [c[0].call_span for c in batch.tool_calls] * 2


def test_include_token_keeps_the_branch_token():
    engine, batch, src, pos = branch_setup()
    first_logits = []
    for cache in (None, gather_prefix_cache(engine, batch, src, pos, include_token=True)):
        engine.model.logits_seen.clear()
        engine.stats.reset()
        out = engine.continue_branches(batch, src, pos, include_token=True, past_key_values=cache)
        first_logits.append(engine.model.logits_seen[0])
        assert engine.stats.prefill_tokens == (0 if cache is not None else int((pos + 1).sum()))
        for k, (s, p) in enumerate(zip(src.tolist(), pos.tolist())):
            assert torch.equal(out.tokens[k, : p + 1], batch.tokens[s, : p + 1])
        assert_logprobs_match(engine, out)
    assert torch.allclose(first_logits[0], first_logits[1], atol=1e-4)


def test_entropy_recorded_while_decoding_matches_a_full_forward():
    """The engine records each generated token's full-vocabulary entropy from the logits it sampled from."""
    engine = make_engine(ANSWER_SCRIPT, 3.0, temperature=0.8, top_p=0.9)
    batch = engine.generate(prompts_for(engine, 5), list(range(5)))
    with torch.no_grad():
        logits = engine.model(input_ids=batch.tokens, attention_mask=batch.attention_mask()).logits
    logp = torch.log_softmax(logits[:, :-1].double() / 0.8, dim=-1)
    reference = -(logp.exp() * logp).sum(-1)
    generated = batch.mask[:, 1:]
    assert batch.entropy is not None and batch.entropy.dtype == torch.float32
    assert (reference[generated] - batch.entropy[:, 1:][generated].double()).abs().max() < 1e-4
    assert (batch.entropy[~batch.mask] == 0).all() and (batch.entropy[batch.mask] > 0).all()
    branches = engine.continue_branches(batch, torch.tensor([0, 3]), batch.prompt_lengths[[0, 3]] + 2)
    assert branches.entropy is not None and torch.equal(branches.entropy[0, :batch.prompt_lengths[0] + 2],
                                                        batch.entropy[0, :batch.prompt_lengths[0] + 2])


@pytest.mark.parametrize("max_batch_rows", [None, 2])
def test_kept_decoding_cache_equals_a_forward_and_serves_branches(max_batch_rows):
    """generate_with_cache keeps the cache decoding built (holes dropped): per row the keys/values of every
    token but the last, as a forward over the finished rollouts gives them; branches decode from it."""
    from appo.prefix_cache import gather_prefix_kv

    engine = make_engine(LOOP_SCRIPT, 7.0, max_tool_calls=3, max_total_tokens=120, max_batch_rows=max_batch_rows)
    batch, kept = engine.generate_with_cache(prompts_for(engine, 5), [0, 0, 1, 1, 2])
    assert any(batch.tool_calls), "ragged tool results leave holes in the decode cache"
    with torch.no_grad():
        out = engine.model(input_ids=batch.tokens, attention_mask=batch.attention_mask(), use_cache=True)
    assert len(kept.layers) == len(out.past_key_values.layers)
    for mine, full in zip(kept.layers, out.past_key_values.layers):
        assert mine.keys.shape == full.keys.shape
        for r, n in enumerate((batch.lengths - 1).tolist()):
            assert torch.allclose(mine.keys[r, :, :n], full.keys[r, :, :n], atol=1e-5)
            assert torch.allclose(mine.values[r, :, :n], full.values[r, :, :n], atol=1e-5)
            assert (mine.keys[r, :, n:] == 0).all()
    src = torch.tensor([0, 2, 4])
    pos = torch.stack([batch.mask[r].nonzero()[3, 0] for r in src.tolist()])
    engine.stats.reset()
    cache = gather_prefix_kv(kept, src, pos, lengths=batch.lengths)
    branches = engine.continue_branches(batch, src, pos, past_key_values=cache)
    assert engine.stats.prefill_tokens == 0
    assert_logprobs_match(engine, branches)


@pytest.mark.parametrize("cached", [False, True])
def test_include_token_that_closes_a_tool_call_runs_the_tool(cached):
    """Keeping a chosen token that completes "</python>" must run the call it closes, as it did for the
    parent, and the branch continues after the result (it never goes on as free text)."""
    engine = make_engine(ANSWER_SCRIPT, 30.0)
    batch = engine.generate(prompts_for(engine, 3), [0, 1, 2])
    closing = torch.tensor([calls[0].call_span[1] - 1 for calls in batch.tool_calls])  # the "</python>" token
    src = torch.arange(3)
    calls_before = engine.tools["python"].calls
    cache = gather_prefix_cache(engine, batch, src, closing, include_token=True) if cached else None
    out = engine.continue_branches(batch, src, closing, include_token=True, past_key_values=cache)
    assert engine.tools["python"].calls - calls_before == 3
    for k in range(3):
        call = out.tool_calls[k][0]
        assert call.query == "6*7" and call.call_span == batch.tool_calls[k][0].call_span
        assert call.result_span[0] == int(closing[k]) + 1
        assert not out.mask[k, call.result_span[0]:call.result_span[1]].any()
    assert out.finish_reasons == ["answer"] * 3 and out.answers == ["42"] * 3
    assert_logprobs_match(engine, out)


def test_include_token_that_closes_the_answer_finishes_the_branch():
    engine = make_engine(ANSWER_SCRIPT, 30.0)
    batch = engine.generate(prompts_for(engine, 2), [0, 1], score=lambda g, text: (float("42" in text), 1.0))
    last = batch.lengths - 1                     # "</answer>": the rollouts' last token
    out = engine.continue_branches(batch, torch.arange(2), last, include_token=True,
                                   score=lambda g, text: (float("42" in text), 1.0))
    assert out.finish_reasons == ["answer", "answer"] and torch.equal(out.lengths, batch.lengths)
    assert out.rewards.tolist() == [1.0, 1.0]


def test_bad_input_raises_value_error():
    engine = make_engine(ANSWER_SCRIPT, 30.0)
    with pytest.raises(ValueError, match="group_ids"):
        engine.generate([[5, 6]], [0, 1])
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[]], [0])
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[5] * 96], [0])
    with pytest.raises(ValueError, match="temperature"):
        make_engine(ANSWER_SCRIPT, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        make_engine(ANSWER_SCRIPT, 1.0, top_p=1.5)
    batch = engine.generate(prompts_for(engine, 2), [0, 1])
    with pytest.raises(ValueError, match="pos"):  # a prompt token
        engine.continue_branches(batch, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="pos"):  # inside a tool result
        inside_result = batch.tool_calls[0][0].result_span[0]
        engine.continue_branches(batch, torch.tensor([0]), torch.tensor([inside_result]))
    with pytest.raises(ValueError, match="src"):
        engine.continue_branches(batch, torch.tensor([5]), torch.tensor([3]))
    src, pos = torch.tensor([0, 1]), batch.prompt_lengths + 1
    wrong = gather_prefix_cache(engine, batch, src, pos + 1)
    with pytest.raises(ValueError, match="past_key_values"):
        engine.continue_branches(batch, src, pos, past_key_values=wrong)


def test_response_prefix_opens_the_first_call():
    script = {k: v for k, v in ANSWER_SCRIPT.items() if k != ":"}
    engine = make_engine(script, 30.0, response_prefix="<python>")
    prompts = prompts_for(engine, 3)
    batch = engine.generate(prompts, [0, 1, 2])
    assert (batch.prompt_lengths == torch.tensor([len(p) + 1 for p in prompts])).all()
    assert batch.finish_reasons == ["answer"] * 3
    for r, calls in enumerate(batch.tool_calls):
        assert calls[0].query == "6*7" and calls[0].call_span[0] == len(prompts[r])
        assert batch.texts[r].startswith("<python>6*7</python><result>")
        assert not batch.mask[r, : len(prompts[r]) + 1].any()
    assert_logprobs_match(engine, batch)


def test_tool_step_costs_no_padding_for_rows_that_only_decode():
    """Rows feeding one token while others feed result blocks run apart: padding only among result rows."""
    engine = make_engine({**ANSWER_SCRIPT, "!": "x", "x": "x"}, 30.0, max_new_tokens_per_turn=14)
    prompts = [engine.tokenizer.encode(text) for text in ["abQ:", "cdefgQ!", "Q:", "hiQ!", "jklmnopQ:"]]
    batch = engine.generate(prompts, list(range(5)))
    assert batch.finish_reasons == ["answer", "length", "answer", "length", "answer"]
    blocks = [1 + c.result_span[1] - c.result_span[0] for calls in batch.tool_calls for c in calls]
    prefill_padding = sum(max(map(len, prompts)) - len(p) for p in prompts)
    assert engine.stats.padded_tokens == prefill_padding + sum(max(blocks) - b for b in blocks)
    assert engine.stats.forward_tokens == int(batch.lengths.sum()) - batch.num_rollouts
    assert_logprobs_match(engine, batch)


@pytest.mark.gpu
def test_cuda_rollouts_and_cached_branches():
    engine = make_engine(LOOP_SCRIPT, 9.0, max_tool_calls=3, max_total_tokens=120)
    engine = RolloutEngine(engine.model.to("cuda"), engine.tokenizer, engine.tools, engine.config)
    batch = engine.generate(prompts_for(engine, 6), [0, 0, 1, 1, 2, 2])
    assert batch.tokens.is_cuda and batch.behaviour_logprobs.is_cuda
    assert engine.stats.forward_tokens == int(batch.lengths.sum()) - batch.num_rollouts
    assert_logprobs_match(engine, batch)
    src = torch.arange(batch.num_rollouts, device="cuda")
    pos = torch.stack([batch.mask[r].nonzero()[1, 0] for r in range(batch.num_rollouts)])
    engine.stats.reset()
    cache = gather_prefix_cache(engine, batch, src, pos)
    out = engine.continue_branches(batch, src, pos, past_key_values=cache)
    assert engine.stats.prefill_tokens == 0
    assert_logprobs_match(engine, out)
