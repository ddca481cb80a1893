"""The model wiring: attention block, MLP or mixture-of-experts block, decoder layer, forward.

Only these functions read the config; the operators in `ops` take explicit scalars.
The params tree mirrors the checkpoint names, e.g.
`params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]`, so a sub-tree unpacks
straight into an operator: `linear(x, **p["q_proj"])` passes `weight` and, where the
checkpoint has one, `bias`.
"""

import reprlib
from typing import NamedTuple

import numpy as np

from .config import Config, QwenNPError, is_int
from .ops import (apply_rope, attention, causal_mask, embedding, linear, mlp, moe_experts, moe_route,
                  rms_norm, rope_cos_sin, rope_default, rope_dynamic, rope_linear, rope_llama3, rope_yarn,
                  sigmoid, sliding_window_mask)


class KVCache(NamedTuple):
    """Keys and values of every position seen so far: a value passed to `forward` and handed back.

    The buffers have room for more positions than are filled (`capacity >= length`), so a new
    token is written in place and the cache is copied only when it doubles: appending costs
    amortised constant time. `forward` writes into the free slots past `length` and returns a
    cache with a larger `length`, usually sharing the buffers. Passing a cache again after that
    (to try another continuation of the same tokens) gives a copy to write into: every cache
    `forward` returned keeps what it holds (see grow_cache).
    """
    keys: tuple  # per layer [B, K, C, Dh], C the capacity (position-minor in memory: see empty_cache)
    values: tuple  # per layer [B, K, C, Dh], position-minor in memory like the keys
    valid: np.ndarray  # [B, C] bool: a real token (False for left padding and free slots)
    length: int  # S: positions filled

    def __repr__(self):  # the shapes, not megabytes of numbers
        if not self.keys:
            return f"KVCache(no layers, length={self.length})"
        B, K, C, Dh = self.keys[0].shape
        return (f"KVCache({len(self.keys)} layers of keys and values [B={B}, K={K}, C={C}, Dh={Dh}], "
                f"length={self.length})")


def empty_cache(config, batch_size, capacity):
    """A KV cache for `batch_size` sequences with room for `capacity` positions, none filled yet."""
    check_cache_request(config, batch_size, capacity)
    B, K, C, Dh = batch_size, config.num_key_value_heads, capacity, config.head_dim
    layers = range(config.num_hidden_layers)
    # Keys and values are [B, K, C, Dh], laid out position-minor in memory (a [B, K, Dh, C] buffer
    # seen transposed): each head's keys and values are then a row-major [Dh, S] matrix. Decoding
    # multiplies it by one vector per query head (the scores and the weighted sum of values in
    # `grouped_attention`), which BLAS streams 1.4-1.8x faster over rows of S than of Dh.
    def buffers():
        return tuple(np.zeros((B, K, Dh, C), np.float32).swapaxes(2, 3) for _ in layers)

    return KVCache(buffers(), buffers(), np.zeros((B, C), bool), 0)


def copy_cache(cache, length, capacity):
    """A new cache holding the first `length` positions of `cache`, with room for `capacity`."""
    def copied(a):  # [B, K, C, Dh] or [B, C] -> the same with capacity `capacity`
        axis = 2 if a.ndim == 4 else 1
        shape = a.shape[:axis] + (capacity,) + a.shape[axis + 1:]
        new = np.zeros_like(a, shape=shape)  # in a's memory layout (keys and values stay position-minor)
        kept = (slice(None),) * axis + (slice(0, length),)
        new[kept] = a[kept]
        return new

    return KVCache(tuple(map(copied, cache.keys)), tuple(map(copied, cache.values)), copied(cache.valid), length)


def grow_cache(cache, needed):
    """The same cache with room for at least `needed` positions (capacity doubles when full).

    A copy too when another forward call has already written past this cache's length into the
    same buffers (the cache was passed twice, e.g. to try two continuations): writing there
    would change what the cache that call returned holds. Every such call wrote the slot at
    `length`, its key at least (a key of zeros is all but impossible)."""
    capacity, length = cache.valid.shape[1], cache.length
    if needed > capacity:
        return copy_cache(cache, length, max(needed, 2 * capacity))
    written = length < capacity and (cache.valid[:, length].any() or cache.keys[0][:, :, length].any())
    return copy_cache(cache, length, capacity) if written else cache


def rope_frequencies(config, seq_len):  # -> [Dh/2], attention_factor
    """The inverse frequencies for positions below seq_len, by the config's rope type."""
    rope, dim = config.rope_parameters, config.head_dim
    theta, rope_type = rope["rope_theta"], rope["rope_type"]
    if rope_type == "linear":
        return rope_linear(dim, theta, rope["factor"])
    if rope_type == "dynamic":
        return rope_dynamic(dim, theta, rope["factor"], seq_len, config.max_position_embeddings)
    if rope_type == "yarn":
        return rope_yarn(dim, theta, rope["factor"], rope["original_max_position_embeddings"],
                         beta_fast=rope.get("beta_fast"), beta_slow=rope.get("beta_slow"),
                         attention_factor=rope.get("attention_factor"), mscale=rope.get("mscale"),
                         mscale_all_dim=rope.get("mscale_all_dim"), truncate=rope.get("truncate", True))
    if rope_type == "llama3":
        return rope_llama3(dim, theta, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                           rope["original_max_position_embeddings"])
    return rope_default(dim, theta)


def attention_block(x, p, cos, sin, mask, k_cache, v_cache, start, num_heads, num_kv_heads, head_dim, eps):
    # [B, T, D] -> [B, T, D]; writes this step's keys and values into k_cache/v_cache[:, :, start:]
    B, T, _ = x.shape
    end = start + T  # this step's positions are start..end-1 of the cache
    q = linear(x, **p["q_proj"]).reshape(B, T, num_heads, head_dim)  # [B, T, H, Dh]
    k = linear(x, **p["k_proj"]).reshape(B, T, num_kv_heads, head_dim)  # [B, T, K, Dh]
    v = linear(x, **p["v_proj"]).reshape(B, T, num_kv_heads, head_dim)  # [B, T, K, Dh]
    if "q_norm" in p:  # Qwen3: RMSNorm over each head's vector, before RoPE
        q = rms_norm(q, **p["q_norm"], eps=eps)
        k = rms_norm(k, **p["k_norm"], eps=eps)
    q = apply_rope(q.transpose(0, 2, 1, 3), cos, sin)  # [B, H, T, Dh]
    k_cache[:, :, start:end] = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)  # [B, K, T, Dh]
    v_cache[:, :, start:end] = v.transpose(0, 2, 1, 3)
    out = attention(q, k_cache[:, :, :end], v_cache[:, :, :end], mask)  # [B, H, T, Dh]
    return linear(out.transpose(0, 2, 1, 3).reshape(B, T, num_heads * head_dim), **p["o_proj"])


def sparse_moe_block(x, p, top_k, norm_topk_prob):  # [N, D] -> [N, D], [N, k] int, [N, k]
    chosen, weights, _ = moe_route(x, p["gate"]["weight"], top_k, norm_topk_prob)
    out = moe_experts(x, p["experts"], chosen, weights)
    if "shared_expert" in p:  # Qwen2-MoE: one more MLP for every token, gated per token
        out = out + sigmoid(linear(x, **p["shared_expert_gate"])) * mlp(x, **p["shared_expert"])
    return out, chosen, weights


def decoder_layer(x, p, config, cos, sin, mask, k_cache, v_cache, start):
    # [B, T, D] -> [B, T, D], router choice or None: pre-norm attention and MLP, each added back
    h = rms_norm(x, **p["input_layernorm"], eps=config.rms_norm_eps)
    x = x + attention_block(h, p["self_attn"], cos, sin, mask, k_cache, v_cache, start,
                            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                            config.rms_norm_eps)
    h = rms_norm(x, **p["post_attention_layernorm"], eps=config.rms_norm_eps)
    if "experts" in p["mlp"]:  # a sparse layer: its params hold experts
        B, T, D = h.shape
        out, chosen, weights = sparse_moe_block(h.reshape(B * T, D), p["mlp"], config.num_experts_per_tok,
                                                config.norm_topk_prob)
        return x + out.reshape(B, T, D), (chosen.reshape(B, T, -1), weights.reshape(B, T, -1))
    return x + mlp(h, **p["mlp"]), None


def attention_inputs(config, valid, num_new):  # [B, S] bool, T -> [B, T, Dh] x2, {layer type: [B, 1, T, S]}
    """The RoPE cos/sin of the last `num_new` of S positions, and the attention mask of each layer
    type; `valid` marks which positions hold real tokens (False: left padding)."""
    S = valid.shape[1]
    start = S - num_new
    # Positions count real tokens only, so a left-padded prompt starts at position 0.
    positions = np.maximum(valid.cumsum(axis=1)[:, start:] - 1, 0)  # [B, T]
    inv_freq, attention_factor = rope_frequencies(config, int(positions.max()) + 1)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)  # [B, T, Dh] x2

    # A query sees real tokens (and itself, so that a padding row is never empty).
    key_ok = valid[:, None, None, :] | np.eye(num_new, S, k=start, dtype=bool)[None, None]  # [B, 1, T, S]
    full = causal_mask(num_new, S)[None, None] & key_ok
    # Without a window (use_sliding_window off) a "sliding_attention" layer attends like any other.
    sliding = full
    if config.sliding_window is not None:
        sliding = sliding_window_mask(num_new, S, config.sliding_window)[None, None] & key_ok
    return cos, sin, {"full_attention": full, "sliding_attention": sliding}


def forward(params, config, input_ids, cache=None, attention_mask=None, last_only=False, return_router=False):
    """Logits for `input_ids` [B, T] after the positions already in `cache`.

    attention_mask: [B, T], 0 for left padding among the new tokens (default: all real).
    last_only: compute the LM head for the last position only ([B, 1, V]), as prefill needs.
    return_router: also return, per layer, (experts [B, T, k], weights [B, T, k]) or None.
    Returns (logits [B, T, V] float32, cache) or (logits, cache, router).
    """
    check_params_config(params, config)  # wrong inputs: one clear error each (see the checks below)
    input_ids = check_input_ids(input_ids, config.vocab_size)
    B, T = input_ids.shape
    new_valid = check_attention_mask(attention_mask, (B, T))
    if cache is not None:
        check_cache(cache, config, B)
    # The T new positions go after those the cache holds: room for them, their RoPE angles and masks.
    cache = empty_cache(config, B, T) if cache is None else grow_cache(cache, cache.length + T)
    start, end = cache.length, cache.length + T
    cache.valid[:, start:end] = new_valid
    cos, sin, masks = attention_inputs(config, cache.valid[:, :end], T)

    # Token vectors, through every decoder layer (each writes its keys and values into the cache),
    # then the final norm and the LM head.
    x = embedding(input_ids, params["model"]["embed_tokens"]["weight"])  # [B, T, D]
    router = []
    for i, layer in enumerate(params["model"]["layers"]):
        mask = masks[config.layer_types[i]]
        x, choice = decoder_layer(x, layer, config, cos, sin, mask, cache.keys[i], cache.values[i], start)
        router.append(choice)
    if last_only:
        x = x[:, -1:]  # [B, 1, D]: generation needs the next-token logits of the last position only
    x = rms_norm(x, **params["model"]["norm"], eps=config.rms_norm_eps)
    logits = linear(x, **params["lm_head"])  # [B, T, V] ([B, 1, V] with last_only)
    cache = cache._replace(length=end)
    return (logits, cache, router) if return_router else (logits, cache)


# ---------------------------------------------------------------------------------------------
# The checks `forward` runs first: a wrong input is one clear error, not a failure deep inside NumPy


def check_cache(cache, config, batch_size):
    """The cache is a KVCache made for this config's layers and heads, holding batch_size sequences."""
    if not isinstance(cache, KVCache) or not cache.keys:
        got = "a KVCache of no layers" if isinstance(cache, KVCache) else type(cache).__name__
        raise QwenNPError(f"cache must be the KVCache that forward returned, got {got}")
    _, K, _, Dh = cache.keys[0].shape  # [B, K, C, Dh]
    found = (len(cache.keys), K, Dh)
    expected = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    if found != expected:
        raise QwenNPError(f"the cache was made for another model: {found[0]} layers of {found[1]} key/value heads "
                          f"of {found[2]}, where this one has {expected[0]} of {expected[1]} of {expected[2]}")
    if cache.valid.shape[0] != batch_size:
        raise QwenNPError(f"the cache holds {cache.valid.shape[0]} sequences but input_ids has {batch_size}")


def check_cache_request(config, batch_size, capacity):
    """empty_cache's arguments: the model's config, at least one sequence, and a whole number of positions."""
    if not isinstance(config, Config):
        raise QwenNPError(f"empty_cache(config, batch_size, capacity): config must be model.config, "
                          f"got {type(config).__name__}")
    for name, value, least in (("batch_size", batch_size, 1), ("capacity", capacity, 0)):
        if not is_int(value, least):
            raise QwenNPError(f"empty_cache: {name} must be a whole number of at least {least}, got {value!r}")


def check_params_config(params, config):
    """forward's first two arguments are a Model's params tree and config, in that order, of one model."""
    for name, value, kind, want in (("params", params, dict, "model.params, the tree of weights"),
                                    ("config", config, Config, "model.config")):
        if not isinstance(value, kind):
            swapped = " (params and config are swapped?)" if isinstance(params, Config) else ""
            raise QwenNPError(f"forward(params, config, input_ids): {name} must be {want}, got "
                              f"{type(value).__name__}{swapped}")
    if "model" not in params or "lm_head" not in params:
        raise QwenNPError(f"forward(params, config, input_ids): params must be model.params, whose top keys are "
                          f"'model' and 'lm_head', got a dict of {reprlib.repr(list(params))}")
    found = (len(params["model"]["layers"]), *params["model"]["embed_tokens"]["weight"].shape)
    expected = (config.num_hidden_layers, config.vocab_size, config.hidden_size)
    if found != expected:
        raise QwenNPError(f"params and config are of different models: the params have {found[0]} layers and a "
                          f"{found[1]} x {found[2]} embedding, the config {expected[0]} and {expected[1]} x "
                          f"{expected[2]}")


def check_input_ids(input_ids, vocab_size):  # -> input_ids as an integer array [B, T]
    try:
        input_ids = np.asarray(input_ids)
    except ValueError:  # ragged rows
        raise QwenNPError(f"input_ids must be a non-empty integer array [batch, tokens], got "
                          f"{reprlib.repr(input_ids)}") from None
    if input_ids.ndim != 2 or input_ids.size == 0 or not np.issubdtype(input_ids.dtype, np.integer):
        raise QwenNPError(f"input_ids must be a non-empty integer array [batch, tokens], got shape "
                          f"{input_ids.shape} of {input_ids.dtype}")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise QwenNPError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return input_ids


def check_attention_mask(attention_mask, shape):  # -> [B, T] bool, True for a real token
    if attention_mask is None:
        return np.ones(shape, bool)
    try:
        mask = np.asarray(attention_mask)
        mask = mask.astype(np.float64) if mask.dtype == object else mask  # e.g. rows of mixed kinds
    except (ValueError, TypeError):  # ragged rows, or things that are not numbers
        raise QwenNPError(f"attention_mask must be an array {shape} of 1 and 0, like input_ids; got "
                          f"{reprlib.repr(attention_mask)}") from None
    if mask.shape != shape:
        raise QwenNPError(f"attention_mask has shape {mask.shape}, expected {shape}, that of input_ids")
    if mask.dtype.kind not in "biuf":
        raise QwenNPError(f"attention_mask must hold 1 (a real token) and 0 (padding), got an array of {mask.dtype}")
    if not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))][0]
        raise QwenNPError(f"attention_mask must hold 1 (a real token) and 0 (padding), found {bad}")
    return mask.astype(bool)
