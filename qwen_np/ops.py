"""Pure operators of the Qwen decoder, each a small function over float32 NumPy arrays (in the
low-memory mode, weight matrices arrive as bfloat16 bits, which `linear` and `embedding` widen).

Shape legend (used in every comment of the package):
    B batch, T new tokens, S cached + new positions, D hidden size, H query heads,
    K key/value heads, G = H // K query heads per key/value head, Dh head_dim,
    F intermediate size, E experts, k top-k, V vocab, N tokens (B * T flattened),
    C positions a KV cache has room for (its capacity, S of them filled).

Nothing here reads a config, a file or a global: every scalar is an argument. (The block sizes
below, BF16_ROWS, BF16_CACHED, DECODE_ROWS, FEW_ROWS, QUERY_BLOCK and SCORES_BYTES, choose how a
product is split up for speed or memory, and SHORT_ROW which weights the loader lays out by
columns; the result is the same up to float rounding.)
"""

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Basic layers


def embedding(input_ids, weight):  # [B, T] int, [V, D] -> [B, T, D]
    rows = weight[input_ids]
    return bf16_to_float32(rows) if rows.dtype == np.uint16 else rows


BF16_ROWS = 4096  # rows of a bf16 weight widened at once: 16 MB of float32 for a hidden size of 1024
BF16_CACHED = 2 ** 17  # but for up to DECODE_ROWS rows of x, floats widened at once: 512 KB
DECODE_ROWS = 16  # rows of x (a decode step of up to 16 prompts) for which a product only streams its weight
FEW_ROWS = 128  # up to this many rows (a short prompt, a chat turn's new tokens), (W @ x^T)^T


def linear(x, weight, bias=None):  # [..., in], [out, in], [out] or None -> [..., out]
    # y = x @ weight.T + bias, as torch's F.linear; the lines below are that product arranged for speed.
    # All rows go through one product: given a stack [B, T, in], NumPy would multiply it one
    # [T, in] matrix at a time and read the weight B times (a batch of 8 decoding: 2x slower).
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # [N, in], N = B * T (-1 fails for in = 0)
    if weight.dtype == np.uint16:  # bf16 bits (load(..., low_memory=True)): widened a block of rows at a time
        block = bf16_block_rows(len(rows), weight.shape[1])
        y = np.concatenate([times_transposed(rows, bf16_to_float32(weight[r:r + block]))
                            for r in range(0, max(weight.shape[0], 1), block)], axis=-1)  # one block if no rows
    else:
        y = times_transposed(rows, weight)
    y = y.reshape(*x.shape[:-1], weight.shape[0])  # [..., out]
    return y if bias is None else y + bias


def bf16_block_rows(x_rows, in_features):  # -> rows of a bf16 weight to widen at once
    # A prefill's product does many multiply-adds per weight, so big blocks keep BLAS busy. Decoding
    # does one or a few: the time goes to streaming the weight, and a block small enough to stay in
    # the core's cache between widening and product is read from memory once, not three times
    # (bits read, float32 written, float32 read back). Qwen3-0.6B shape: 3.8 against 2.7 tokens/s.
    if x_rows > DECODE_ROWS:
        return BF16_ROWS
    return max(1, BF16_CACHED // in_features)


SHORT_ROW = 1024  # floats: a weight's rows shorter than this stream faster laid out by columns (see column_major)


def column_major(shape):  # [out, in] -> whether a float32 weight of this shape is kept column-major
    # x @ W.T reads the weight as it lies in memory. Row by row (the checkpoint's order), each output
    # is a dot product along a row of `in` floats; column by column (Fortran order: to NumPy the
    # same [out, in] array), each input adds a multiple of a column of `out` floats to the output.
    # OpenBLAS streams long runs faster than short ones: for gate and up of rows of 576 or 896 (and
    # columns three times as long), 20-24 against 16-20 GB/s; from rows of 1024, 3-8% faster, not
    # worth the load's slower copy into columns. So a weight with more rows than columns, and rows
    # shorter than SHORT_ROW (gate, up and the LM head of SmolLM2 or Qwen2.5-0.5B), is kept by
    # columns: decoding took 0.85-0.89x the time.
    return len(shape) == 2 and shape[0] > shape[1] and shape[1] < SHORT_ROW


def times_transposed(rows, weight):  # [N, in], [out, in] -> [N, out]: rows @ weight.T
    # Weights keep the checkpoint's [out, in] shape, some laid out by columns (see column_major);
    # `weight.T` is a view, which BLAS reads in either layout as it lies.
    if 1 < len(rows) <= 3:
        # Two or three rows: a stack of one-row products, for which NumPy calls a matrix-vector
        # product each, reading the weight as it is. OpenBLAS's general product first copies the
        # weight into blocks of its own: slower for 2 and 3 rows, faster from 4 (Qwen3-0.6B shape,
        # a batch decoding 3 prompts: 12.4 against 11.6 tokens/s; 4 prompts: 13.4 against 15.8).
        return (rows[:, None] @ weight.T)[:, 0]  # [N, 1, in] @ [in, out] -> [N, 1, out] -> [N, out]
    if 1 < len(rows) <= FEW_ROWS and weight.flags.c_contiguous:
        # The same product written (weight @ rows^T)^T: for a few rows OpenBLAS runs this form
        # faster, with one thread or two (1.2-1.6x for 16-128 rows on the project's machine; no gain
        # from 256 rows on). The result is a transposed view, which NumPy reads like any other array.
        # A weight laid out by columns is faster as it is below (0.4-1.0x this form's time by rows).
        return (weight @ rows.T).T
    return rows @ weight.T


def bf16_to_float32(bits, out=None):  # [...] uint16 -> [...] float32, exact (written into `out` if given)
    # NumPy has no bfloat16: its 16 bits are kept as uint16. A bfloat16 is the top half of a
    # float32, so shifting the bits up 16 and reading them as float32 gives its exact value.
    wide = np.empty(bits.shape, np.uint32) if out is None else out.view(np.uint32)
    wide[...] = bits  # the 16 bits, low
    wide <<= 16  # moved high
    return wide.view(np.float32)


def rms_norm(x, weight, eps):  # [..., D], [D] -> [..., D]
    # Statistics in float32 (the reference upcasts here), then the learned per-channel scale.
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return weight * (x / np.sqrt(variance + eps))


@np.errstate(over="ignore")  # exp(-x) overflows to inf for x below -88: 1 / (1 + inf) is 0, the right limit
def sigmoid(x):  # [...] -> [...]
    return 1 / (1 + np.exp(-x))


@np.errstate(over="ignore")  # as in sigmoid: x / inf is 0 (-0.0)
def silu(x):  # [...] -> [...]
    # x * sigmoid(x), written as one division as torch's SiLU computes it: one pass fewer, and
    # accurate to float32 rounding even where SiLU is tiny (large negative x).
    return x / (1 + np.exp(-x))


def softmax(x, axis=-1, out=None):  # [..., S] -> [..., S], rows sum to one
    # exp(x - max) / sum, computed in one new buffer (or in `out`, which may be x itself).
    e = np.subtract(x, x.max(axis=axis, keepdims=True), out=out)  # subtracting the row max keeps exp() finite
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def mlp(x, gate_proj, up_proj, down_proj):  # [..., D], {weight: [F, D]} x2, {weight: [D, F]} -> [..., D]
    # SwiGLU: a SiLU-activated gate multiplies the up projection, then projects back down.
    return linear(silu(linear(x, **gate_proj)) * linear(x, **up_proj), **down_proj)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE): inverse frequencies for each rope type, then the rotation.
# Each `rope_*` function returns (inv_freq [Dh/2], attention_factor), like the reference's
# rope-init functions; attention_factor scales cos and sin (only YaRN sets it).


def rope_default(head_dim, theta):  # -> [Dh/2], 1.0
    # Pair i rotates with frequency theta ** (-2i / Dh); float32 like the reference.
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / theta**exponents).astype(np.float32), 1.0


def rope_linear(head_dim, theta, factor):  # -> [Dh/2], 1.0
    # Position interpolation: dividing the frequencies is dividing every position by `factor`.
    inv_freq, _ = rope_default(head_dim, theta)
    return inv_freq / np.float32(factor), 1.0


def rope_dynamic(head_dim, theta, factor, seq_len, max_position_embeddings):  # -> [Dh/2], 1.0
    # Dynamic NTK: past the trained length the base grows with the sequence, so the lowest
    # frequencies stretch while the highest stay as trained. seq_len is the largest position + 1.
    seq_len = max(seq_len, max_position_embeddings)
    growth = np.float32(factor * seq_len / max_position_embeddings - (factor - 1))
    base = np.float32(theta) * growth ** np.float32(head_dim / (head_dim - 2))
    return rope_default(head_dim, base)


def rope_yarn(head_dim, theta, factor, original_max_position_embeddings, beta_fast=None, beta_slow=None,
              attention_factor=None, mscale=None, mscale_all_dim=None, truncate=True):  # -> [Dh/2], float
    # YaRN: high-frequency pairs (many rotations within the trained length) keep their
    # frequency, low-frequency pairs are interpolated by `factor`, a linear ramp in between;
    # cos and sin are scaled by an attention factor that grows with log(factor).
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):  # the pair index that rotates `num_rotations` times
        return head_dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast or 32), correction_dim(beta_slow or 1)  # None or 0: the reference's 32, 1
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the pair keeps its trained frequency
    pos_freqs = theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # [Dh/2], 1 / the default inv_freq
    inv_freq = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), attention_factor


@np.errstate(divide="ignore", invalid="ignore")  # high_freq_factor == low_freq_factor: `smooth` unused
def rope_llama3(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                original_max_position_embeddings):  # -> [Dh/2], 1.0
    # Llama 3: long wavelengths are interpolated by `factor`, short ones kept, a smooth blend between.
    inv_freq, _ = rope_default(head_dim, theta)
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelen) & (wavelength <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def rope_cos_sin(positions, inv_freq, attention_factor=1.0):  # [B, T] int, [Dh/2] -> [B, T, Dh] x2
    positions = np.atleast_2d(positions)  # [T] positions: one sequence, [1, T]
    angles = positions[..., None].astype(np.float32) * inv_freq  # [B, T, Dh/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [B, T, Dh]: rotate-half layout, see below
    return np.cos(angles) * np.float32(attention_factor), np.sin(angles) * np.float32(attention_factor)


def rotate_half(x):  # [..., Dh] -> [..., Dh]
    # Hugging Face Qwen pairs dimension i with i + Dh/2 (the "rotate-half" layout), not 2i with
    # 2i+1 (the interleaved layout of the RoPE paper, and of llama.cpp's `llama` models); the two
    # differ by a fixed permutation of the q/k projection rows.
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):  # [B, H, T, Dh], [B, T, Dh], [B, T, Dh] -> [B, H, T, Dh]
    # Rotates each pair (x_i, x_{i+Dh/2}) by its angle: vector norms are unchanged (scaled by
    # attention_factor under YaRN, whose cos and sin carry it, as the reference's do).
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh], broadcast over heads
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# Attention


def repeat_kv(x, n_rep):  # [B, K, S, Dh] -> [B, K * n_rep, S, Dh]
    # Each key/value head serves n_rep consecutive query heads (repeat, not tile: head h uses
    # key/value head h // n_rep). `attention` below gets the same result without this copy.
    return np.repeat(x, n_rep, axis=1)


def causal_mask(num_new, num_total):  # -> [T, S] bool, True where attending is allowed
    # The T new tokens sit at the last T of S positions; query t sees positions up to its own.
    return np.tri(num_new, num_total, k=num_total - num_new, dtype=bool)


def sliding_window_mask(num_new, num_total, window):  # -> [T, S] bool
    # Causal, and only the `window` most recent positions including the query itself.
    query_pos = np.arange(num_total - num_new, num_total)[:, None]
    key_pos = np.arange(num_total)[None, :]
    return (key_pos <= query_pos) & (key_pos > query_pos - window)


QUERY_BLOCK = 256  # queries per step of `attention` at most: scores of [B, H, 256, S], not [B, H, T, S]
SCORES_BYTES = 2 ** 26  # and fewer where S is so long that those scores would take more than 64 MB


def attention(q, k, v, mask):  # [B, H, T, Dh], [B, K, S, Dh] x2, [B, 1, T, S] bool -> [B, H, T, Dh]
    B, H, T, Dh = q.shape
    K = k.shape[1]
    G = H // K
    # Grouped-query attention: the G query heads of a group share one key/value head, so the
    # queries are seen as [B, K, G, T, Dh] (see grouped_attention).
    q = q.reshape(B, K, G, T, Dh) * np.float32(Dh**-0.5)  # scaling q = scaling the scores
    out = np.empty_like(q)
    # Blocks of queries: the same result (up to float rounding) in a fraction of the memory. A block's
    # scores are [B, H, block, S] float32: 256 rows, fewer past 4096 keys (for 16 heads), so that
    # however long the context they stay within SCORES_BYTES.
    block = max(1, min(QUERY_BLOCK, SCORES_BYTES // (4 * B * H * k.shape[2])))
    for t in range(0, T, block):
        rows = slice(t, t + block)
        # Keys after the last one these queries may see are left out (their weights would be 0):
        # with the causal mask most of the masked upper triangle is never computed.
        seen = mask[:, 0, rows].any(axis=(0, 1))  # [S]: keys that some query of the block may see
        n_keys = np.flatnonzero(seen)[-1] + 1
        out[..., rows, :] = grouped_attention(q[..., rows, :], k[:, :, :n_keys], v[:, :, :n_keys],
                                              mask[:, :, rows, :n_keys])
    return out.reshape(B, H, T, Dh)


def grouped_attention(q, k, v, mask):  # [B, K, G, T, Dh] scaled, [B, K, S, Dh] x2, [B, 1, T, S] -> [B, K, G, T, Dh]
    # k[:, :, None] broadcasts each key/value head over its G query heads: the same as repeat_kv,
    # without the copy, and in decoding each query head's scores are one matrix-vector product.
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # [B, K, G, T, S]
    # Masked scores become -inf, in place; the mask always allows the query's own position,
    # so no row is left empty.
    np.copyto(scores, np.float32(-np.inf), where=~mask[:, :, None])
    probs = softmax(scores, out=scores)  # in place: our own array
    # Each query head's weighted sum of its group's values, like the scores above: in decoding
    # one matrix-vector product per query head over the position-minor values (see empty_cache).
    return probs @ v[:, :, None]  # [B, K, G, T, S] @ [B, K, 1, S, Dh] -> [B, K, G, T, Dh]


# ---------------------------------------------------------------------------------------------
# Mixture of experts


def moe_route(x, gate_weight, top_k, norm_topk_prob):  # [..., D], [E, D] -> [..., k] int, [..., k], [..., E]
    # Softmax over all experts in float32, keep the k largest; renormalise them only if asked.
    # (x is [N, D] in the model, [B, T, D] works too: every step is over the last axis.)
    logits = linear(x, gate_weight)  # [..., E]
    probs = softmax(logits)
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]  # [..., k], best first
    weights = np.take_along_axis(probs, experts, axis=-1)  # [..., k]
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights, logits


def moe_experts(x, experts, chosen, weights):  # [N, D], E x mlp params, [N, k] int, [N, k] -> [N, D]
    # Each expert runs only on the tokens routed to it; its output, scaled by the routing
    # weight, is added back at those tokens' rows. Experts nobody chose cost nothing.
    out = np.zeros_like(x)
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)  # a token picks an expert at most once
        out[tokens] += mlp(x[tokens], **experts[e]) * weights[tokens, slot, None]
    return out
