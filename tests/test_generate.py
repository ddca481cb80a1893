"""Generation: the KV cache, the samplers, greedy and batched generation against transformers,
stopping (end tokens, max_new_tokens, stop strings, the context limit) and streaming text."""

import dataclasses
import re
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import qwen_np
from qwen_np.generate import (Sampling, apply_repetition_penalty, apply_temperature, check_scaled_logits, choose_tokens,
                              encode, find_stop, left_pad, min_p_filter, new_token_budget, partial_stop, sample,
                              sampling_settings, top_k_filter, top_p_filter)
from qwen_np.model import empty_cache
from conftest import require_reference
from tiny import FAMILIES, reference_logits, tiny_model, write_spelling_model

GENERATE = sys.modules["qwen_np.generate"]  # the module (qwen_np.generate is the function)

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


def test_a_cache_passed_twice_branches_without_touching_the_later_one(tiny_models):
    # forward writes into the free slots past a cache's length: a second call with the same cache
    # (two continuations of one prefix) must not overwrite what the first call's cache holds.
    model, _ = tiny_models["qwen3"]
    P, C = model.params, model.config
    _, prefix = qwen_np.forward(P, C, np.array([[1, 2, 3, 4]]))
    _, first = qwen_np.forward(P, C, np.array([[5, 6]]), prefix)  # grows: buffers of its own
    _, later = qwen_np.forward(P, C, np.array([[7]]), first)  # shares first's buffers
    _, other = qwen_np.forward(P, C, np.array([[9]]), first)  # the same slot: must not write into `later`'s
    assert np.shares_memory(later.keys[0], first.keys[0]) and not np.shares_memory(other.keys[0], first.keys[0])
    for cache, ids in ((later, [1, 2, 3, 4, 5, 6, 7]), (other, [1, 2, 3, 4, 5, 6, 9])):
        logits, _ = qwen_np.forward(P, C, np.array([[8]]), cache)
        full, _ = qwen_np.forward(P, C, np.array([ids + [8]]))
        np.testing.assert_allclose(logits[:, -1], full[:, -1], atol=2e-5, rtol=1e-5)
    # A later call that wrote only padding (its slots stay marked not valid) is noticed too.
    _, padded = qwen_np.forward(P, C, np.array([[0]]), first, attention_mask=[[0]])
    _, real = qwen_np.forward(P, C, np.array([[7]]), first)
    assert not np.shares_memory(real.keys[0], padded.keys[0])
    assert not padded.valid[0, 6] and padded.valid[0, :6].all()
    # A plain decoding loop writes in place: no copy until the capacity doubles.
    _, step = qwen_np.forward(P, C, np.array([[8]]), real)
    assert np.shares_memory(step.keys[0], real.keys[0])


def test_a_cache_passed_twice_is_copied_after_a_token_whose_keys_are_zero(tmp_path):
    # A branch is noticed by the valid flags as well as by nonzero keys: a token with all-zero keys
    # (a zero embedding row, as nn.Embedding's padding_idx row stays, in a model without q/k/v biases).
    from safetensors.numpy import load_file, save_file
    tiny_model("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.embed_tokens.weight"][0] = 0
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = qwen_np.load(tmp_path)
    P, C = model.params, model.config
    _, cache = qwen_np.forward(P, C, np.array([[3, 1, 4, 1]]))
    _, cache = qwen_np.forward(P, C, np.array([[5]]), cache)  # grown to 8: free slots after 5
    _, first = qwen_np.forward(P, C, np.array([[0]]), cache)
    assert not first.keys[0][:, :, cache.length].any()  # the premise: layer 0's keys of token 0 are zero
    qwen_np.forward(P, C, np.array([[9]]), cache)  # another branch from the same cache
    after, _ = qwen_np.forward(P, C, np.array([[7]]), first)
    expected, _ = qwen_np.forward(P, C, np.array([[3, 1, 4, 1, 5, 0, 7]]))
    np.testing.assert_allclose(after[:, -1], expected[:, -1], atol=2e-5, rtol=1e-5)


def test_a_cache_and_a_past_print_their_shapes_not_their_numbers(tiny_models):
    model, _ = tiny_models["qwen3"]
    _, stats = tokens_and_stats(qwen_np.generate(model, [1, 2, 3], max_new_tokens=3, temperature=0))
    C, Dh = stats.past.cache.keys[0].shape[2], model.config.head_dim
    assert repr(stats.past) == (f"Past(5 token ids, KVCache({model.config.num_hidden_layers} layers of keys and "
                                f"values [B=1, K={model.config.num_key_value_heads}, C={C}, Dh={Dh}], length=5))")
    assert len(repr(stats)) < 400
    assert repr(qwen_np.KVCache((), (), np.zeros((1, 0), bool), 0)) == "KVCache(no layers, length=0)"


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


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8])
def test_top_p_breaks_ties_as_the_reference_does(reference, top_p):
    # Rows of 12 tokens with tied logits. (torch's default sort is stable up to 16 elements; longer
    # rows it sorts with an introsort whose order among ties no NumPy sort reproduces.)
    torch, transformers = reference
    scores = np.random.default_rng(5).integers(0, 3, (16, 12)).astype(np.float32)
    theirs = transformers.TopPLogitsWarper(top_p)(None, torch.tensor(scores))
    assert_same_scores(top_p_filter(scores, top_p), theirs)
    ties = np.array([[1, 1, 0, 0]], np.float32)
    assert_same_scores(top_p_filter(ties, 0.3), transformers.TopPLogitsWarper(0.3)(None, torch.tensor(ties)))
    assert np.isfinite(top_p_filter(ties, 0.3)).tolist() == [[False, True, False, False]]


def test_top_p_adds_up_a_large_vocabulary_as_the_reference_does(reference):
    # Over Qwen's 151936 tokens a float32 running sum drifts from torch's (which adds in float64):
    # in this row it moved the cut by one token.
    torch, transformers = reference
    rng = np.random.default_rng(6)
    scores = (rng.standard_normal((1, 151936)) * rng.uniform(1, 6)).astype(np.float32)
    assert_same_scores(top_p_filter(scores, 0.9), transformers.TopPLogitsWarper(0.9)(None, torch.tensor(scores)))


def test_top_p_after_top_k_over_a_large_vocabulary_matches_the_reference(reference):
    # top_p_filter sorts only the tokens in play (a finite logit in some row); the rows keep different ones.
    torch, transformers = reference
    scores, input_ids = random_scores(rows=3, vocab=151936, seed=7)
    processors = transformers.LogitsProcessorList([transformers.TopKLogitsWarper(20),
                                                   transformers.TopPLogitsWarper(0.8, min_tokens_to_keep=2)])
    theirs = processors(torch.tensor(input_ids), torch.tensor(scores))
    assert_same_scores(top_p_filter(top_k_filter(scores, 20), 0.8, 2), theirs)


@pytest.mark.parametrize("top_k, min_p", [(1, 0.1), (50, 0.5)])
def test_top_k_and_min_p_over_a_large_vocabulary_match_the_reference(reference, top_k, min_p):
    # Over 50 tokens NumPy's partition happens to sort the front of a row, which hides a partition at the wrong
    # index; over Qwen's 151936 it does not.
    torch, transformers = reference
    scores, input_ids = random_scores(rows=3, vocab=151936, seed=8)
    ids, tensor = torch.tensor(input_ids), torch.tensor(scores)
    assert_same_scores(top_k_filter(scores, top_k), transformers.TopKLogitsWarper(top_k)(ids, tensor))
    assert_same_scores(min_p_filter(scores, min_p), transformers.MinPLogitsWarper(min_p)(ids, tensor))


def test_sample_draws_as_from_the_whole_vocabulary():
    # sample adds up only the tokens in play (a finite logit in some row): the same draws as over all.
    scores, _ = random_scores(rows=3, vocab=5000, seed=8)
    filtered = top_k_filter(scores, 30)
    filtered[2] = top_k_filter(scores[2:], 3)
    for seed in range(50):
        cdf = np.cumsum(qwen_np.ops.softmax(filtered.astype(np.float64)), axis=-1)
        u = np.random.default_rng(seed).random((3, 1)) * cdf[:, -1:]
        drawn = sample(filtered, np.random.default_rng(seed))
        np.testing.assert_array_equal(drawn, (cdf <= u).sum(axis=-1))
        assert np.isfinite(filtered[np.arange(3), drawn]).all()


@pytest.mark.parametrize("min_p, keep", [(0.05, 1), (0.3, 1), (0.9, 3), (0.0, 1), (1.0, 60)])  # 60: more than V
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
    # each filter alone, set to drop most tokens (in the chain above, min_p drops none: skipping it went unseen)
    for s, alone in [(Sampling(temperature=1.0, top_k=3), top_k_filter(scores, 3)),
                     (Sampling(temperature=1.0, top_p=0.3), top_p_filter(scores, 0.3)),
                     (Sampling(temperature=1.0, min_p=0.5), min_p_filter(scores, 0.5))]:
        assert np.isneginf(alone).mean() > 0.9
        for seed in range(20):
            chosen = choose_tokens(scores, seen, s, np.random.default_rng(seed))
            np.testing.assert_array_equal(chosen, sample(alone, np.random.default_rng(seed)))


def test_a_temperature_too_small_for_float32_is_a_clear_error():
    logits = np.array([[5.0, 4.0, 3.0, -2.0]], np.float32)  # divided by 1e-38: above float32's 3.4e38
    seen = np.ones(logits.shape, bool)
    for s, named in [(Sampling(temperature=1e-38), "temperature=1e-38"),
                     (Sampling(temperature=1e-38, top_k=2, top_p=0.9), "temperature=1e-38"),
                     (Sampling(temperature=1.0, repetition_penalty=1e-39),
                      "temperature=1.0 and repetition_penalty=1e-39")]:
        with pytest.raises(qwen_np.QwenNPError, match=f"overflow float32 when scaled by {named}: .*temperature=0 for "
                                                      "greedy"):
            choose_tokens(logits, seen, s, np.random.default_rng(0))
    assert choose_tokens(logits, seen, Sampling(temperature=1e-30), np.random.default_rng(0)) == [0]
    assert choose_tokens(logits, seen, Sampling(temperature=0, repetition_penalty=1e-39), None) == [0]
    # Every logit negative: all of them become -inf, and no token can be drawn
    with pytest.raises(qwen_np.QwenNPError, match="overflow float32.*temperature=1e-38"):
        choose_tokens(-logits[:, :2], seen[:, :2], Sampling(temperature=1e-38), np.random.default_rng(0))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the one error, without NumPy's warnings before it
def test_logits_that_are_not_finite_name_the_weight_at_fault(tiny_models):
    model, _ = tiny_models["qwen2"]
    for low_memory in (False, True):
        broken = qwen_np.load(model.path, low_memory=low_memory)
        up = broken.params["model"]["layers"][1]["mlp"]["up_proj"]
        up["weight"][3, 5] = 0xFF81 if low_memory else np.nan  # (low_memory keeps bfloat16 bits: a NaN, sign set)
        for temperature in (0, 1.0):  # greedy argmax would pick a NaN silently, as the reference does
            with pytest.raises(qwen_np.QwenNPError, match=r"the model's logits are not finite \(NaN or inf\): "
                               r"the weight 'model.layers.1.mlp.up_proj.weight' holds NaN or inf"):
                list(qwen_np.generate(broken, PROMPTS[0], max_new_tokens=2, temperature=temperature))
    huge = qwen_np.load(model.path)
    huge.params["model"]["norm"]["weight"][:] = 3e38  # finite, but the LM head's sums overflow
    with pytest.raises(qwen_np.QwenNPError, match="no weight holds NaN or inf, so an activation overflowed float32"):
        list(qwen_np.generate(huge, PROMPTS[0], max_new_tokens=2))


def test_only_a_row_that_is_minus_inf_throughout_is_refused_after_scaling():
    settings = Sampling(temperature=1e-30)
    check_scaled_logits(np.array([[0, -np.inf], [-np.inf, 1]], np.float32), settings)  # each row keeps a token
    with pytest.raises(qwen_np.QwenNPError, match=r"the logits overflow float32 when scaled by temperature=1e-30: "):
        check_scaled_logits(np.array([[0, 1], [-np.inf, -np.inf]], np.float32), settings)


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
    # Greedy: the file's filters are not read (the caller's are); the repetition penalty still is.
    assert sampling_settings(qwen_instruct, temperature=0, top_k=0) == Sampling(0.0, 0, 1.0, 0.0, 1.05)
    assert sampling_settings({}).temperature == 0  # no do_sample: greedy, like transformers' generate
    assert sampling_settings({"do_sample": False, "temperature": 0.6}).temperature == 0
    assert sampling_settings({"do_sample": True}) == Sampling(1.0, 50, 1.0, 0.0, 1.0)  # transformers' defaults
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                dict(repetition_penalty=0), dict(temperature=float("nan"))):
        with pytest.raises(qwen_np.QwenNPError, match=next(iter(bad))):
            sampling_settings({}, **bad)


@pytest.mark.parametrize("generation_config, message", [
    ({"eos_token_id": "abc"}, "eos_token_id must be a token id or a list of token ids, got 'abc'"),
    ({"eos_token_id": "151645"}, "eos_token_id must be"),  # not read character by character
    ({"eos_token_id": [5, None]}, "eos_token_id must be"),
    ({"eos_token_id": 1.5}, "eos_token_id must be"),
    ({"do_sample": True, "temperature": "hot"}, "temperature must be"),
    ({"do_sample": True, "top_k": "x"}, "top_k must be"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be"),
    ({"do_sample": "false"}, "do_sample must be true or false"),  # a non-empty string would count as true
    ({"do_sample": True, "top_p": 0}, "top_p must be a number in \\(0, 1\\], got 0"),  # 0 was read as 1
    ({"repetition_penalty": 0}, "repetition_penalty must be"),  # likewise
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),  # 0 was silently read as 512
    ({"do_sample": True, "temperature": float("inf")}, "temperature must be"),
    # past float32's range: the logits, divided by them in float32, became inf or NaN with warnings
    ({"do_sample": True, "temperature": 1e300}, r"temperature must be 0 \(greedy\) or a positive number \(finite in "
                                                r"float32\), got 1e\+300"),
    ({"repetition_penalty": 1e-300}, r"repetition_penalty must be a positive number \(1 is off; finite and not 0 in "
                                     r"float32\), got 1e-300"),
])
def test_bad_generation_config_values_are_clear_errors(tiny_models, generation_config, message):
    model, _ = tiny_models["qwen2"]
    bad = dataclasses.replace(model, generation_config=generation_config)
    with pytest.raises(qwen_np.QwenNPError, match="generation_config.json: " + message):
        next(qwen_np.generate(bad, PROMPTS[1]))


def test_missing_or_null_generation_config_values_take_the_defaults(tiny_models):
    model, _ = tiny_models["qwen2"]
    assert sampling_settings({"do_sample": True, "top_k": None, "top_p": None, "repetition_penalty": None,
                              "temperature": None}) == Sampling(1.0, 50, 1.0, 0.0, 1.0)
    assert sampling_settings({"do_sample": None, "temperature": 0.7}).temperature == 0
    assert new_token_budget(model.config, {"max_new_tokens": None}, 100, None) == 28
    assert new_token_budget(model.config, {"max_new_tokens": 5}, 100, None) == 5
    nulls = dataclasses.replace(model, generation_config={"eos_token_id": None, "max_new_tokens": None})
    assert list(qwen_np.generate(nulls, PROMPTS[1], max_new_tokens=5)) == list(
        qwen_np.generate(model, PROMPTS[1], max_new_tokens=5))


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


@pytest.mark.parametrize("penalty", [1.5, 0.5])  # below 1: repeats made more likely
def test_greedy_with_repetition_penalty_equals_transformers(reference, tiny_models, penalty):
    torch, _ = reference
    model, ref = tiny_models["qwen3"]
    ids, mask = left_pad(PROMPTS, 0)
    expected = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=24, pad_token_id=0, repetition_penalty=penalty)[:, ids.shape[1]:].numpy()
    steps = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0, repetition_penalty=penalty))
    np.testing.assert_array_equal(np.array(steps).T, expected)
    plain = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=24, temperature=0))
    assert plain != steps  # the penalty changed something


def test_the_repetition_penalty_of_a_padded_prompt_ignores_the_padding(tiny_models):
    # transformers' penalty counts a row's padding tokens as seen, so its padded rows can change
    # with the batch; here each prompt gives what it gives alone. The padding token is made the one
    # the shortest prompt picks first, so that counting it would change that prompt's answer.
    model, _ = tiny_models["qwen2"]
    settings = dict(max_new_tokens=12, temperature=0, repetition_penalty=3.0)
    alone = [list(qwen_np.generate(model, p, **settings)) for p in PROMPTS]
    padded = dataclasses.replace(model, config=dataclasses.replace(model.config, pad_token_id=alone[1][0]))
    steps = list(qwen_np.generate_batch(padded, PROMPTS, **settings))
    assert [[step[row] for step in steps] for row in range(len(PROMPTS))] == alone
    # The control: with the padding token counted as seen, that prompt's first choice would change.
    logits, _ = qwen_np.forward(model.params, model.config, [PROMPTS[1]], last_only=True)
    seen = np.zeros((1, model.config.vocab_size), bool)
    seen[0, PROMPTS[1] + [alone[1][0]]] = True
    assert apply_repetition_penalty(logits[:, -1], seen, 3.0).argmax() != alone[1][0]


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


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"), ([3, 128], "outside the vocabulary"), ([-1, 2], "outside the vocabulary"),
    ("text", "no tokenizer.json"),
    *[(bad, "a prompt must be a string or a list of token ids") for bad in (
        [1.5, 2.7], [[1, 2], [3, 4]], [[1, 2], [3]], [True, False], None, {"a": 1}, b"ab", np.array([1.0]))],
    *[(bad, "got bytes .*: decode them to a string first") for bad in (b"ab", bytearray(b"ab"), memoryview(b"ab"))],
])
def test_bad_prompts_are_clear_errors(tiny_models, prompt, message):
    model, _ = tiny_models["qwen2"]  # vocab_size=128, no tokenizer
    with pytest.raises(qwen_np.QwenNPError, match=message):
        next(qwen_np.generate(model, prompt))
    with pytest.raises(qwen_np.QwenNPError, match=message):
        next(qwen_np.generate_batch(model, [PROMPTS[1], prompt]))


@pytest.mark.parametrize("function, argument", [
    ("generate", PROMPTS[1]), ("generate_batch", [PROMPTS[1]]), ("generate_text", PROMPTS[1]),
    ("chat", [{"role": "user", "content": "hi"}]), ("chat_ids", [{"role": "user", "content": "hi"}])])
def test_a_first_argument_that_is_not_a_model_is_a_clear_error(tiny_models, function, argument):
    model, _ = tiny_models["qwen2"]
    call = getattr(qwen_np, function)
    for wrong, kind in ((model.params, "dict"), (model.config, "Config"), (str(model.path), "str")):
        with pytest.raises(qwen_np.QwenNPError, match=f"^{function} takes the Model that qwen_np.load returns "
                                                      f"as its first argument, got {kind}$"):
            result = call(wrong, argument)
            next(result) if function != "chat_ids" else None  # the others are generators: they start when asked


def test_one_token_id_as_the_prompt_and_a_0d_eos_array_are_clear_errors(tiny_models):
    model, _ = tiny_models["qwen2"]
    with pytest.raises(qwen_np.QwenNPError, match=r"^a prompt must be a string or a list of token ids \(integers\), "
                                                  r"got 5: for one token, pass \[5\]$"):
        next(qwen_np.generate(model, 5))
    with pytest.raises(qwen_np.QwenNPError, match=r"eos_token_id must be a token id or a list of token ids, "
                                                  r"got array\(5\)"):
        next(qwen_np.generate(model, [1, 2], eos_token_id=np.array(5)))
    assert len(list(qwen_np.generate(model, [1, 2], eos_token_id=np.array([200]), max_new_tokens=2))) == 2


def test_text_with_a_lone_surrogate_is_a_clear_error(tiny_models):
    from tokenizers import Tokenizer, models
    model = dataclasses.replace(tiny_models["qwen2"][0], tokenizer=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    assert encode(model, "a", "the prompt") == [0]
    with pytest.raises(qwen_np.QwenNPError, match="the prompt is not valid Unicode text: it holds a lone surrogate"):
        encode(model, "a\udcff", "the prompt")


def test_a_tokenizer_that_panics_on_text_is_a_clear_error(tiny_models):
    # A tokenizer.json the library loads, whose post-processor adds a token the vocabulary lacks:
    # encoding panics in Rust (a BaseException, not an Exception).
    import json

    from tokenizers import Tokenizer, models
    document = json.loads(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).to_str())
    document["post_processor"] = {"type": "TemplateProcessing", "pair": [], "special_tokens": {},
                                  "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                             {"Sequence": {"id": "A", "type_id": 0}}]}
    model = dataclasses.replace(tiny_models["qwen2"][0], tokenizer=Tokenizer.from_str(json.dumps(document)))
    with pytest.raises(qwen_np.QwenNPError, match=f"the tokenizer of .*{model.path.name} failed to encode the "
                                                  "prompt .*: its tokenizer may be damaged"):
        next(qwen_np.generate(model, "a"))
    assert encode(model, "a", "the chat", add_special_tokens=False) == [0]  # without the post-processor it works
    # A BPE model whose unk_token is not in its vocabulary: the library raises a plain Exception.
    model = dataclasses.replace(model, tokenizer=Tokenizer(models.BPE(vocab={"a": 0}, merges=[], unk_token="<unk>")))
    with pytest.raises(qwen_np.QwenNPError, match="failed to encode the prompt .*Unk token `<unk>` not found"):
        next(qwen_np.generate(model, "ab"))


def test_ctrl_c_while_encoding_stays_a_keyboard_interrupt(tiny_models):
    # Only the tokenizer's own failures become "failed to encode": Ctrl-C must still stop the program.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model = dataclasses.replace(tiny_models["qwen2"][0], tokenizer=SimpleNamespace(encode=interrupted))
    with pytest.raises(KeyboardInterrupt):
        encode(model, "a", "the prompt")


@pytest.mark.parametrize("prompts", ["one prompt", [1, 2, 3], [], None, 5, np.int64(3)])
def test_generate_batch_takes_a_list_of_prompts(tiny_models, prompts):
    model, _ = tiny_models["qwen2"]
    with pytest.raises(qwen_np.QwenNPError, match="list of prompts"):
        next(qwen_np.generate_batch(model, prompts))


@pytest.mark.parametrize("arguments", [
    dict(seed="x"), dict(seed=1.5), dict(seed=-1),
    dict(stop=5), dict(stop=[5]), dict(stop=b"x"), dict(stop=["a", None]),
    dict(eos_token_id="x"), dict(eos_token_id=1.5), dict(eos_token_id=[1.5]), dict(eos_token_id=[None]),
    dict(eos_token_id=True),
    dict(max_new_tokens="x"), dict(max_new_tokens=float("nan")), dict(max_new_tokens=float("inf")),
    dict(max_new_tokens=2.5), dict(max_new_tokens=0),
    dict(temperature="x"), dict(top_k="x"), dict(top_p="x"), dict(min_p="x"), dict(repetition_penalty="x"),
    dict(temperature=float("inf")), dict(repetition_penalty=float("inf")), dict(top_k=2.5), dict(top_k=True),
])
def test_bad_arguments_are_clear_errors(tiny_models, arguments):
    model, _ = tiny_models["qwen2"]
    name = next(iter(arguments))
    with pytest.raises(qwen_np.QwenNPError, match=f"^{name} must be"):
        next(qwen_np.generate(model, PROMPTS[1], **{"max_new_tokens": 3, **arguments}))


def test_numpy_integers_are_accepted_where_ints_are(tiny_models):
    model, _ = tiny_models["qwen2"]
    i = np.int64
    settings = dict(temperature=0.9, top_p=0.9, max_new_tokens=6)
    expected = list(qwen_np.generate(model, PROMPTS[1], seed=3, top_k=20, eos_token_id=[5], **settings))
    assert list(qwen_np.generate(model, [i(t) for t in PROMPTS[1]], seed=i(3), top_k=i(20),
                                 eos_token_id=[i(5)], **settings)) == expected
    assert list(qwen_np.generate(model, np.array(PROMPTS[1]), seed=3, top_k=20, eos_token_id=i(5),
                                 **settings)) == expected
    # A [1, T] row of ids (what a tokenizer returns), a [B, T] array of prompts, a Generator as the seed,
    # end tokens as an array, a set or -1 ("none", in old configs).
    assert list(qwen_np.generate(model, np.array([PROMPTS[1]]), seed=np.random.default_rng(3), top_k=20,
                                 eos_token_id=np.array([5, -1]), **settings)) == expected
    assert list(qwen_np.generate(model, tuple(PROMPTS[1]), seed=3, top_k=20, eos_token_id={5}, **settings)) == expected
    rows = np.array([PROMPTS[1], PROMPTS[1]])
    assert [step[0] for step in qwen_np.generate_batch(model, rows, temperature=0, max_new_tokens=6)] == list(
        qwen_np.generate(model, PROMPTS[1], temperature=0, max_new_tokens=6))


def test_a_temperature_that_is_0_in_float32_is_refused():
    # Divided by 0, the logits would become inf, -inf and NaN, and the draw would pick from NaNs.
    with pytest.raises(qwen_np.QwenNPError, match=r"temperature=1e-320 is 0 in float32"):
        sampling_settings({}, temperature=1e-320)
    with pytest.raises(qwen_np.QwenNPError, match=r"temperature=1e-50 is 0 in float32"):
        sampling_settings({"do_sample": True, "temperature": 1e-50})  # from generation_config.json too
    assert sampling_settings({}, temperature=1e-40).temperature == 1e-40  # a float32 subnormal: not 0


def test_greedy_decoding_neither_reads_nor_checks_the_files_filter_values():
    # transformers ignores top_k / top_p / min_p when do_sample is off, whatever they hold.
    assert sampling_settings({"do_sample": False, "top_p": 0.0, "top_k": -1, "min_p": 5}) == Sampling(0.0, 50, 1.0,
                                                                                                      0.0, 1.0)


def test_prompt_plus_max_new_tokens_must_fit_in_the_context(tiny_models, monkeypatch):
    model, _ = tiny_models["qwen2"]  # max_position_embeddings=128
    with pytest.raises(qwen_np.QwenNPError, match=r"max_position_embeddings=128\); shorten the prompt or lower "
                                                  r"max_new_tokens to 28$"):
        next(qwen_np.generate(model, list(range(100)), max_new_tokens=29))
    for max_new_tokens in (None, 5):  # a prompt that fills the context: no max_new_tokens would do
        with pytest.raises(qwen_np.QwenNPError, match=r"the prompt \(130 tokens\) already fills the model's context "
                                                      r"of 128 positions \(max_position_embeddings=128\): shorten it$"):
            new_token_budget(model.config, {}, 130, max_new_tokens)
    with pytest.raises(qwen_np.QwenNPError, match=r"the prompt \(1 token\) plus max_new_tokens \(200\)"):
        new_token_budget(model.config, {}, 1, 200)
    assert len(list(qwen_np.generate(model, list(range(100)), max_new_tokens=28, temperature=0))) == 28
    assert new_token_budget(model.config, {}, 100, None) == 28  # the default fits what is left
    with pytest.raises(qwen_np.QwenNPError, match="positive integer"):
        new_token_budget(model.config, {}, 100, 0)
    dynamic = dataclasses.replace(model.config, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                 "factor": 2.0})
    assert new_token_budget(dynamic, {}, 100, 200) == 200  # dynamic NTK RoPE extends past the limit
    # With no limit, a cache too large to allocate is one clear error (not NumPy's), whether or not
    # the system says how much memory is left.
    unlimited = dataclasses.replace(model, config=dynamic)
    one = empty_cache(model.config, 1, 1)
    per_position = sum(a.nbytes for a in one.keys + one.values)  # bytes of keys and values at one position
    for huge in (2**40, 2**62, 10**400):  # beyond this machine's memory; any array's size; a float
        size = f"{(100 + huge) * per_position / 1e9:,.1f} GB" if huge < 10**300 else "more bytes than a float counts"
        with monkeypatch.context() as m:
            m.setattr(GENERATE, "memory_room", lambda: None)  # as where there is no /proc/meminfo: NumPy refuses
            with pytest.raises(qwen_np.QwenNPError, match=rf"a KV cache for {100 + huge:,} positions \({size}\) "
                                                          r"cannot be allocated: lower max_new_tokens$"):
                next(qwen_np.generate(unlimited, list(range(100)), max_new_tokens=huge))
    # One that NumPy would allocate (its memory is taken only as positions are written), but that
    # cannot fit in the memory left, is refused before the prefill.
    room = 128 * per_position
    monkeypatch.setattr(GENERATE, "memory_room", lambda: (room, "a test's figure"))
    monkeypatch.setattr(GENERATE, "next_tokens", None)  # nothing is computed
    with pytest.raises(qwen_np.QwenNPError, match=rf"^a KV cache for 129 positions \({129 * per_position / 1e6:.1f} "
                                                  rf"MB\) cannot be allocated in the {room / 1e6:.1f} MB of memory "
                                                  r"free \(a test's figure\): lower max_new_tokens$"):
        next(qwen_np.generate(unlimited, list(range(100)), max_new_tokens=29))
    monkeypatch.undo()
    monkeypatch.setattr(GENERATE, "memory_room", lambda: (room, "a test's figure"))
    assert len(list(qwen_np.generate(unlimited, list(range(100)), max_new_tokens=28, temperature=0))) == 28


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


def test_llama3_rope_keeps_max_position_embeddings_as_the_context(tiny_models):
    # Llama 3's configs give the stretched context as max_position_embeddings (Llama 3.2: 131072,
    # with factor 32 over an original 8192): factor x original is not a context length there.
    model, _ = tiny_models["qwen2"]
    llama3 = dataclasses.replace(model.config, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    assert new_token_budget(llama3, {}, 131000, None) == 72
    assert new_token_budget(llama3, {}, 10, None) == 512  # with room to spare: the default, 512
    with pytest.raises(qwen_np.QwenNPError, match=r"context of 131072 positions \(max_position_embeddings=131072\)"):
        new_token_budget(llama3, {}, 131000, 73)


def tokens_and_stats(generator):  # -> (every token it yields, its GenerationStats)
    tokens = []
    while True:
        try:
            tokens.append(next(generator))
        except StopIteration as done:
            return tokens, done.value


def test_the_stats_count_the_tokens_and_time_within_the_call(tiny_models):
    # The command line prints tokens/s from these: each time must be spent inside the generation.
    model, _ = tiny_models["qwen2"]
    start = time.perf_counter()
    tokens, stats = tokens_and_stats(qwen_np.generate(model, PROMPTS[0], max_new_tokens=6, temperature=0))
    wall = time.perf_counter() - start
    assert (len(tokens), stats.prefill_tokens, stats.decode_tokens) == (6, len(PROMPTS[0]), 5)
    assert 0 < stats.prefill_seconds and 0 < stats.decode_seconds
    assert stats.prefill_seconds + stats.decode_seconds <= wall


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


DYNAMIC = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory):
    """(our Model, the transformers model): qwen3 with dynamic NTK RoPE past max_position_embeddings=32."""
    directory = tmp_path_factory.mktemp("dynamic")
    reference = tiny_model("qwen3", directory, max_position_embeddings=32, rope_parameters=DYNAMIC)
    return qwen_np.load(directory), reference


def test_dynamic_rope_reuses_a_past_only_within_max_position_embeddings(reference, dynamic_model):
    # Dynamic NTK RoPE computes its frequencies in each forward pass from the largest position: past
    # position 32, the cached keys were rotated with other frequencies than a fresh prefill would use.
    torch, _ = reference
    model, ref = dynamic_model

    def greedy(prompt, max_new_tokens, past=None):
        return tokens_and_stats(qwen_np.generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0,
                                                 past=past))

    prompt = list(range(30, 50))  # 20 tokens, then 28 more: to position 47
    answer, stats = greedy(prompt, 28)
    follow_up = prompt + answer + [5, 6, 7]
    tokens, again = greedy(follow_up, 10, stats.past)
    assert again.reused_tokens == 0  # the past went beyond max_position_embeddings: all prefilled
    expected = ref.generate(torch.tensor([follow_up]), do_sample=False, max_new_tokens=10)[0, len(follow_up):]
    assert tokens == greedy(follow_up, 10)[0] == expected.tolist()

    short, stats = greedy(prompt[:10], 8)  # the past and the next prompt within 32 positions: reused
    follow_up = prompt[:10] + short + [5, 6, 7]
    tokens, again = greedy(follow_up, 10, stats.past)
    assert again.reused_tokens == len(stats.past.ids) == 17
    assert tokens == greedy(follow_up, 10)[0]


def test_dynamic_rope_batch_keeps_finished_prompts_as_transformers_does(reference, dynamic_model):
    # The frequencies follow the batch's largest position, which is the longest prompt's even after it
    # has ended: transformers keeps feeding it padding.
    torch, _ = reference
    model, ref = dynamic_model
    prompts = [list(range(40, 64)), [3, 9, 27, 81, 17], list(range(100, 112))]
    eos = list(qwen_np.generate(model, prompts[0], max_new_tokens=1, temperature=0))[0]  # ends the longest at once
    ids, mask = left_pad(prompts, 0)
    theirs = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=24,
                          pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    expected = [row[:row.index(eos)] if eos in row else row for row in theirs]
    assert [len(e) for e in expected] == [0, 24, 24]  # to position 35 for the others, 47 for the longest
    got, steps = [[] for _ in prompts], qwen_np.generate_batch(model, prompts, max_new_tokens=24, temperature=0,
                                                              eos_token_id=eos)
    for step in steps:
        assert step[0] is None
        for row, token in enumerate(step):
            if token is not None:
                got[row].append(token)
    assert got == expected


# --- the prefill in chunks -----------------------------------------------------------------------

def prefill_passes(monkeypatch):  # -> the list that will hold the number of tokens of every forward pass
    passes, plain = [], GENERATE.forward

    def spy(params, config, input_ids, *args, **kwargs):
        passes.append(np.shape(input_ids)[1])
        return plain(params, config, input_ids, *args, **kwargs)

    monkeypatch.setattr(GENERATE, "forward", spy)
    return passes


@pytest.mark.parametrize("case", ["qwen2", "qwen3_moe", "qwen3_sliding"])
def test_a_prompt_prefilled_in_chunks_generates_as_transformers_does(reference, tmp_path, monkeypatch, case):
    # PREFILL_CHUNK 4: the prompts of 9, 3 and 5 tokens, left-padded, take passes of 4, 4 and 1
    # tokens, the first all padding for the shortest prompt; with a window of 3 besides.
    torch, _ = reference
    family, overrides = CACHE_CASES[case]
    ref = tiny_model(family, tmp_path, **overrides)
    model = qwen_np.load(tmp_path)
    ids, mask = left_pad(PROMPTS, 0)
    expected = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=12, pad_token_id=0)[:, ids.shape[1]:].numpy()
    monkeypatch.setattr(GENERATE, "PREFILL_CHUNK", 4)
    passes = prefill_passes(monkeypatch)
    steps = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=12, temperature=0))
    assert passes == [4, 4, 1] + [1] * 11
    np.testing.assert_array_equal(np.array(steps).T, expected)


def test_dynamic_rope_prefills_a_prompt_past_its_limit_in_one_pass(reference, dynamic_model, monkeypatch):
    # Its frequencies follow a pass's largest position: in chunks, the first chunks' keys would be
    # rotated with other frequencies than transformers' one pass gives them.
    torch, _ = reference
    model, ref = dynamic_model
    monkeypatch.setattr(GENERATE, "PREFILL_CHUNK", 8)
    passes = prefill_passes(monkeypatch)
    for prompt, prefill in ((list(range(30, 50)), [8, 8, 4]), (list(range(10, 50)), [40])):  # 20, 40 > 32 tokens
        passes.clear()
        tokens = list(qwen_np.generate(model, prompt, max_new_tokens=6, temperature=0))
        expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6)[0, len(prompt):]
        assert passes == prefill + [1] * 5
        assert tokens == expected.tolist()


def test_a_longer_prompt_prefills_in_about_the_same_memory(tmp_path, monkeypatch):
    # One pass over a prompt of T tokens holds [T, F] MLP activations and [T, S] masks; in chunks
    # of 16 tokens T stays 16, however long the prompt (only the [16, S] masks and scores grow, here
    # by 0.05 MB). Traced by tracemalloc, which sees NumPy's arrays; the KV cache, which grows with
    # the prompt, is taken off.
    import tracemalloc

    from qwen_np import bench

    shape = dict(bench.SMOKE_SHAPES["tiny-qwen3"], intermediate_size=2048, max_position_embeddings=4096)
    bench.write_checkpoint(tmp_path, shape)
    model = qwen_np.load(tmp_path)
    monkeypatch.setattr(GENERATE, "PREFILL_CHUNK", 16)
    config = model.config
    cache_bytes_per_position = bench.costs(config)["kv_bytes_per_position"]

    def peak(T):  # bytes held at most while generating 2 tokens after a T-token prompt, but the cache
        prompt = np.random.default_rng(T).integers(0, config.vocab_size, T).tolist()
        tracemalloc.start()
        try:
            list(qwen_np.generate(model, prompt, max_new_tokens=2, temperature=0))
            return tracemalloc.get_traced_memory()[1] - (T + 2) * cache_bytes_per_position
        finally:
            tracemalloc.stop()

    short, long = peak(64), peak(1024)
    assert long - short < 2 ** 20, (short, long)  # one pass of 1024 tokens holds 3 x 8 MB of MLP activations
    monkeypatch.setattr(GENERATE, "PREFILL_CHUNK", 1024)  # the control: one pass
    assert peak(1024) - short > 16 * 2 ** 20


def test_a_past_must_come_from_one_prompt_of_the_same_model(tiny_models):
    model, _ = tiny_models["qwen2"]
    _, stats = tokens_and_stats(qwen_np.generate(model, PROMPTS[1], max_new_tokens=3))
    other, _ = tiny_models["qwen3"]
    for call in [lambda: qwen_np.generate(other, PROMPTS[1], past=stats.past),
                 lambda: qwen_np.generate(model, PROMPTS[1], past=(stats.past.ids, "not a cache")),
                 lambda: qwen_np.generate(model, PROMPTS[1], past=qwen_np.Past(None, stats.past.cache)),
                 lambda: qwen_np.generate(model, PROMPTS[1], past=stats.past._replace(ids=stats.past.ids * 2)),
                 lambda: qwen_np.generate(model, PROMPTS[1], past=qwen_np.Past(
                     (), qwen_np.KVCache((), (), np.zeros((1, 0), bool), 0))),
                 lambda: qwen_np.generate_batch(model, PROMPTS, past=stats.past)]:
        with pytest.raises(qwen_np.QwenNPError, match="past="):
            next(call())
    _, batch = tokens_and_stats(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=3))
    assert batch.past is None  # a batch leaves none: its rows are left-padded and dropped as they end


def test_a_past_from_another_model_of_the_same_shape_is_refused(tiny_models, tmp_path, monkeypatch):
    model, _ = tiny_models["qwen2"]
    _, stats = tokens_and_stats(qwen_np.generate(model, PROMPTS[1], max_new_tokens=3))
    assert stats.past.model_path == model.path
    twin = shutil.copytree(model.path, tmp_path / "twin")  # the same shape: its caches fit
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"past= was made by another model ({model.path}), "
                                                            f"not this one ({twin})")):
        next(qwen_np.generate(qwen_np.load(twin), PROMPTS[1], past=stats.past))
    (tmp_path / "link").symlink_to(model.path)
    monkeypatch.chdir(model.path.parent)
    # The same model loaded again, by its path, through a link, or by a relative path: its past is taken
    for again in (qwen_np.load(model.path), qwen_np.load(tmp_path / "link"), qwen_np.load(model.path.name)):
        _, reused = tokens_and_stats(qwen_np.generate(again, PROMPTS[1] + [5], max_new_tokens=1, past=stats.past))
        assert reused.reused_tokens == len(PROMPTS[1])
    # but not loaded with low_memory=True, which rounds its float32 weights to bfloat16, nor the other way round
    rounded = qwen_np.load(model.path, low_memory=True)
    with pytest.raises(qwen_np.QwenNPError, match=r"past= was made by this checkpoint loaded without low_memory=True, "
                                                  r"and this model was loaded with it: low_memory rounds"):
        next(qwen_np.generate(rounded, PROMPTS[1], past=stats.past))
    _, low = tokens_and_stats(qwen_np.generate(rounded, PROMPTS[1], max_new_tokens=3))
    assert low.past.low_memory and not stats.past.low_memory
    with pytest.raises(qwen_np.QwenNPError, match=r"loaded with low_memory=True, and this model was loaded without"):
        next(qwen_np.generate(model, PROMPTS[1], past=low.past))
    _, reused = tokens_and_stats(qwen_np.generate(qwen_np.load(model.path, low_memory=True), PROMPTS[1] + [5],
                                                  max_new_tokens=1, past=low.past))
    assert reused.reused_tokens == len(PROMPTS[1])


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


def test_stop_strings_end_the_tokens_where_transformers_ends_them(spelling):
    # transformers matches stop strings on the tokens' bytes: one may end inside a token that also
    # begins a character ("🦙 " ends in the token " " + the first bytes of 巴), and it stops there.
    torch, transformers = require_reference()
    model, _ = spelling
    reference = transformers.AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model.path)
    prompt = tokenizer("The answer is:")["input_ids"]
    for stop in ["🦙 ", "首都。👋", "黎是法", "Done", "你好"]:  # the last at the very start of the answer
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, stop_strings=[stop],
                                        tokenizer=tokenizer, pad_token_id=0)[0, len(prompt):].tolist()
        assert list(qwen_np.generate(model, prompt, stop=stop)) == theirs, stop


def test_an_unknown_option_is_named_with_the_ones_there_are(spelling):
    model, _ = spelling
    messages = [{"role": "user", "content": "Hi"}]
    for call, message in [(lambda: qwen_np.generate_text(model, "Hi", max_tokens=5),
                           "unknown option max_tokens=5 (did you mean max_new_tokens?); the generation options are "
                           "max_new_tokens, temperature, "),
                          (lambda: qwen_np.chat(model, messages, do_sample=True), "unknown option do_sample=True; ")]:
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(message)):  # not a TypeError from inside
            next(call())


def test_stop_strings_end_the_text_before_them(spelling):
    model, ids = spelling
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop=["首都", "Done"])) == "你好！🦙 巴黎是法国的"
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="黎是法")) == "你好！🦙 巴"
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="not there")) == ANSWER
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="你好！")) == ""
    assert list(qwen_np.generate(model, "The answer is:", stop="你好！")) == ids[:2]  # 你好 and ！
    # text that may begin a stop string is held back, then shown when generation ends without it
    pieces = list(qwen_np.generate_text(model, "The answer is:", stop=".!"))
    assert "".join(pieces) == ANSWER and pieces[-2:] == [" Done", "."]
    for bad in (5, [5], b"x"):
        with pytest.raises(qwen_np.QwenNPError, match="stop must be a string or a list of strings"):
            next(qwen_np.generate_text(model, "The answer is:", stop=bad))
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
    # A tokenizer_config.json without eos_token (older checkpoints): nothing ends the reply but its length.
    bare = dataclasses.replace(no_end, tokenizer_config={k: v for k, v in model.tokenizer_config.items()
                                                          if k != "eos_token"})
    assert "".join(qwen_np.chat(bare, messages, enable_thinking=False, max_new_tokens=len(ids) + 1)) == \
        ANSWER + "<|im_end|>"
    assert qwen_np.split_thinking("<think>\nhmm, Paris.\n</think>\n\nParis.") == ("hmm, Paris.", "Paris.")
    assert qwen_np.split_thinking("Paris.") == ("", "Paris.")
    assert qwen_np.split_thinking("<think>\nstill thinking") == ("still thinking", "")
    # templates that open the thinking themselves (QwQ, Qwen3's Thinking-2507): the reply has no <think>
    assert qwen_np.split_thinking("hmm, Paris.\n</think>\n\nParis.") == ("hmm, Paris.", "Paris.")
    with pytest.raises(qwen_np.QwenNPError, match=r"split_thinking takes the reply as one string "
                                                  r'\(\"\"\.join the pieces chat yields\), got generator'):
        qwen_np.split_thinking(qwen_np.chat(no_end, messages))
    with pytest.raises(qwen_np.QwenNPError, match="enable_thinking must be True, False or None, got 'no'"):
        next(qwen_np.chat(no_end, messages, enable_thinking="no"))  # a string would be true to the template


def test_top_p_drops_a_tail_that_adds_up_to_exactly_1_minus_top_p(reference):
    # Four equal logits: probabilities 0.25 exactly, so the tail's cumulative sum meets 1 - top_p = 0.5
    # exactly; the reference drops it (<=), keeping two tokens.
    torch, transformers = reference
    scores = np.zeros((1, 4), np.float32)
    theirs = transformers.TopPLogitsWarper(0.5)(None, torch.tensor(scores)).numpy()
    ours = top_p_filter(scores, 0.5)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    assert np.isfinite(ours).sum() == 2


def test_min_p_keeps_the_tokens_exactly_at_the_threshold(reference):
    # min_p=1 keeps every token tied with the most probable one (the reference drops only p < threshold).
    torch, transformers = reference
    scores = np.array([[2.0, 2.0, 0.0, 2.0]], np.float32)
    theirs = transformers.MinPLogitsWarper(1.0)(None, torch.tensor(scores)).numpy()
    ours = min_p_filter(scores, 1.0)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    assert np.isfinite(ours).tolist() == [[True, True, False, True]]


def test_empty_stop_strings_are_ignored(spelling):
    model, ids = spelling
    assert list(qwen_np.generate(model, "The answer is:", stop="")) == ids
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop=["", "Done"])) == ANSWER[:ANSWER.index("Done")]


def test_a_stop_string_ending_inside_the_last_token_is_cut_from_the_text(spelling):
    # "🦙 " ends in the token " " + the first bytes of 巴: generation stops there, and the text held back
    # for the unfinished character still holds the stop string, which must not be shown.
    model, _ = spelling
    assert "".join(qwen_np.generate_text(model, "The answer is:", stop="🦙 ")) == "你好！"


def test_a_prompt_exactly_as_long_as_the_context_leaves_no_room(tiny_models):
    model, _ = tiny_models["qwen2"]  # max_position_embeddings=128
    for max_new_tokens in (None, 1):
        with pytest.raises(qwen_np.QwenNPError, match=r"the prompt \(128 tokens\) already fills the model's context"):
            new_token_budget(model.config, {}, 128, max_new_tokens)
    assert new_token_budget(model.config, {}, 127, None) == 1


def test_yarn_never_shrinks_the_context_below_max_position_embeddings(tiny_models):
    # A config whose max_position_embeddings is already above factor x original keeps it as the context.
    model, _ = tiny_models["qwen2"]  # max_position_embeddings=128
    yarn = dataclasses.replace(model.config, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 16})
    assert new_token_budget(yarn, {}, 100, None) == 28
    with pytest.raises(qwen_np.QwenNPError, match=r"context of 128 positions \(max_position_embeddings=128\)"):
        new_token_budget(yarn, {}, 100, 29)


def test_decode_tokens_count_only_the_prompts_still_generating(dynamic_model):
    # With dynamic RoPE a finished prompt stays in the batch, fed padding: it is not counted as decoded.
    model, _ = dynamic_model
    prompts = [list(range(40, 64)), [3, 9, 27, 81, 17], list(range(100, 112))]
    eos = list(qwen_np.generate(model, prompts[0], max_new_tokens=1, temperature=0))[0]  # ends the first at once
    steps, stats = tokens_and_stats(qwen_np.generate_batch(model, prompts, max_new_tokens=24, temperature=0,
                                                           eos_token_id=eos))
    generated = [sum(step[row] is not None for step in steps) for row in range(3)]
    assert generated[0] == 0 and stats.finish_reasons[0] == "eos"
    # every token but the last of each prompt still generating is fed back through a decode step
    assert stats.decode_tokens == sum(n - 1 for n in generated if n) == 46


def test_dynamic_rope_reuses_a_past_up_to_exactly_max_position_embeddings(dynamic_model):
    # Positions 0..31 are within max_position_embeddings=32: no rescaling yet, so the cache is reused.
    model, _ = dynamic_model
    prompt = list(range(30, 40))
    answer, stats = tokens_and_stats(qwen_np.generate(model, prompt, max_new_tokens=12, temperature=0))
    follow_up = prompt + answer + list(range(5, 15))
    assert len(follow_up) == model.config.max_position_embeddings == 32
    tokens, again = tokens_and_stats(qwen_np.generate(model, follow_up, max_new_tokens=1, temperature=0,
                                                      past=stats.past))
    assert again.reused_tokens == len(stats.past.ids) == 21
    assert tokens == list(qwen_np.generate(model, follow_up, max_new_tokens=1, temperature=0))


def test_a_pad_token_id_outside_the_vocabulary_pads_with_0(tiny_models):
    model, _ = tiny_models["qwen2"]
    outside = dataclasses.replace(model, config=dataclasses.replace(model.config, pad_token_id=model.config.vocab_size))
    expected = list(qwen_np.generate_batch(model, PROMPTS, max_new_tokens=4, temperature=0))
    assert list(qwen_np.generate_batch(outside, PROMPTS, max_new_tokens=4, temperature=0)) == expected


def test_split_thinking_splits_at_the_first_end_of_thinking():
    assert qwen_np.split_thinking("<think>\na\n</think>\n\nb </think> c") == ("a", "b </think> c")


# A model without tokenizer.json: asked for text, one clear error (not AttributeError from decode).
@pytest.mark.parametrize("call", [
    lambda m: qwen_np.generate(m, [1, 2, 3], max_new_tokens=3, stop="x"),
    lambda m: qwen_np.generate_batch(m, [[1, 2, 3], [4]], max_new_tokens=3, stop=["x"]),
    lambda m: qwen_np.generate_text(m, [1, 2, 3], max_new_tokens=3)],
    ids=["generate", "generate_batch", "generate_text"])
def test_what_needs_a_tokenizer_says_so_when_there_is_none(tiny_models, call):
    model, _ = tiny_models["qwen2"]
    assert model.tokenizer is None
    path = re.escape(str(model.path))
    with pytest.raises(qwen_np.QwenNPError, match=rf"^{path} has no tokenizer \(no tokenizer.json\), so it "
                                                  rf"cannot produce text$|^stop strings need a tokenizer: "
                                                  rf"{path} has no tokenizer \(no tokenizer.json\)$"):
        next(call(model))
