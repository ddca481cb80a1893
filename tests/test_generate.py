"""Generation: the KV cache, the samplers, greedy and batched generation against transformers,
stopping (end tokens, max_new_tokens, stop strings, the context limit) and streaming text."""

import dataclasses

import numpy as np
import pytest

import qwen_np
from qwen_np.generate import (Sampling, apply_repetition_penalty, apply_temperature, choose_tokens, find_stop,
                              left_pad, min_p_filter, new_token_budget, partial_stop, sample, sampling_settings,
                              top_k_filter, top_p_filter)
from tiny import FAMILIES, reference_logits, tiny_model, write_spelling_model

PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 61, 2], [11, 12, 13], [90, 4, 33, 21, 70]]  # different lengths


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{family: (our Model, the transformers model)} for every family, built once for this file."""
    models = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        reference = tiny_model(family, directory)
        models[family] = (qwen_np.load(directory), reference)
    return models


def cached_logits(params, config, ids, prefill, attention_mask=None):  # [B, T] -> [B, T, V]
    """Prefill the first `prefill` tokens in one pass, then the rest one token at a time."""
    mask = None if attention_mask is None else attention_mask[:, :prefill]
    logits, cache = qwen_np.forward(params, config, ids[:, :prefill], attention_mask=mask)
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = qwen_np.forward(params, config, ids[:, t:t + 1], cache)
        steps.append(logits)
    assert cache.length == ids.shape[1]
    return np.concatenate(steps, axis=1)


# --- the KV cache ----------------------------------------------------------------------------

CACHE_CASES = {  # name -> (family, config overrides)
    **{family: (family, {}) for family in FAMILIES},
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3_sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
}


@pytest.mark.parametrize("case", CACHE_CASES)
def test_prefill_and_cached_decode_equal_one_full_forward(case, tmp_path):
    family, overrides = CACHE_CASES[case]
    reference = tiny_model(family, tmp_path, **overrides)
    model = qwen_np.load(tmp_path)
    if "sliding_window" in overrides:  # the case must really have windowed layers
        assert "sliding_attention" in model.config.layer_types
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 13))  # longer than the windows
    full, _ = qwen_np.forward(model.params, model.config, ids)
    cached = cached_logits(model.params, model.config, ids, prefill=5)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(cached, reference_logits(reference, ids), atol=1e-4, rtol=1e-4)

    # Left padding: a padded row's real positions give the same logits either way.
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    full, _ = qwen_np.forward(model.params, model.config, ids, attention_mask=mask)
    cached = cached_logits(model.params, model.config, ids, prefill=6, attention_mask=mask)
    np.testing.assert_allclose(cached[mask == 1], full[mask == 1], atol=2e-5, rtol=1e-5)


def test_decoding_writes_in_place_and_the_cache_grows_by_doubling(tiny_models):
    model, _ = tiny_models["qwen2"]
    _, cache = qwen_np.forward(model.params, model.config, np.array([[1, 2, 3]]))
    grown = 0
    for step in range(60):
        before = cache.keys[0]
        _, cache = qwen_np.forward(model.params, model.config, np.array([[step % 100]]), cache)
        if cache.keys[0] is not before:
            grown += 1
            assert cache.keys[0].shape[2] >= 2 * before.shape[2]  # capacity doubles
    assert cache.length == 63
    assert grown <= 5  # 3 -> 6 -> 12 -> 24 -> 48 -> 96: a copy only when the capacity doubles
    assert cache.keys[0].shape[2] < 2 * 63


# --- samplers against transformers' logits processors ----------------------------------------

def random_scores(rows=4, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, vocab)) * 3).astype(np.float32), rng.integers(0, vocab, (rows, 7))


def assert_same_scores(ours, theirs):
    theirs = theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_reference(reference, penalty):
    torch, transformers = reference
    scores, input_ids = random_scores()
    seen = np.zeros(scores.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=-1)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(input_ids), torch.tensor(scores))
    assert_same_scores(apply_repetition_penalty(scores, seen, penalty), theirs)
    assert not np.allclose(apply_repetition_penalty(scores, seen, penalty), scores)


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_reference(reference, temperature):
    torch, transformers = reference
    scores, input_ids = random_scores()
    theirs = transformers.TemperatureLogitsWarper(temperature)(torch.tensor(input_ids), torch.tensor(scores))
    assert_same_scores(apply_temperature(scores, temperature), theirs)


@pytest.mark.parametrize("top_k, keep", [(1, 1), (5, 1), (5, 8), (50, 1), (80, 1)])
def test_top_k_matches_reference(reference, top_k, keep):
    torch, transformers = reference
    scores, input_ids = random_scores()
    theirs = transformers.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(torch.tensor(input_ids),
                                                                          torch.tensor(scores))
    ours = top_k_filter(scores, top_k, keep)
    assert_same_scores(ours, theirs)
    assert (np.isfinite(ours).sum(-1) == min(max(top_k, keep), 50)).all()


@pytest.mark.parametrize("top_p, keep", [(0.05, 1), (0.5, 1), (0.9, 1), (0.5, 6), (1.0, 1)])
def test_top_p_matches_reference(reference, top_p, keep):
    torch, transformers = reference
    scores, input_ids = random_scores(seed=1)
    theirs = transformers.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(torch.tensor(input_ids),
                                                                          torch.tensor(scores))
    assert_same_scores(top_p_filter(scores, top_p, keep), theirs)


@pytest.mark.parametrize("min_p, keep", [(0.05, 1), (0.3, 1), (0.9, 3), (0.0, 1)])
def test_min_p_matches_reference(reference, min_p, keep):
    torch, transformers = reference
    scores, input_ids = random_scores(seed=2)
    theirs = transformers.MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(torch.tensor(input_ids),
                                                                          torch.tensor(scores))
    assert_same_scores(min_p_filter(scores, min_p, keep), theirs)


def test_the_samplers_chain_in_the_reference_order(reference):
    torch, transformers = reference
    scores, input_ids = random_scores(rows=3, vocab=200, seed=3)
    seen = np.zeros(scores.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=-1)
    processors = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.2), transformers.TemperatureLogitsWarper(3.0),
        transformers.TopKLogitsWarper(10), transformers.TopPLogitsWarper(0.5), transformers.MinPLogitsWarper(0.05)])
    theirs = processors(torch.tensor(input_ids), torch.tensor(scores))
    ours = min_p_filter(top_p_filter(top_k_filter(apply_temperature(apply_repetition_penalty(
        scores, seen, 1.2), 3.0), 10), 0.5), 0.05)
    assert_same_scores(ours, theirs)
    # choose_tokens applies this chain, then draws from it
    s = Sampling(temperature=3.0, top_k=10, top_p=0.5, min_p=0.05, repetition_penalty=1.2)
    for seed in range(20):
        chosen = choose_tokens(scores, seen, s, np.random.default_rng(seed))
        np.testing.assert_array_equal(chosen, sample(ours, np.random.default_rng(seed)))
        assert np.isfinite(ours[np.arange(3), chosen]).all()


def test_sample_draws_with_the_softmax_probabilities_and_repeats_with_a_seed():
    logits = np.log(np.array([[0.5, 0.0, 0.2, 0.3]], np.float32) + 1e-30).astype(np.float32)
    logits[0, 1] = -np.inf
    draws = np.concatenate([sample(np.repeat(logits, 1000, axis=0), np.random.default_rng(s)) for s in range(20)])
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, [0.5, 0.0, 0.2, 0.3], atol=0.01)
    assert frequencies[1] == 0  # a -inf token is never drawn
    again = [sample(np.repeat(logits, 100, axis=0), np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(*again)


def test_greedy_ignores_the_filters_but_not_the_repetition_penalty():
    scores, input_ids = random_scores(seed=4)
    seen = np.zeros(scores.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=-1)
    rng = np.random.default_rng(0)
    greedy = choose_tokens(scores, seen, Sampling(temperature=0, top_k=3, top_p=0.1), rng)
    np.testing.assert_array_equal(greedy, scores.argmax(-1))
    penalised = choose_tokens(scores, seen, Sampling(temperature=0, repetition_penalty=5.0), rng)
    np.testing.assert_array_equal(penalised, apply_repetition_penalty(scores, seen, 5.0).argmax(-1))


def test_sampling_defaults_come_from_generation_config_and_can_be_overridden():
    qwen_instruct = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert sampling_settings(qwen_instruct) == Sampling(0.7, 20, 0.8, 0.0, 1.05)
    assert sampling_settings(qwen_instruct, temperature=0, top_k=0) == Sampling(0.0, 0, 0.8, 0.0, 1.05)
    assert sampling_settings({}).temperature == 0  # no do_sample: greedy, like transformers' generate
    assert sampling_settings({"do_sample": False, "temperature": 0.6}).temperature == 0
    assert sampling_settings({"do_sample": True}) == Sampling(1.0, 50, 1.0, 0.0, 1.0)  # transformers' defaults
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                dict(repetition_penalty=0), dict(temperature=float("nan"))):
        with pytest.raises(qwen_np.QwenNPError, match=next(iter(bad))):
            sampling_settings({}, **bad)


# --- whole generations ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_equals_transformers_generate(reference, tiny_models, family):
    torch, _ = reference
    model, ref = tiny_models[family]
    ids, mask = left_pad(PROMPTS, 0)
    expected = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=24, pad_token_id=0)[:, ids.shape[1]:].numpy()
    steps = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0))
    assert len(steps) == 24
    np.testing.assert_array_equal(np.array(steps).T, expected)


def test_greedy_with_repetition_penalty_equals_transformers(reference, tiny_models):
    torch, _ = reference
    model, ref = tiny_models["qwen3"]
    ids, mask = left_pad(PROMPTS, 0)
    expected = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=24, pad_token_id=0, repetition_penalty=1.5)[:, ids.shape[1]:].numpy()
    steps = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0, repetition_penalty=1.5))
    np.testing.assert_array_equal(np.array(steps).T, expected)
    plain = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0))
    assert plain != steps  # the penalty changed something


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_a_batch_equals_its_prompts_alone_each_stopping_at_its_own_end_token(tiny_models, family):
    model, _ = tiny_models[family]
    alone = [list(qwen_np.generate(model, p, max_new_tokens=24, temperature=0)) for p in PROMPTS]
    eos = alone[0][6]  # a token the first prompt produces: it ends the first prompt early
    expected = [a[:a.index(eos)] if eos in a else a for a in alone]
    assert len(expected[0]) <= 6 and any(len(e) == 24 for e in expected)  # one ends early, one runs to the end

    steps = qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0, eos_token_id=eos)
    got = [[] for _ in PROMPTS]
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            stats = done.value
            break
        for row, token in enumerate(step):
            if token is not None:
                got[row].append(token)
    assert got == expected
    assert stats.finish_reasons == tuple("eos" if len(e) < 24 else "length" for e in expected)
    alone_with_eos = [list(qwen_np.generate(model, p, max_new_tokens=24, temperature=0, eos_token_id=[eos]))
                      for p in PROMPTS]
    assert alone_with_eos == expected


def test_a_seeded_sampled_run_repeats(tiny_models):
    model, _ = tiny_models["qwen3"]
    settings = dict(max_new_tokens=24, temperature=1.5, top_k=60, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    first = list(qwen_np.generate(model, PROMPTS[0], seed=3, **settings))
    assert len(first) == 24
    assert list(qwen_np.generate(model, PROMPTS[0], seed=3, **settings)) == first
    assert list(qwen_np.generate(model, PROMPTS[0], seed=4, **settings)) != first
    greedy = list(qwen_np.generate(model, PROMPTS[0], max_new_tokens=24, temperature=0))
    assert greedy != first


def test_generation_config_sets_the_defaults(tiny_models):
    model, _ = tiny_models["qwen2"]
    sampled = dataclasses.replace(model, generation_config={"do_sample": True, "temperature": 1.5, "top_k": 0,
                                                            "max_new_tokens": 7})
    default = list(qwen_np.generate(sampled, PROMPTS[1], seed=0))
    assert len(default) == 7  # generation_config's max_new_tokens
    assert default == list(qwen_np.generate(model, PROMPTS[1], seed=0, temperature=1.5, top_k=0, max_new_tokens=7))
    assert list(qwen_np.generate(sampled, PROMPTS[1], temperature=0)) == list(
        qwen_np.generate(model, PROMPTS[1], max_new_tokens=7))  # the caller's temperature=0 wins: greedy


def test_bad_prompts_are_clear_errors(tiny_models):
    model, _ = tiny_models["qwen2"]  # vocab_size=128, no tokenizer
    for prompt, message in [([], "empty"), ([3, 128], "outside the vocabulary"), ([-1, 2], "outside the vocabulary"),
                            ("text", "no tokenizer.json")]:
        with pytest.raises(qwen_np.QwenNPError, match=message):
            next(qwen_np.generate(model, prompt))
    with pytest.raises(qwen_np.QwenNPError, match="list of prompts"):
        next(qwen_np.generate_batch(model, "one prompt"))


def test_prompt_plus_max_new_tokens_must_fit_in_the_context(tiny_models):
    model, _ = tiny_models["qwen2"]  # max_position_embeddings=128
    with pytest.raises(qwen_np.QwenNPError, match="max_position_embeddings=128"):
        next(qwen_np.generate(model, list(range(100)), max_new_tokens=29))
    assert len(list(qwen_np.generate(model, list(range(100)), max_new_tokens=28, temperature=0))) == 28
    assert new_token_budget(model.config, {}, 100, None) == 28  # the default fits what is left
    with pytest.raises(qwen_np.QwenNPError, match="positive integer"):
        new_token_budget(model.config, {}, 100, 0)
    dynamic = dataclasses.replace(model.config, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                 "factor": 2.0})
    assert new_token_budget(dynamic, {}, 100, 200) == 200  # dynamic NTK RoPE extends past the limit


def test_yarn_generates_past_max_position_embeddings_as_transformers_does(reference, tmp_path):
    # As Qwen's model cards set it up: YaRN added, max_position_embeddings left at the original.
    torch, _ = reference
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}
    ref = tiny_model("qwen2", tmp_path, max_position_embeddings=16, rope_parameters=yarn)
    model = qwen_np.load(tmp_path)
    prompt = list(range(10, 22))
    expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)[0, len(prompt):].tolist()
    assert list(qwen_np.generate(model, prompt, max_new_tokens=40, temperature=0)) == expected  # to position 52
    assert new_token_budget(model.config, {}, 12, None) == 52  # the default: what fits in 4 x 16
    with pytest.raises(qwen_np.QwenNPError, match="context of 64 positions .*factor times original"):
        new_token_budget(model.config, {}, 12, 53)


def tokens_and_stats(generator):  # -> (every token it yields, its GenerationStats)
    tokens = []
    while True:
        try:
            tokens.append(next(generator))
        except StopIteration as done:
            return tokens, done.value


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_a_past_prefills_only_what_the_prompt_adds_and_stays_reusable(tiny_models, family):
    model, _ = tiny_models[family]

    def greedy(prompt, past=None):
        return tokens_and_stats(qwen_np.generate(model, prompt, max_new_tokens=10, temperature=0, past=past))

    answer, stats = greedy(PROMPTS[0])
    held = PROMPTS[0] + answer[:-1]  # the last token chosen never ran through the model
    assert stats.past.ids == tuple(held) and stats.past.cache.length == len(held)
    assert (stats.prefill_tokens, stats.reused_tokens) == (len(PROMPTS[0]), 0)

    follow_up = PROMPTS[0] + answer + [5, 6, 7]  # the next turn: the conversation so far, then more
    branch = PROMPTS[0][:4] + [1, 2, 3]  # shares only its first 4 tokens with the past
    for prompt, shared in [(follow_up, len(held)), (branch, 4), (held, len(held) - 1), (follow_up, len(held))]:
        tokens, again = greedy(prompt, stats.past)
        assert (again.reused_tokens, again.prefill_tokens) == (shared, len(prompt) - shared)
        # The same tokens as without the past; the follow-up a second time after the branch,
        # whose new tokens would have overwritten the past's cache had it been written in place.
        assert tokens == greedy(prompt)[0]


def test_a_past_must_come_from_one_prompt_of_the_same_model(tiny_models):
    model, _ = tiny_models["qwen2"]
    _, stats = tokens_and_stats(qwen_np.generate(model, PROMPTS[1], max_new_tokens=3))
    other, _ = tiny_models["qwen3"]
    for call in [lambda: qwen_np.generate(other, PROMPTS[1], past=stats.past),
                 lambda: qwen_np.generate(model, PROMPTS[1], past=(stats.past.ids, "not a cache")),
                 lambda: qwen_np.generate_batch(model, PROMPTS, past=stats.past)]:
        with pytest.raises(qwen_np.QwenNPError, match="past="):
            next(call())
    _, batch = tokens_and_stats(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=3))
    assert batch.past is None  # a batch leaves none: its rows are left-padded and dropped as they end


# --- text: stop strings and streaming --------------------------------------------------------

ANSWER = "你好！🦙 巴黎是法国的首都。👋🏽 Done."  # " 巴" is two tokens; each emoji one


@pytest.fixture(scope="module")
def spelling(shared_data, tmp_path_factory):
    """A checkpoint with the real Qwen3 tokenizer that always answers ANSWER, then <|im_end|>."""
    directory = tmp_path_factory.mktemp("spelling")
    ids = write_spelling_model(directory, shared_data / "qwen3-tokenizer", ANSWER, starts=[198, 271, 25],
                               end_token=151645)
    return qwen_np.load(directory), ids


def test_streamed_text_never_splits_a_character(spelling):
    model, ids = spelling
    assert any("\ufffd" in model.tokenizer.decode([i]) for i in ids)  # some token holds half a character
    assert list(qwen_np.generate(model, "The answer is:")) == ids  # stops at <|im_end|>, not yielded
    pieces = list(qwen_np.generate_text(model, "The answer is:"))
    assert "".join(pieces) == ANSWER
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(ids) - 1  # one piece per token, the split character in one piece
    assert " 巴" in pieces and "🦙" in pieces and "👋" in pieces


def test_stop_strings_end_the_text_before_them(spelling):
    model, ids = spelling
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop=["首都", "Done"])) == "你好！🦙 巴黎是法国的"
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="黎是法")) == "你好！🦙 巴"
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="not there")) == ANSWER
    tokens = list(qwen_np.generate(model, "The answer is:", stop=["首都"]))
    assert tokens == ids[:ids.index(106114) + 1]  # up to the token that completes the stop string
    stats = tokens_and_stats(qwen_np.generate(model, "The answer is:", stop=["首都"]))[1]
    assert stats.finish_reasons == ("stop",)
    assert tokens_and_stats(qwen_np.generate(model, "The answer is:"))[1].finish_reasons == ("eos",)
    stats = tokens_and_stats(qwen_np.generate(model, "The answer is:", max_new_tokens=3))[1]
    assert stats.finish_reasons == ("length",)


def test_stop_string_helpers():
    assert find_stop("abcdef", ["de", "bc"]) == 1
    assert find_stop("abcdef", ["x"]) == -1
    assert partial_stop("hello wor", ["world"]) == 3  # "wor" may begin "world": hold it back
    assert partial_stop("hello", ["world"]) == 0
    assert partial_stop("ab", ["abc", "bcd"]) == 2


def test_chat_stops_at_im_end_and_splits_thinking(spelling):
    model, ids = spelling
    no_end = dataclasses.replace(model, generation_config={})  # only the tokenizer's eos_token ends the reply
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "".join(qwen_np.chat(no_end, messages, enable_thinking=False)) == ANSWER
    assert "".join(qwen_np.generate_text(no_end, "The answer is:", max_new_tokens=len(ids) + 3)).startswith(
        ANSWER + "<|im_end|>")  # without the chat helper, <|im_end|> is just text
    assert qwen_np.split_thinking("<think>\nhmm, Paris.\n</think>\n\nParis.") == ("hmm, Paris.", "Paris.")
    assert qwen_np.split_thinking("Paris.") == ("", "Paris.")
    assert qwen_np.split_thinking("<think>\nstill thinking") == ("still thinking", "")
