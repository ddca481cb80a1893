"""Each operator against the reference implementation's own function, and against properties."""

import math
import types
import warnings

import numpy as np
import pytest

from qwen_np import ops
from qwen_np.weights import float32_to_bf16

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def t(x):  # numpy -> torch
    import torch
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------------------------------
# Properties (no reference needed)


def test_softmax_rows_sum_to_one_and_survive_large_inputs():
    x = randn(3, 5, 7) * 1000
    p = ops.softmax(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert p.dtype == np.float32


def test_rms_norm_gives_unit_rms_with_unit_weight():
    y = ops.rms_norm(randn(4, 16) * 7 + 3, np.ones(16, np.float32), 1e-6)
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, -1)), 1.0, rtol=1e-5)


def test_rope_keeps_norms_and_depends_only_on_relative_position():
    inv_freq, _ = ops.rope_default(32, 10000.0)
    q, k = randn(1, 1, 1, 32), randn(1, 1, 1, 32)

    def rotated(x, pos):
        cos, sin = ops.rope_cos_sin(np.array([[pos]]), inv_freq)
        return ops.apply_rope(x, cos, sin)

    np.testing.assert_allclose(np.linalg.norm(rotated(q, 17)), np.linalg.norm(q), rtol=1e-5)
    score = lambda m, n: float((rotated(q, m) * rotated(k, n)).sum())
    np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and it does depend on the distance


def test_rope_cos_sin_takes_one_sequence_of_positions_as_a_batch_of_one():
    # [T] positions (np.arange(T)) are one sequence: otherwise apply_rope would broadcast cos over the
    # heads, and with as many heads as positions rotate head h by position h, silently.
    inv_freq, _ = ops.rope_default(8, 1e4)
    cos, sin = ops.rope_cos_sin(np.arange(4), inv_freq)
    assert cos.shape == sin.shape == (1, 4, 8)
    np.testing.assert_array_equal(cos, ops.rope_cos_sin(np.arange(4)[None], inv_freq)[0])


def test_moe_route_takes_tokens_in_any_leading_shape():
    # [B, T, D] hidden states route like their [B * T, D] rows (it sliced the wrong axis: all experts or an IndexError)
    x, gate = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    chosen, weights, logits = ops.moe_route(x, gate, 2, True)
    flat = ops.moe_route(x.reshape(6, 8), gate, 2, True)
    assert chosen.shape == weights.shape == (2, 3, 2) and logits.shape == (2, 3, 6)
    np.testing.assert_array_equal(chosen.reshape(6, 2), flat[0])
    np.testing.assert_allclose(weights.reshape(6, 2), flat[1], rtol=1e-6)


def test_masks():
    np.testing.assert_array_equal(ops.causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ops.sliding_window_mask(4, 4, 2),
                                  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize("order", ["C", "F"])  # a weight as the file stores it, or laid out by columns
def test_linear_is_x_times_w_transposed_for_any_number_of_rows(order):
    w, b = np.asarray(randn(48, 32), order=order), randn(48)
    assert ops.column_major(w.shape) and w.flags.c_contiguous == (order == "C")
    for shape in [(32,), (1, 32), (2, 32), (3, 1, 32), (2, 5, 32), (8, 1, 32), (4, 2, 3, 32), (1, ops.FEW_ROWS, 32),
                  (1, ops.FEW_ROWS + 1, 32), (300, 32)]:
        x = randn(*shape)
        # float64 products as the check: the float32 ones differ in rounding between BLAS calls
        np.testing.assert_allclose(ops.linear(x, w, b), x.astype(np.float64) @ w.T.astype(np.float64) + b,
                                   rtol=1e-5, atol=1e-5)
        assert ops.linear(x, w).dtype == np.float32


def test_a_few_rows_take_the_faster_form_for_the_weights_layout():
    # 4 to FEW_ROWS rows: (W @ x^T)^T, a transposed view, for a weight by rows; x @ W^T by columns.
    w, x = randn(48, 32), randn(16, 32)
    assert ops.times_transposed(x, w).flags.f_contiguous and not ops.times_transposed(x, w).flags.c_contiguous
    assert ops.times_transposed(x, np.asfortranarray(w)).flags.c_contiguous


@pytest.mark.parametrize("shape", [(2, 1, 32), (3, 32), (4, 32), (8, 1, 32), (4, 5, 32), (2, 3, 1, 32), (1, 300, 32)])
def test_linear_multiplies_every_row_of_a_batch_in_one_call(shape):
    # Decoding a batch of B sequences gives x [B, 1, in]. NumPy multiplies a stack one matrix at a
    # time, reading the weight B times; `linear` makes it one product of all the rows, 2-D on both
    # sides. (For 2 and 3 rows, by design, one stack of one-row products: a matrix-vector product each.)
    rows = math.prod(shape[:-1])
    products = []

    class Weight(np.ndarray):  # a weight that records the operands of every product it is in
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            arrays = [np.asarray(a) for a in inputs]
            products.append([a.shape for a in arrays])
            return getattr(ufunc, method)(*arrays, **kwargs)

    w, x = randn(48, 32), randn(*shape)
    y = ops.linear(x, w.view(Weight))
    assert type(y) is np.ndarray and y.shape == shape[:-1] + (48,)
    if rows <= 3:
        assert products == [[(rows, 1, 32), (32, 48)]]
    else:
        assert len(products) == 1 and [len(s) for s in products[0]] == [2, 2], products
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])  # decoding's cache-sized blocks up to 16, BF16_ROWS beyond
def test_linear_widens_bf16_weights_a_block_at_a_time(rows, monkeypatch):
    monkeypatch.setattr(ops, "BF16_ROWS", 20)  # blocks that divide neither 48 rows...
    monkeypatch.setattr(ops, "BF16_CACHED", 7 * 32)  # ...nor, at 7 rows of 32 floats, these
    assert ops.bf16_block_rows(rows, 32) == (7 if rows <= 16 else 20)
    bits = float32_to_bf16(randn(48, 32))  # bfloat16 bits, as low_memory keeps them
    w, b, x = ops.bf16_to_float32(bits), randn(48), randn(1, rows, 32)
    y = ops.linear(x, bits, b)
    assert y.shape == (1, rows, 48) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + b, rtol=1e-5, atol=1e-5)


def test_sigmoid_and_silu_do_not_overflow():
    x = np.array([-1000.0, 0.0, 1000.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp(1000) overflows to inf: the right limit, and no warning
        np.testing.assert_allclose(ops.sigmoid(x), [0, 0.5, 1])
        np.testing.assert_allclose(ops.silu(x), [0, 0, 1000])


def test_attention_without_repeat_equals_attention_with_repeat_kv():
    q, k, v = randn(2, 6, 5, 8), randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    mask = ops.causal_mask(5, 5)[None, None]
    grouped = ops.attention(q, k, v, mask)
    repeated = ops.attention(q, ops.repeat_kv(k, 3), ops.repeat_kv(v, 3), mask)  # plain multi-head
    np.testing.assert_allclose(grouped, repeated, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against transformers' own functions


def test_rms_norm_matches_reference(reference):
    torch, transformers = reference
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    x, w = randn(2, 5, 16) * 3, randn(16)
    norm = Qwen2RMSNorm(16, eps=1e-6)
    norm.weight.data = t(w)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6), norm(t(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_apply_rope_and_rotate_half_match_reference(reference):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, rotate_half
    q, k = randn(2, 4, 6, 16), randn(2, 2, 6, 16)
    positions = np.stack([np.arange(6), np.arange(3, 9)])
    cos, sin = ops.rope_cos_sin(positions, ops.rope_default(16, 10000.0)[0])
    q_ref, k_ref = apply_rotary_pos_emb(t(q), t(k), t(cos), t(sin))
    np.testing.assert_allclose(ops.apply_rope(q, cos, sin), q_ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.apply_rope(k, cos, sin), k_ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ops.rotate_half(q), rotate_half(t(q)).numpy())


def test_repeat_kv_matches_reference(reference):
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv
    x = randn(2, 3, 5, 4)
    np.testing.assert_array_equal(ops.repeat_kv(x, 4), repeat_kv(t(x), 4).numpy())


def test_attention_matches_reference_eager_attention(reference):
    torch, _ = reference
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward
    q, k, v = randn(2, 6, 5, 8), randn(2, 2, 7, 8), randn(2, 2, 7, 8)
    mask = ops.causal_mask(5, 7)[None, None]
    additive = torch.where(t(mask), 0.0, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(num_key_value_groups=3, training=False)
    ref, _ = eager_attention_forward(module, t(q), t(k), t(v), additive, scaling=8**-0.5)
    np.testing.assert_allclose(ops.attention(q, k, v, mask), ref.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


def test_sigmoid_and_silu_match_reference_in_relative_terms(reference):
    torch, _ = reference
    # Down to x = -100, where both are tiny (0 below about -88.7): a form such as
    # 0.5 * (1 + tanh(x / 2)) is as close in absolute terms, but off by up to 13x in relative ones.
    x = np.linspace(-100, 30, 100_001, dtype=np.float32)
    np.testing.assert_allclose(ops.sigmoid(x), torch.sigmoid(t(x)).numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ops.silu(x), torch.nn.functional.silu(t(x)).numpy(), rtol=1e-6, atol=0)


def test_mlp_matches_reference(reference):
    torch, transformers = reference
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    cfg = transformers.Qwen2Config(hidden_size=16, intermediate_size=24)
    ref = Qwen2MLP(cfg)
    p = {name: {"weight": getattr(ref, name).weight.detach().numpy()} for name in ("gate_proj", "up_proj", "down_proj")}
    x = randn(3, 16)
    np.testing.assert_allclose(ops.mlp(x, **p), ref(t(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


ROPE_CASES = {
    "default": ({}, {}),
    "linear": ({"factor": 4.0}, {}),
    "dynamic": ({"factor": 2.0}, {"seq_len": 300}),  # beyond max_position_embeddings: the base grows
    "yarn": ({"factor": 4.0, "original_max_position_embeddings": 64}, {}),
    # a factor of 1: YaRN that stretches nothing, and whose attention factor is 1 too
    "yarn_factor_1": ({"factor": 1.0, "original_max_position_embeddings": 64}, {}),
    "yarn_mscale": ({"factor": 8.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                     "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2}, {}),
    # theta 10: the fast end of the correction range falls below 0, where the reference clamps it,
    # and the slow end passes Dh/2
    "yarn_low_theta": ({"factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10.0}, {}),
    # and with an original length of 1024 the slow end passes Dh - 1 (36 of 32), clamped there
    "yarn_low_theta_long": ({"factor": 4.0, "original_max_position_embeddings": 1024, "rope_theta": 10.0}, {}),
    # equal betas, not truncated: the range is empty, and its ramp must not divide by zero
    "yarn_equal_betas": ({"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 2.0,
                          "beta_slow": 2.0, "truncate": False}, {}),
    "llama3": ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, {}),
    # equal factors: no wavelength is in between (the reference warns of it, and runs it)
    "llama3_equal_factors": ({"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                              "original_max_position_embeddings": 64}, {}),
}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no division by zero shown to the user either
def test_rope_init_functions_match_reference(reference, case):
    torch, transformers = reference
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from qwen_np.config import config_from_dict
    from qwen_np.model import rope_frequencies
    extra, call = ROPE_CASES[case]
    rope_type = case.split("_")[0]
    rope = {"rope_type": rope_type, "rope_theta": 1e6, **extra}
    hf = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=128,
                                  rope_parameters=dict(rope))
    raw = dict(model_type="qwen3", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=128,
               rope_parameters=dict(rope))
    ours = rope_frequencies(config_from_dict(raw), call.get("seq_len", 1))
    if rope_type == "default":
        ref = type(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
            head_dim=32, rope_parameters=dict(rope))).model.rotary_emb).compute_default_rope_parameters(hf)
    else:
        ref = ROPE_INIT_FUNCTIONS[rope_type](hf, None, **({"seq_len": call["seq_len"]} if call else {}))
    np.testing.assert_allclose(ours[0], ref[0].numpy(), rtol=1e-6)
    assert ours[0].dtype == np.float32
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-7)
    if rope_type != "default" and extra["factor"] != 1.0:
        assert not np.allclose(ours[0], ops.rope_default(32, 1e6)[0])  # the scaling did something


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_masks_match_reference_mask_functions(reference, window):
    from transformers import masking_utils as mu
    T, S = 4, 9  # 4 new tokens after 5 cached ones
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    import torch
    q_idx, kv_idx = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    ref = fn(torch.tensor(0), torch.tensor(0), q_idx, kv_idx).numpy()
    ours = ops.causal_mask(T, S) if window is None else ops.sliding_window_mask(T, S, window)
    np.testing.assert_array_equal(ours, ref)


def test_embedding_matches_reference(reference):
    torch, _ = reference
    weight, ids = randn(10, 4), rng.integers(0, 10, (2, 3))
    np.testing.assert_array_equal(ops.embedding(ids, weight),
                                  torch.nn.functional.embedding(torch.as_tensor(ids), t(weight)).numpy())
