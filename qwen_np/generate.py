"""Text generation: samplers, the prefill/decode loop, stopping, and streaming text.

    for token in qwen_np.generate(model, "The capital of France is", max_new_tokens=20, temperature=0):
        print(model.tokenizer.decode([token]), end="")

The loop: forward passes over the (left-padded) prompts, in chunks of PREFILL_CHUNK tokens, fill
the KV cache and give the logits of each prompt's last position (prefill); then each step feeds
back the tokens just chosen and reuses the cache (decode). Each step's logits go through the
samplers in the reference's order (repetition penalty, temperature, top-k, top-p, min-p) and one
token is drawn per prompt, or the argmax is taken when the temperature is 0 (greedy).

The samplers are pure functions over a [B, V] float32 array of logits; they return a new array in
which the tokens they rule out are -inf. Randomness comes only from the `numpy.random.Generator`
passed to `sample`, made from the caller's seed, so a seeded run repeats exactly.
"""

import difflib
import inspect
import math
import os
import reprlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .config import QwenNPError, is_int, is_number
from .memory import gb, memory_room
from .model import KVCache, check_cache, copy_cache, empty_cache, forward
from .ops import softmax
from .weights import flatten

NEG_INF = np.float32(-np.inf)

# ---------------------------------------------------------------------------------------------
# Samplers, in the order they are applied (transformers' RepetitionPenaltyLogitsProcessor,
# TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper).


def apply_repetition_penalty(logits, seen, penalty):  # [B, V], [B, V] bool, float -> [B, V]
    # CTRL's penalty on every token seen so far, prompt included: a positive logit is divided by
    # the penalty and a negative one multiplied, so that both become less likely (penalty > 1).
    penalised = np.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty))
    return np.where(seen, penalised, logits)


def apply_temperature(logits, temperature):  # [B, V], float > 0 -> [B, V]
    # Below 1 sharpens the distribution, above 1 flattens it.
    return logits / np.float32(temperature)


def top_k_filter(logits, top_k, min_tokens_to_keep=1):  # [B, V] -> [B, V]
    # Keeps the k largest logits (and any tied with the k-th, as the reference does).
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = -np.partition(-logits, k - 1, axis=-1)[:, k - 1:k]  # [B, 1]
    return np.where(logits < kth_largest, NEG_INF, logits)


def top_p_filter(logits, top_p, min_tokens_to_keep=1):  # [B, V] -> [B, V]
    # Nucleus sampling: keeps the most probable tokens whose probabilities add up to top_p, the
    # token that crosses top_p included. As in the reference, the tokens are sorted ascending and
    # the dropped ones are the low tail whose cumulative probability stays within 1 - top_p; the
    # sort is stable, so among tied logits the lower ids are dropped first (as torch's sort does
    # for rows of up to 16 values; in longer rows its order among ties is its own).
    # Only the tokens in play are sorted: a -inf logit would sort first, add 0 and stay -inf.
    cols = in_play(logits)  # [n]
    play = np.take(logits, cols, axis=-1)  # [B, n]
    order = np.argsort(play, axis=-1, kind="stable")  # [B, n], least probable first
    probs = softmax(np.take_along_axis(play, order, axis=-1))  # [B, n]
    # Added up in float64 and rounded to float32, as torch's cumsum does: a float32 running sum over
    # a vocabulary of 150k drifts enough to move the cut by a token now and then.
    cumulative = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)  # [B, n]
    drop_sorted = cumulative <= np.float32(1 - top_p)
    drop_sorted[:, -min_tokens_to_keep:] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)  # back to the order of cols
    out = np.full_like(logits, NEG_INF)
    out[:, cols] = np.where(drop, NEG_INF, play)
    return out


def in_play(logits):  # [B, V] -> [n] int: the tokens with a finite logit in some row, ascending
    # After top-k, a few dozen of a vocabulary of 150k: top-p and the draw work on those alone.
    return np.flatnonzero(np.isfinite(logits).any(axis=0))


def min_p_filter(logits, min_p, min_tokens_to_keep=1):  # [B, V] -> [B, V]
    # Keeps the tokens at least min_p times as probable as the most probable one.
    probs = softmax(logits)  # [B, V]
    drop = probs < np.float32(min_p) * probs.max(axis=-1, keepdims=True)
    k = min(min_tokens_to_keep, probs.shape[-1])
    best = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # [B, k], the k most probable
    np.put_along_axis(drop, best, False, axis=-1)
    return np.where(drop, NEG_INF, logits)


def sample(logits, rng):  # [B, V], numpy Generator -> [B] int
    # One draw per row from softmax(logits): the first token whose cumulative probability
    # exceeds a uniform number. A token with probability 0 (-inf logit) is never drawn, so only
    # the tokens in play are added up.
    cols = in_play(logits)  # [n]
    cdf = np.cumsum(softmax(np.take(logits, cols, axis=-1).astype(np.float64)), axis=-1)  # [B, n]
    u = rng.random((len(logits), 1)) * cdf[:, -1:]  # [B, 1], in [0, total)
    return cols[np.minimum((cdf <= u).sum(axis=-1), len(cols) - 1)]


@dataclass(frozen=True)
class Sampling:
    """Sampler settings. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 turn a filter off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


def checked_logits(logits, params):  # [B, V] -> [B, V], finite
    """The model's logits, if every one is a number: NaN or inf there means the model is broken
    (the reference would argmax NaN silently, or fail in its draw), and the weight at fault is named."""
    if np.isfinite(logits).all():
        return logits
    culprit = non_finite_weight(params)
    where = f"the weight {culprit!r} holds NaN or inf" if culprit else \
        "no weight holds NaN or inf, so an activation overflowed float32"
    raise QwenNPError(f"the model's logits are not finite (NaN or inf): {where}")


PREFILL_CHUNK = 512  # prompt tokens per forward pass of the prefill (see `chunks`)


def chunks(config, cache, num_new):  # -> slices of the num_new tokens, one per forward pass
    # A long prompt goes through the model a chunk at a time, each chunk attending to the keys and
    # values the chunks before it cached: the same cache and last logits as one pass (up to float
    # rounding), but the T of a pass's activations ([B, T, F] in the MLP, [B, 1, T, S] masks) is
    # PREFILL_CHUNK at most however long the prompt. Dynamic NTK RoPE, whose frequencies follow a
    # pass's largest position, takes a prompt past its limit in one pass, as the reference does.
    step = PREFILL_CHUNK if rope_is_fixed(config, cache.length + num_new) else num_new
    return [slice(t, t + step) for t in range(0, num_new, step)]


def next_tokens(params, config, input_ids, cache, seen, sampling, rng, attention_mask=None):  # -> [B] int, cache
    """The next token of each row after `input_ids` [B, T], from the last position's logits. NumPy's
    overflow warnings are off: a model that overflows gets one error, from checked_logits, instead."""
    with np.errstate(over="ignore", invalid="ignore"):
        for new in chunks(config, cache, input_ids.shape[1]):  # one chunk in decoding
            mask = None if attention_mask is None else attention_mask[:, new]
            logits, cache = forward(params, config, input_ids[:, new], cache, attention_mask=mask, last_only=True)
    return choose_tokens(checked_logits(logits[:, -1], params), seen, sampling, rng), cache


def keeps_bf16(params):  # -> whether the weights were loaded with low_memory=True (bfloat16 bits, uint16)
    # low_memory keeps every matrix as bfloat16 bits, the embedding among them: one look tells.
    return params["model"]["embed_tokens"]["weight"].dtype == np.uint16


def non_finite_weight(params):  # -> the dotted name of the first weight holding NaN or inf, or None
    for name, w in flatten(params).items():
        # (low_memory's bfloat16 bits are uint16: NaN and inf have every exponent bit set)
        if ((w & 0x7F80) == 0x7F80).any() if w.dtype == np.uint16 else not np.isfinite(w).all():
            return name
    return None


@np.errstate(over="ignore")  # a tiny temperature (or penalty) can overflow float32: refused below
def choose_tokens(logits, seen, sampling, rng):  # [B, V], [B, V] bool, Sampling, Generator -> [B] int
    """The next token of each row: the samplers in the reference's order, then a draw."""
    if sampling.repetition_penalty != 1.0:  # applied in greedy decoding too, as the reference does
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:  # greedy: the filters below never remove the most probable token
        return logits.argmax(axis=-1)
    if sampling.temperature != 1.0:
        logits = apply_temperature(logits, sampling.temperature)
    check_scaled_logits(logits, sampling)
    if sampling.top_k:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    if sampling.min_p:
        logits = min_p_filter(logits, sampling.min_p)
    return sample(logits, rng)


def check_scaled_logits(logits, sampling):  # [B, V] after penalty and temperature: refused if softmax gives NaN
    # +inf, or a row that is -inf throughout: softmax would give NaN (the reference's draw fails on it too)
    if np.isposinf(logits).any() or np.isneginf(logits).all(axis=-1).any():
        penalty = f" and repetition_penalty={sampling.repetition_penalty}" if sampling.repetition_penalty != 1.0 else ""
        raise QwenNPError(f"the logits overflow float32 when scaled by temperature={sampling.temperature}{penalty}: "
                          f"use a larger temperature, or temperature=0 for greedy decoding")


# ---------------------------------------------------------------------------------------------
# Settings: the caller's arguments, else generation_config.json's values, else the defaults.


def is_float32(value):  # a number that float32, in which the logits are computed, holds without overflow
    return is_number(value) and abs(value) <= float(np.finfo(np.float32).max)  # compared as Python floats


RULES = {  # setting -> (test, what it must be), for the arguments and generation_config.json alike
    "temperature": (lambda v: is_float32(v) and v >= 0, "0 (greedy) or a positive number (finite in float32)"),
    "top_k": (is_int, "0 (off) or a positive integer"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: is_float32(v) and np.float32(v) > 0,
                           "a positive number (1 is off; finite and not 0 in float32)"),
    "max_new_tokens": (lambda v: is_int(v, 1), "a positive integer"),
    "seed": (lambda v: is_int(v) or isinstance(v, (np.random.Generator, np.random.SeedSequence)),
             "None, an integer >= 0 or a NumPy Generator"),
    "eos_token_id": (lambda v: is_int(v, -math.inf) or (isinstance(v, (list, tuple, set)) or is_vector(v)) and all(
        is_int(e, -math.inf) for e in v), "a token id or a list of token ids"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
}


def is_vector(value):  # a one-dimensional NumPy array
    return isinstance(value, np.ndarray) and value.ndim == 1


def checked(name, value, source=None):  # -> value, if it is what setting `name` must be
    test, rule = RULES[name]
    if not test(value):
        where = f"{source}: " if source else ""
        raise QwenNPError(f"{where}{name} must be {rule}, got {reprlib.repr(value)}")
    return value


def setting(generation_config, name, value, default):
    """The caller's value, else generation_config.json's, else (the key missing or null) `default`."""
    if value is not None:
        return checked(name, value)
    if generation_config.get(name) is None:
        return default
    return checked(name, generation_config[name], "generation_config.json")


def sampling_settings(generation_config, temperature=None, top_k=None, top_p=None, min_p=None,
                      repetition_penalty=None):
    """Sampling from the caller's values, else the checkpoint's generation_config.json, else the
    reference's defaults: greedy unless `do_sample` is set (then temperature 1, top_k 50)."""
    g = generation_config
    if temperature is None and not setting(g, "do_sample", None, False):
        temperature = 0.0
    temperature = float(setting(g, "temperature", temperature, 1.0))
    if temperature and np.float32(temperature) == 0:  # the logits are divided by it in float32
        raise QwenNPError(f"temperature={temperature} is 0 in float32, where the logits are divided by it: use "
                          f"temperature=0 for greedy decoding, or a larger one")
    filters = g if temperature else {}  # greedy decoding reads none of the file's filter values (nor checks them)
    return Sampling(temperature=temperature,
                    top_k=int(setting(filters, "top_k", top_k, 50)),
                    top_p=float(setting(filters, "top_p", top_p, 1.0)),
                    min_p=float(setting(filters, "min_p", min_p, 0.0)),
                    repetition_penalty=float(setting(g, "repetition_penalty", repetition_penalty, 1.0)))


def stop_strings(stop):  # None, a string or a list of strings -> list of the non-empty strings
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise QwenNPError(f"stop must be a string or a list of strings, got {reprlib.repr(stop)}")
    return [s for s in stop or () if s]


# ---------------------------------------------------------------------------------------------
# Streaming text: decode incrementally without splitting a multi-byte character.


def decode_step(tokenizer, ids, prefix_offset, read_offset):  # -> (new text, prefix_offset, read_offset)
    """The text that ids[read_offset:] adds to the text of the tokens before it.

    A byte-level BPE token can hold part of a UTF-8 character (one Chinese character or emoji is
    often two or three tokens); decoded alone it ends in U+FFFD. Such text is held back until the
    next tokens complete the character. Decoding only the few tokens from `prefix_offset` keeps a
    step's cost constant. Start with offsets (0, 0), and pass back the offsets returned.
    """
    before = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
    text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=False)
    if len(text) > len(before) and not text.endswith("\ufffd"):
        return text[len(before):], read_offset, len(ids)
    return "", prefix_offset, read_offset


def decode_rest(tokenizer, ids, prefix_offset, read_offset):  # -> text still held back at the end
    before = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=False)
    return tokenizer.decode(ids[prefix_offset:], skip_special_tokens=False)[len(before):]


def find_stop(text, stop):  # -> index of the first stop string in text, or -1
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def extend_text(tokenizer, ids, state, stop):  # -> (the new state, whether the text now holds a stop string)
    """state: (the text decoded so far, prefix_offset, read_offset), the offsets as decode_step keeps them."""
    text, prefix, read = state
    new, prefix, read = decode_step(tokenizer, ids, prefix, read)
    text += new
    # What decode_step holds back (a character not complete yet) may already finish a stop string
    # with its whole characters: it counts, as it does for the reference, which looks at the tokens.
    # (When decode_step gave new text it held nothing back.)
    held = "" if new else decode_rest(tokenizer, ids, prefix, read).rstrip("\ufffd")
    # Only the end of the text can hold a stop string that was not there before.
    hit = find_stop((text + held)[-(len(new) + len(held) + max(map(len, stop))):], stop) >= 0
    return (text, prefix, read), hit


def partial_stop(text, stop):  # -> length of the longest end of `text` that begins a stop string
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)


# ---------------------------------------------------------------------------------------------
# The prefill/decode loop


class Past(NamedTuple):
    """A finished one-prompt generation, kept for the next one (the next turn of a chat): the token
    ids its KV cache holds (the prompt and the answer, but for the last token chosen) and the cache.
    Passed as `past=`, the prompt tokens it already holds are not computed again. It is only read:
    the same Past can start several generations, of the model that made it only."""
    ids: tuple
    cache: KVCache
    model_path: object = None  # the path of the model that made it (model.path): another model's cache is refused
    low_memory: bool = False  # whether that model kept its weight matrices in bfloat16 (load(..., low_memory=True))

    def __repr__(self):
        return f"Past({len(self.ids)} token ids, {self.cache!r})"


class GenerationStats(NamedTuple):
    """What a finished generation returns (as the generator's StopIteration value)."""
    prefill_tokens: int  # prompt tokens run through the prefill, all prompts together
    prefill_seconds: float
    decode_tokens: int  # tokens fed through the decode steps, all prompts together
    decode_seconds: float
    finish_reasons: tuple  # per prompt: "eos" (an end token), "stop" (a stop string) or "length"
    reused_tokens: int = 0  # prompt tokens taken from `past` instead of the prefill
    past: Past | None = None  # one prompt: what to pass as `past=` to the next generation


def reusable_length(past, ids):  # Past, list[int] -> how many leading ids past's cache can supply
    # The tokens both start with; never the prompt's last token, which must run through the model
    # to give the logits of the first new token. A cache entry depends only on the tokens up to
    # its position (causal attention), so the entries of a common start are the same.
    n = 0
    for cached, wanted in zip(past.ids, ids[:-1]):
        if cached != wanted:
            break
        n += 1
    return n


def rope_is_fixed(config, length):  # -> whether every forward pass within `length` positions rotates alike
    # Dynamic NTK RoPE computes its frequencies in each forward pass from the pass's largest position
    # (within one generation the same as the reference, whose model object keeps the largest length
    # it has seen), and they change once it passes max_position_embeddings.
    return config.rope_parameters["rope_type"] != "dynamic" or length <= config.max_position_embeddings


def rope_allows_reuse(config, past, ids):  # -> whether past's keys are those a prefill of ids would make
    # With dynamic NTK RoPE, keys cached past max_position_embeddings were rotated with other
    # frequencies than one prefill of `ids` would use, and so would all keys of a prompt longer than that.
    return rope_is_fixed(config, max(len(past.ids), len(ids)))


def check_past(past, model):
    """`past` is a GenerationStats.past made by this model (same files, same low_memory) for one prompt."""
    made = isinstance(past, Past) and isinstance(past.ids, tuple) and isinstance(past.cache, KVCache)
    if not made or len(past.ids) != past.cache.length:  # a generation's past holds one id per cached position
        raise QwenNPError("past= must be the `past` of an earlier one-prompt generation (its stats.past)")
    # A model of the same shape (a base model and its instruct version) would take the cache as its
    # own: the path tells them apart (resolved: a relative path, or a link, may name the same files).
    if past.model_path is not None and model.path is not None and \
            os.path.realpath(past.model_path) != os.path.realpath(model.path):
        raise QwenNPError(f"past= was made by another model ({past.model_path}), not this one ({model.path})")
    if past.low_memory != keeps_bf16(model.params):
        made, this = ("with", "without") if past.low_memory else ("without", "with")
        raise QwenNPError(f"past= was made by this checkpoint loaded {made} low_memory=True, and this model was "
                          f"loaded {this} it: low_memory rounds float32 and float16 weights to bfloat16, so the "
                          f"cached keys and values may not be this model's")
    try:
        check_cache(past.cache, model.config, batch_size=1)
    except QwenNPError as e:
        raise QwenNPError(f"past= does not fit this model: {e}") from None


def check_options(kwargs, function):  # keyword arguments to pass on to `function`: one it lacks is named
    options = [name for name in inspect.signature(function).parameters if name not in ("model", "prompt")]
    for name, value in kwargs.items():
        if name not in options:
            close = difflib.get_close_matches(name, options, n=1)
            raise QwenNPError(f"unknown option {name}={reprlib.repr(value)}"
                              f"{f' (did you mean {close[0]}?)' if close else ''}; the generation options are "
                              f"{', '.join(options)}")


def check_model(model, caller):
    """`model` is what qwen_np.load returns (Model is defined in __init__, which imports this module)."""
    if not all(hasattr(model, name) for name in ("config", "params", "tokenizer", "generation_config", "path")):
        raise QwenNPError(f"{caller} takes the Model that qwen_np.load returns as its first argument, "
                          f"got {type(model).__name__}")


def no_tokenizer(model):  # -> "PATH has no tokenizer (why)", for messages
    why = "its metadata holds no vocabulary" if model.path.suffix.lower() == ".gguf" else "no tokenizer.json"
    return f"{model.path} has no tokenizer ({why})"


def check_unicode(text, what):  # refuses a str the tokenizer would fail on with a bare error
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise QwenNPError(f"{what} is not valid Unicode text: it holds a lone surrogate") from None


def encode(model, text, what, **kwargs):  # -> the token ids of text, by the model's tokenizer
    check_unicode(text, what)
    try:
        return model.tokenizer.encode(text, **kwargs).ids
    except BaseException as e:
        # A tokenizer file can load and still fail on text (a post-processor naming a token the
        # vocabulary lacks: the tokenizers library panics, raising a BaseException; an unk_token
        # missing from it: a plain Exception).
        if type(e).__name__ != "PanicException" and not isinstance(e, Exception):
            raise  # KeyboardInterrupt and the like
        raise QwenNPError(f"the tokenizer of {model.path} failed to encode {what} ({e}): "
                          f"its tokenizer may be damaged") from None


def token_id_list(prompt):  # a list, tuple or array of token ids, or one [1, T] row of them -> list[int]
    if isinstance(prompt, (bytes, bytearray, memoryview)):  # NumPy would read its bytes as token ids
        raise QwenNPError(f"a prompt must be a string or a list of token ids, got bytes {reprlib.repr(prompt)}: "
                          f"decode them to a string first")
    try:
        array = np.asarray(prompt)
    except (ValueError, TypeError):  # ragged nested lists
        array = None
    if array is not None and array.ndim == 2 and len(array) == 1:  # [1, T], as a tokenizer returns input_ids
        array = array[0]
    if array is not None and array.ndim == 1 and (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        return array.astype(np.int64).tolist()
    raise QwenNPError(f"a prompt must be a string or a list of token ids (integers), got {reprlib.repr(prompt)}")


def prompt_ids(model, prompt):  # str or token ids -> list[int]
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise QwenNPError(f"{no_tokenizer(model)}: pass the prompt as a list of token ids")
        ids = encode(model, prompt, "the prompt")
    else:
        ids = token_id_list(prompt)
    if not ids:
        raise QwenNPError("the prompt is empty: give at least one token")
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise QwenNPError(f"the prompt has token ids outside the vocabulary (0..{model.config.vocab_size - 1})")
    return ids


def end_token_ids(model, eos_token_id=None):  # -> set of ints
    """The end tokens: the caller's, else generation_config.json's, else config.json's (int or list)."""
    ends = setting(model.generation_config, "eos_token_id", eos_token_id, model.config.eos_token_id)
    if ends is None:
        return set()
    return {int(e) for e in ([ends] if is_int(ends, -math.inf) else ends)}


def context_length(config):  # -> int, or None when RoPE sets no limit
    """How many positions the model can attend over: max_position_embeddings, or more where the
    RoPE scaling says so."""
    rope = config.rope_parameters
    if rope["rope_type"] == "dynamic":  # dynamic NTK RoPE stretches itself to any length
        return None
    if rope["rope_type"] == "yarn":
        # YaRN stretches the original context `factor` times; Qwen's model cards add YaRN to
        # config.json and leave max_position_embeddings as it was (32768 in Qwen2.5, 40960 in
        # Qwen3), below factor x original_max_position_embeddings. (Llama 3's configs
        # give the stretched context as max_position_embeddings: Llama 3.2's factor is 32, for 131072
        # positions, not 32 x 8192.)
        return max(config.max_position_embeddings, int(rope["factor"] * rope["original_max_position_embeddings"]))
    return config.max_position_embeddings


def context_source(config):  # -> where context_length comes from, for messages
    if context_length(config) == config.max_position_embeddings:
        return f"max_position_embeddings={config.max_position_embeddings}"
    return "the RoPE scaling's factor times original_max_position_embeddings"


def counted(n, noun):  # -> "1 token", "2 tokens": a count for messages
    return f"{n} {noun}{'' if n == 1 else 's'}"


def new_token_budget(config, generation_config, prompt_length, max_new_tokens):  # -> int
    """max_new_tokens, checked against the context length; by default as many as fit, up to
    generation_config.json's max_new_tokens (or 512)."""
    context = context_length(config)
    room = None if context is None else context - prompt_length
    if max_new_tokens is not None:
        checked("max_new_tokens", max_new_tokens)
    if room is not None and room < 1:
        raise QwenNPError(f"the prompt ({counted(prompt_length, 'token')}) already fills the model's context of "
                          f"{context} positions ({context_source(config)}): shorten it")
    if max_new_tokens is None:
        wanted = setting(generation_config, "max_new_tokens", None, 512)
        max_new_tokens = wanted if room is None else min(wanted, room)
    if room is not None and max_new_tokens > room:
        raise QwenNPError(f"the prompt ({counted(prompt_length, 'token')}) plus max_new_tokens ({max_new_tokens}) "
                          f"does not fit in the model's context of {context} positions ({context_source(config)}); "
                          f"shorten the prompt or lower max_new_tokens to {room}")
    return int(max_new_tokens)


def new_cache(config, batch_size, capacity, past=None, reused=0):
    """A KV cache with room for `capacity` positions: empty, or holding the first `reused` of `past`'s.
    One that cannot fit in the memory left is refused first: np.zeros takes its memory only as the
    positions are written, and the kernel would end the process part way through the answer."""
    # float32 keys and values, of every layer and key/value head, per position
    per_position = 4 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    size = capacity * batch_size * per_position  # bytes: a Python int, of any size

    def refused(why=""):  # -> the error, with why it cannot be allocated where that is known
        shown = gb(size) if size < 1e300 else "more bytes than a float counts"
        return QwenNPError(f"a KV cache for {capacity:,} positions ({shown}) cannot be allocated{why}: "
                           f"lower max_new_tokens")

    room = memory_room()
    if room is not None and size > room[0]:
        raise refused(f" in the {gb(room[0])} of memory free ({room[1]})")
    try:
        if past is None:
            return empty_cache(config, batch_size, capacity)
        return copy_cache(past.cache, reused, capacity)  # a copy: `past` itself stays as it was
    except (MemoryError, ValueError):  # np.zeros: "Unable to allocate ..." / "array is too big"
        raise refused() from None


def left_pad(prompts, pad_id):  # list of B id lists -> [B, T] int, [B, T] int (1 real, 0 padding)
    T = max(map(len, prompts))
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):], mask[row, T - len(p):] = p, 1
    return ids, mask


def keep_rows(cache, alive):  # KVCache, [b] bool -> KVCache of the alive rows only
    return cache._replace(keys=tuple(k[alive] for k in cache.keys), values=tuple(v[alive] for v in cache.values),
                          valid=cache.valid[alive])


def batch_prompt_ids(model, prompts):  # B prompts (strings, id lists) or [B, T] ids -> B lists of ids
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:  # [B, T] token ids: one prompt a row
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts or all(is_int(p, -math.inf) for p in prompts):
        raise QwenNPError(f"generate_batch takes a list of prompts, each a string or a list of token ids "
                          f"(for one prompt, use generate); got {reprlib.repr(prompts)}")
    return [prompt_ids(model, p) for p in prompts]


def seen_tokens(prompts, vocab_size):  # B lists of ids -> [B, V] bool, True for each prompt's tokens
    seen = np.zeros((len(prompts), vocab_size), bool)
    for row, p in enumerate(prompts):
        seen[row, p] = True
    return seen


def tokens_from_past(model, past, prompts):  # -> how many leading prompt tokens past's cache supplies (0: no past)
    if past is None:
        return 0
    if len(prompts) != 1:
        raise QwenNPError(f"past= continues one prompt, not a batch of {len(prompts)}")
    check_past(past, model)
    return reusable_length(past, prompts[0]) if rope_allows_reuse(model.config, past, prompts[0]) else 0


def generate_batch(model, prompts, max_new_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None,
                   repetition_penalty=None, seed=None, stop=None, eos_token_id=None, past=None):
    """Generates from several prompts together; yields at each step one entry per prompt: its new
    token id, or None once it has finished. Returns (as StopIteration.value) a GenerationStats.

    prompts: strings or lists of token ids, of any lengths (they are left-padded together).
    A prompt finishes at an end token (not yielded), after max_new_tokens, or after the token that
    completes one of the `stop` strings (yielded; `generate_text` cuts the text at the stop string).
    Sampling defaults come from the checkpoint's generation_config.json, see `sampling_settings`.
    past: the `past` of an earlier one-prompt generation (GenerationStats.past): the tokens this
    prompt shares with its start are taken from its cache, only the rest is prefilled.
    """
    check_model(model, "generate_batch")
    params, config = model.params, model.config
    prompts = batch_prompt_ids(model, prompts)
    settings = sampling_settings(model.generation_config, temperature, top_k, top_p, min_p, repetition_penalty)
    budget = new_token_budget(config, model.generation_config, max(map(len, prompts)), max_new_tokens)
    ends = end_token_ids(model, eos_token_id)
    stop = stop_strings(stop)
    if stop and model.tokenizer is None:
        raise QwenNPError(f"stop strings need a tokenizer: {no_tokenizer(model)}")
    rng = np.random.default_rng(None if seed is None else checked("seed", seed))
    B, V = len(prompts), config.vocab_size
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) and 0 <= config.pad_token_id < V else 0
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [B, T] x2

    seen = seen_tokens(prompts, V)  # [B, V]: tokens of each prompt so far, for the repetition penalty
    generated = [[] for _ in range(B)]
    texts = [("", 0, 0)] * B  # per prompt: generated text and decode offsets, see extend_text (for stop strings)
    reasons, finished = ["length"] * B, np.zeros(B, bool)
    rows = np.arange(B)  # the prompts in the batch: those still generating (with dynamic RoPE, all)
    # Dynamic NTK RoPE takes its frequencies from the batch's largest position: finished prompts stay in
    # the batch, fed padding as in the reference, so that the others see the same frequencies.
    keep_finished = config.rope_parameters["rope_type"] == "dynamic"

    start = time.perf_counter()
    # Prefill: all prompt tokens (but those `past` holds), in chunks; the LM head only at the last
    # position. The cache gets room for the whole answer now, so decoding never has to grow (copy) it.
    reused = tokens_from_past(model, past, prompts)
    cache = new_cache(config, B, input_ids.shape[1] + budget, past, reused)
    next_ids, cache = next_tokens(params, config, input_ids[:, reused:], cache, seen, settings, rng,
                                  attention_mask=attention_mask[:, reused:])  # [B]
    prefill_seconds, decode_seconds, decode_tokens = time.perf_counter() - start, 0.0, 0

    for step in range(budget):
        out = [None] * B
        for row, token in zip(rows, next_ids.tolist()):
            if finished[row]:
                continue
            if token in ends:
                finished[row], reasons[row] = True, "eos"
                continue
            out[row] = token
            generated[row].append(token)
            if stop:
                texts[row], hit = extend_text(model.tokenizer, generated[row], texts[row], stop)
                if hit:
                    finished[row], reasons[row] = True, "stop"
        if any(t is not None for t in out):
            yield out
        if step == budget - 1 or finished.all():
            break
        alive = ~finished[rows]
        if keep_finished:
            next_ids = np.where(alive, next_ids, pad_id)
        elif not alive.all():  # drop finished prompts from the batch
            rows, next_ids, seen, cache = rows[alive], next_ids[alive], seen[alive], keep_rows(cache, alive)

        start = time.perf_counter()
        # Decode: one new token per prompt, attending to the cached keys and values.
        seen[np.arange(len(rows)), next_ids] = True
        next_ids, cache = next_tokens(params, config, next_ids[:, None], cache, seen, settings, rng)  # [b]
        decode_seconds += time.perf_counter() - start
        decode_tokens += int(alive.sum())

    # One prompt: its cache holds the prompt and every generated token fed back (the last chosen is not).
    after = Past(tuple((prompts[0] + generated[0])[:cache.length]), cache, model.path, keeps_bf16(model.params)) \
        if B == 1 else None
    return GenerationStats(int(attention_mask.sum()) - reused, prefill_seconds, decode_tokens, decode_seconds,
                           tuple(reasons), reused, after)


def generate(model, prompt, max_new_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, seed=None, stop=None, eos_token_id=None, past=None):
    """Yields the new token ids of one prompt (a string or a list of token ids), one at a time.

    temperature=0 is greedy decoding; seed makes a sampled run repeat exactly. Arguments left as
    None take the checkpoint's generation_config.json values (see `generate_batch`). past: the
    `past` of the returned stats of an earlier call, whose cached tokens this prompt need not recompute.
    Returns (as StopIteration.value) a GenerationStats.
    """
    check_model(model, "generate")
    if is_int(prompt, -math.inf):  # generate_batch would take [prompt] for a list of one-token prompts
        raise QwenNPError(f"a prompt must be a string or a list of token ids (integers), got {prompt!r}: "
                          f"for one token, pass [{prompt!r}]")
    steps = generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, min_p,
                           repetition_penalty, seed, stop, eos_token_id, past)
    while True:
        try:
            (token,) = next(steps)
        except StopIteration as done:
            return done.value
        yield token


def generate_text(model, prompt, stop=None, **kwargs):
    """Yields the completion of `prompt` as text, in pieces as they are produced: never half a
    UTF-8 character, and never text past a stop string (the stop string itself is left out).
    Keyword arguments are those of `generate`. Returns (as StopIteration.value) a GenerationStats."""
    check_model(model, "generate_text")
    if model.tokenizer is None:
        raise QwenNPError(f"{no_tokenizer(model)}, so it cannot produce text")
    check_options(kwargs, generate)
    stop = stop_strings(stop)
    tokens = generate(model, prompt, stop=stop, **kwargs)
    ids, prefix, read, pending = [], 0, 0, ""  # pending: text that may begin a stop string
    while True:
        try:
            ids.append(next(tokens))
        except StopIteration as done:
            stats = done.value
            break
        if pending is None:  # a stop string was found: nothing more is shown
            continue
        new, prefix, read = decode_step(model.tokenizer, ids, prefix, read)
        pending += new
        cut = find_stop(pending, stop)
        if cut >= 0:
            if pending[:cut]:
                yield pending[:cut]
            pending = None
            continue
        shown = len(pending) - partial_stop(pending, stop)
        if shown:
            yield pending[:shown]
            pending = pending[shown:]
    if pending is not None:  # generation ended without a stop string: flush what was held back
        rest = pending + decode_rest(model.tokenizer, ids, prefix, read)
        cut = find_stop(rest, stop)
        rest = rest[:cut] if cut >= 0 else rest
        if rest:
            yield rest
    return stats
