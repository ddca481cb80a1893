"""The whole dense model (Qwen2 / Qwen2.5 / Qwen3) against transformers, through our own loader,
and the loader's errors on bad input."""

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import struct
import types

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen_np
from conftest import require_reference
from qwen_np import hub_cache, hub_cache_model
from qwen_np.config import config_from_dict, read_json
from qwen_np.model import empty_cache
from qwen_np.ops import bf16_to_float32
from qwen_np.weights import expected_shapes, flatten, float32_to_bf16, nest, read_safetensors_header, read_tensor
from tiny import drop_tensor, edit_config, reference_logits, tiny_model, write_older_config

rng = np.random.default_rng(0)
TOL = dict(rtol=1e-4, atol=1e-4)


def ids(batch, length, vocab=128):
    return rng.integers(0, vocab, (batch, length))


def compare(family, tmp_path, length=24, batch=2, **overrides):
    """Builds, saves, reloads; returns (ours, reference) logits for a random batch."""
    ref = tiny_model(family, tmp_path, **overrides)
    model = qwen_np.load(tmp_path)
    x = ids(batch, length)
    ours, _ = qwen_np.forward(model.params, model.config, x)
    expected = reference_logits(ref, x)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, **TOL)
    return ours, expected


def test_qwen2_with_biases_untied(tmp_path):
    compare("qwen2", tmp_path, tie_word_embeddings=False)
    names = read_safetensors_header(tmp_path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in names and "lm_head.weight" in names


def test_qwen2_tied_embeddings_share_one_array(tmp_path):
    compare("qwen2", tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in read_safetensors_header(tmp_path / "model.safetensors")
    params = qwen_np.load(tmp_path).params
    assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]


@pytest.mark.parametrize("head", ["different", "different in its first bit", "different in its last row", "equal",
                                  "alone"])
def test_tied_config_with_an_lm_head_in_the_checkpoint_loads_as_transformers_loads_it(tmp_path, monkeypatch, head):
    # tie_word_embeddings true, and yet lm_head.weight in the file (some tied checkpoints store a copy):
    # transformers ties only equal matrices, and a head without embeddings serves as both.
    torch, transformers = require_reference()
    tiny_model("qwen3", tmp_path, tie_word_embeddings=False)
    tensors = load_file(tmp_path / "model.safetensors")
    if head == "equal":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    elif head == "alone":
        del tensors["model.embed_tokens.weight"]
    elif head == "different in its first bit":  # the file's first byte: compared exactly, as transformers does
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        tensors["lm_head.weight"].view(np.uint32)[0, 0] ^= 1
    elif head == "different in its last row":  # compared in chunks, as real embeddings are: past the first one
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        tensors["lm_head.weight"][-1] += 1.0
        monkeypatch.setattr(qwen_np.weights, "CHUNK", 1024)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    edit_config(tmp_path, tie_word_embeddings=True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = qwen_np.load(tmp_path)
    x = ids(2, 12)
    np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(reference, x), **TOL)
    shared = model.params["lm_head"]["weight"] is model.params["model"]["embed_tokens"]["weight"]
    assert shared == (head in ("equal", "alone"))


def test_llama_with_attention_and_mlp_biases(tmp_path):
    compare("llama", tmp_path, attention_bias=True, mlp_bias=True)  # tiny_model makes the biases nonzero
    layer = qwen_np.load(tmp_path).params["model"]["layers"][0]
    assert "bias" in layer["self_attn"]["o_proj"] and "bias" in layer["mlp"]["down_proj"]


def test_qwen3_q_k_norm_and_explicit_head_dim(tmp_path):
    compare("qwen3", tmp_path, head_dim=24)  # hidden 64 / 4 heads would be 16
    config = qwen_np.load(tmp_path).config
    assert config.head_dim == 24 and config.hidden_size // config.num_attention_heads == 16


def test_sliding_window_with_max_window_layers(tmp_path):
    overrides = dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    ours, _ = compare("qwen2", tmp_path / "sliding", length=30, **overrides)
    config = qwen_np.load(tmp_path / "sliding").config
    assert config.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    # The window matters: the same weights without it give other logits.
    full, _ = compare("qwen2", tmp_path / "full", length=30, num_hidden_layers=4)
    assert not np.allclose(ours, full, atol=1e-3)


def test_explicit_layer_types(tmp_path):
    types_ = ["sliding_attention", "full_attention", "sliding_attention"]
    compare("qwen3", tmp_path, length=20, use_sliding_window=True, sliding_window=5, layer_types=types_)
    assert qwen_np.load(tmp_path).config.layer_types == tuple(types_)


def test_llama_has_no_sliding_window_whatever_config_json_says(tmp_path):
    # transformers' Llama has no window: these keys, which a converted config.json may carry, are ignored there.
    overrides = dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                     layer_types=["sliding_attention"] * 3)
    compare("llama", tmp_path, length=20, **overrides)
    assert read_json(tmp_path / "config.json")["layer_types"] == overrides["layer_types"]
    config = qwen_np.load(tmp_path).config
    assert config.sliding_window is None and set(config.layer_types) == {"full_attention"}


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},  # 64 / 16
])
def test_rope_scaling_past_the_original_length(tmp_path, rope):
    # dynamic NTK changes the frequencies only past max_position_embeddings: make that short too.
    max_pos = 16 if rope["rope_type"] == "dynamic" else 64
    ours, _ = compare("qwen2", tmp_path, length=40, max_position_embeddings=max_pos,
                      rope_parameters={"rope_theta": 10000.0, **rope})
    assert qwen_np.load(tmp_path).config.rope_parameters["rope_type"] == rope["rope_type"]


def test_bf16_checkpoint_in_shards(tmp_path):
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    compare("qwen2", tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert {info[0] for s in shards for info in read_safetensors_header(tmp_path / s).values()} == {"BF16"}


def memory_of(a):  # -> the buffer at the bottom of array a's chain of bases (a memoryview of what holds it)
    while isinstance(a, np.ndarray):
        a = a.base
    return a


def test_mmap_load_maps_float32_tensors_and_gives_the_same_logits(tmp_path):
    reference = tiny_model("qwen3", tmp_path / "f32", tie_word_embeddings=False)
    mapped = qwen_np.load(tmp_path / "f32", mmap=True)
    weight = mapped.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    files = sorted((tmp_path / "f32").glob("*.safetensors"))
    assert len(memory_of(weight)) == sum(f.stat().st_size for f in files)  # a view of the whole mapped file
    x = ids(2, 20)
    np.testing.assert_allclose(qwen_np.forward(mapped.params, mapped.config, x)[0],
                               reference_logits(reference, x), **TOL)
    # Copy-on-write: a weight edited in place (as a notebook may) is this process's own; the file
    # and the next load keep the checkpoint's values.
    before = [f.read_bytes() for f in files]
    original = weight.copy()
    weight[:] = 0
    assert not weight.any() and [f.read_bytes() for f in files] == before
    again = qwen_np.load(tmp_path / "f32", mmap=True).params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    np.testing.assert_array_equal(again, original)
    # A bf16 checkpoint has nothing to map as float32: it is widened into memory as usual.
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    tiny_model("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    widened = qwen_np.load(tmp_path / "bf16", mmap=True).params["model"]["embed_tokens"]["weight"]
    assert widened.dtype == np.float32 and widened.flags.writeable


def test_load_params_defaults_to_float32_read_into_memory(checkpoint):
    # As load's defaults: neither a view of the mapped file (mmap) nor bfloat16 bits (low_memory)
    config = qwen_np.load(checkpoint).config
    weight = qwen_np.load_params(checkpoint, config)["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert weight.dtype == np.float32 and len(memory_of(weight)) == weight.nbytes  # its own memory, not the file


def test_a_file_that_cannot_be_mapped_is_named(tmp_path, monkeypatch):
    # Linux refuses a copy-on-write map of the file where overcommit is strict (ENOMEM).
    tiny_model("qwen3", tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(qwen_np.weights, "memory_map", refuse)
    with pytest.raises(qwen_np.QwenNPError, match=r"cannot map .*model\.safetensors into memory: Cannot allocate"):
        qwen_np.load(tmp_path, mmap=True)


def test_low_memory_keeps_bf16_matrices_and_gives_the_default_logits(tmp_path, monkeypatch):
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    tiny_model("qwen2", tmp_path, dtype=torch.bfloat16, tie_word_embeddings=False, max_shard_size="40KB")
    default, low = qwen_np.load(tmp_path), qwen_np.load(tmp_path, low_memory=True)
    layer = low.params["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["weight"].dtype == np.uint16  # bf16 bits as stored
    assert low.params["lm_head"]["weight"].dtype == low.params["model"]["embed_tokens"]["weight"].dtype == np.uint16
    assert layer["self_attn"]["q_proj"]["bias"].dtype == layer["input_layernorm"]["weight"].dtype == np.float32
    x = ids(2, 20)
    # Widening bf16 is exact, so the results are those of the default's weights laid out by rows, to
    # the last bit (each weight here is widened in one block). The default lays its tall matrices out
    # by columns (ops.column_major), multiplied in another order: the same up to rounding.
    by_rows = nest({name: np.ascontiguousarray(w) for name, w in flatten(default.params).items()})
    (low_logits, low_cache), (logits, cache) = (qwen_np.forward(m.params, m.config, x, empty_cache(m.config, 2, 21))
                                                for m in (low, default))
    np.testing.assert_array_equal(low_logits, qwen_np.forward(by_rows, default.config, x)[0])
    np.testing.assert_allclose(low_logits, logits, rtol=1e-5, atol=1e-6)
    assert not default.params["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].flags.c_contiguous
    # A decode step widens blocks of BF16_CACHED floats, here 5 rows: the same up to rounding.
    monkeypatch.setattr(qwen_np.ops, "BF16_CACHED", 5 * low.config.hidden_size)
    step = ids(2, 1)
    np.testing.assert_allclose(qwen_np.forward(low.params, low.config, step, low_cache)[0],
                               qwen_np.forward(default.params, default.config, step, cache)[0], rtol=1e-5, atol=1e-6)


def test_low_memory_rounds_float32_weights_to_bf16_as_torch_does(tmp_path, monkeypatch):
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    monkeypatch.setattr(qwen_np.ops, "BF16_ROWS", 48)  # the LM head (vocab 128) in three blocks
    reference = tiny_model("qwen3", tmp_path)
    low = qwen_np.load(tmp_path, low_memory=True)
    with torch.no_grad():  # the reference with every matrix rounded to bfloat16, vectors as they are
        for p in reference.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.bfloat16).float())
    x = ids(2, 20)
    np.testing.assert_allclose(qwen_np.forward(low.params, low.config, x)[0], reference_logits(reference, x), **TOL)
    # With mmap=True as well, the float32 file is not mapped: its matrices are rounded all the same.
    both = qwen_np.load(tmp_path, mmap=True, low_memory=True)
    assert both.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].dtype == np.uint16
    np.testing.assert_array_equal(qwen_np.forward(both.params, both.config, x)[0],
                                  qwen_np.forward(low.params, low.config, x)[0])


def test_float32_to_bf16_rounds_to_nearest_even():
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    from qwen_np.ops import bf16_to_float32
    from qwen_np.weights import float32_to_bf16
    values = np.concatenate([rng.standard_normal(10000).astype(np.float32),
                             # halfway between two bfloat16 values: ties go to the even one
                             np.array([0x3F808000, 0x3F818000, 0xBF808000], np.uint32).view(np.float32)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16(values), expected)
    np.testing.assert_array_equal(bf16_to_float32(expected), torch.from_numpy(values).to(torch.bfloat16).float())
    # NaNs stay NaNs, whatever their low bits (rounding alone would carry some into -0.0 or +0.0).
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFF8FFFFF], np.uint32).view(np.float32)
    assert np.isnan(bf16_to_float32(float32_to_bf16(nans))).all()
    assert np.isnan(torch.from_numpy(nans).to(torch.bfloat16).float().numpy()).all()  # as in torch


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_a_large_rms_norm_eps_reaches_every_norm(tmp_path, family):
    # The tiny models keep the default eps, at which a norm given another eps would hardly differ.
    compare(family, tmp_path, rms_norm_eps=0.3)
    assert qwen_np.load(tmp_path).config.rms_norm_eps == pytest.approx(0.3)


def test_fp16_checkpoint(tmp_path):
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    compare("qwen3", tmp_path, dtype=torch.float16)


def test_bf16_widening_is_exact(tmp_path):
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    values = torch.randn(1000).to(torch.bfloat16)
    from qwen_np.weights import read_tensor
    path = tmp_path / "x.safetensors"
    from safetensors.torch import save_file as save_torch
    save_torch({"x": values}, path)
    dtype, shape, offset, nbytes = read_safetensors_header(path)["x"]
    np.testing.assert_array_equal(read_tensor(path, "x", dtype, shape, offset, nbytes), values.float().numpy())


def test_left_padded_batch_matches_reference_with_positions(tmp_path):
    torch, _ = require_reference()
    ref = tiny_model("qwen2", tmp_path)
    model = qwen_np.load(tmp_path)
    x = ids(2, 12)
    mask = np.ones((2, 12), int)
    mask[1, :5] = 0  # the second prompt is 7 tokens, left-padded
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    ours, _ = qwen_np.forward(model.params, model.config, x, attention_mask=mask)
    expected = reference_logits(ref, x, attention_mask=torch.as_tensor(mask),
                                position_ids=torch.as_tensor(positions))
    np.testing.assert_allclose(ours[mask == 1], expected[mask == 1], **TOL)
    # and the padded row equals that prompt alone
    alone, _ = qwen_np.forward(model.params, model.config, x[1:, 5:])
    np.testing.assert_allclose(ours[1, 5:], alone[0], **TOL)


def test_old_config_format_reads_the_same(tmp_path):
    """Older config.json: rope_theta and rope_scaling at the top level, torch_dtype."""
    ref = tiny_model("qwen2", tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16,
                                                         "rope_theta": 5000.0})
    write_older_config(tmp_path)
    edit_config(tmp_path, some_future_key={"ignored": True})
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert "rope_parameters" not in raw and raw["torch_dtype"] == "float32"
    model = qwen_np.load(tmp_path)
    assert model.config.rope_parameters["rope_theta"] == 5000.0 and model.config.dtype == "float32"
    x = ids(1, 30)
    np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(ref, x), **TOL)


SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)


def transformers_config(transformers, class_name, raw):  # -> transformers' config of the config.json dict `raw`
    return getattr(transformers, class_name)(**{k: v for k, v in raw.items() if k != "model_type"})


DEFAULTS_CASES = {  # name -> (transformers config class, config.json with a key absent, null or unusual)
    "qwen2, no num_key_value_heads": ("Qwen2Config", dict(model_type="qwen2", num_attention_heads=32)),  # 32
    "qwen3, null num_key_value_heads": ("Qwen3Config", dict(model_type="qwen3", num_key_value_heads=None)),
    "qwen2_moe, no num_key_value_heads": ("Qwen2MoeConfig", dict(model_type="qwen2_moe", num_attention_heads=16,
                                                                  num_experts=4, num_experts_per_tok=2,
                                                                  moe_intermediate_size=32)),  # 16
    "qwen3_moe, no num_key_value_heads": ("Qwen3MoeConfig", dict(model_type="qwen3_moe", num_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=32)),
    "llama, no num_key_value_heads": ("LlamaConfig", dict(model_type="llama")),
    "qwen3, sliding on, window null": ("Qwen3Config", dict(model_type="qwen3", num_key_value_heads=2,
                                                           use_sliding_window=True, sliding_window=None,
                                                           max_window_layers=2)),
    "qwen2, sliding on, no window": ("Qwen2Config", dict(model_type="qwen2", num_key_value_heads=2,
                                                         use_sliding_window=True, max_window_layers=2)),
    "qwen3_moe, sliding on, window null": ("Qwen3MoeConfig", dict(model_type="qwen3_moe", num_experts=4,
                                                                   num_experts_per_tok=2, moe_intermediate_size=32,
                                                                   use_sliding_window=True, sliding_window=None)),
}


@pytest.mark.parametrize("case", DEFAULTS_CASES)
def test_keys_left_out_or_null_take_the_reference_values(reference, case):
    """Hand-written config.json files leave keys out that save_pretrained always writes."""
    _, transformers = reference
    class_name, raw = DEFAULTS_CASES[case]
    raw = {**SIZES, **raw}
    ours = config_from_dict(raw)
    theirs = transformers_config(transformers, class_name, raw)
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.sliding_window == (getattr(theirs, "sliding_window", None) or None)  # Qwen2-MoE says 0 for none
    # Qwen3-MoE has no layer_types: every layer is windowed when sliding_window is set.
    expected = getattr(theirs, "layer_types", None) or [
        "full_attention" if getattr(theirs, "sliding_window", None) is None else "sliding_attention"] * 4
    assert ours.layer_types == tuple(expected)


OTHER_DEFAULTS_CASES = {  # name -> (transformers config class, config.json without the keys checked below)
    "llama": ("LlamaConfig", dict(model_type="llama", num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(model_type="qwen2", num_key_value_heads=2, use_sliding_window=True)),
    "qwen3": ("Qwen3Config", dict(model_type="qwen3", num_key_value_heads=2, use_sliding_window=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(model_type="qwen2_moe", num_attention_heads=16, num_experts=4,
                                          num_experts_per_tok=4, moe_intermediate_size=32, use_sliding_window=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(model_type="qwen3_moe", num_attention_heads=8, num_experts=4,
                                          num_experts_per_tok=4, moe_intermediate_size=32)),
}


@pytest.mark.parametrize("case", OTHER_DEFAULTS_CASES)
def test_the_other_keys_left_out_take_the_reference_values(reference, case):
    # head_dim, rms_norm_eps, tie_word_embeddings, norm_topk_prob, the q/k/v bias, max_window_layers
    # (30 layers: past its default, 28); top-k may equal the number of experts, as in the reference.
    _, transformers = reference
    class_name, raw = OTHER_DEFAULTS_CASES[case]
    raw = {**SIZES, "num_hidden_layers": 30, **raw}
    ours = config_from_dict(raw)
    theirs = transformers_config(transformers, class_name, raw)
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.norm_topk_prob == getattr(theirs, "norm_topk_prob", False)
    assert ours.num_experts_per_tok == getattr(theirs, "num_experts_per_tok", 0)
    assert ours.attention_bias == getattr(theirs, "qkv_bias", getattr(theirs, "attention_bias", True))
    if hasattr(theirs, "layer_types"):
        assert ours.layer_types == tuple(theirs.layer_types)
    # mlp_bias is Llama's key only: Qwen's MLPs have no biases, whatever config.json says
    assert config_from_dict({**raw, "mlp_bias": True}).mlp_bias == (case == "llama")


@pytest.mark.parametrize("class_name, raw", [
    ("LlamaConfig", dict(model_type="llama")), ("Qwen2Config", dict(model_type="qwen2")),
    ("Qwen3Config", dict(model_type="qwen3")), ("Qwen2MoeConfig", dict(model_type="qwen2_moe")),
    ("Qwen3MoeConfig", dict(model_type="qwen3_moe"))])
def test_sizes_left_out_take_the_reference_defaults(reference, class_name, raw):
    # max_position_embeddings (Llama's is 2048, the Qwen families' 32768) and the MoE sizes
    _, transformers = reference
    raw = {**SIZES, "num_key_value_heads": 2, **raw}
    ours = config_from_dict(raw)
    theirs = transformers_config(transformers, class_name, raw)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]  # no rope_theta given
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        assert getattr(ours, key) == getattr(theirs, key, 0)
    # and the special ids (Llama's bos 1 and eos 2; the Qwen families' none), left out or null
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, key) == getattr(theirs, key)
        null = {**raw, key: None}
        assert getattr(config_from_dict(null), key) is None
        assert getattr(transformers_config(transformers, class_name, null), key) is None


@pytest.mark.parametrize("changes", [
    # both formats of RoPE scaling in one config.json: transformers reads rope_scaling
    dict(rope_scaling={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
    # original_max_position_embeddings at the top level and in the RoPE dict: the top level's
    dict(original_max_position_embeddings=32)])
def test_rope_keys_given_twice_read_as_transformers_reads_them(tmp_path, changes):
    torch, transformers = require_reference()
    tiny_model("qwen2", tmp_path, max_position_embeddings=256,
               rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                "original_max_position_embeddings": 64})
    edit_config(tmp_path, **changes)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = qwen_np.load(tmp_path)
    for key in ("factor", "original_max_position_embeddings"):
        assert model.config.rope_parameters[key] == reference.config.rope_parameters[key]
    x = ids(1, 40)
    np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(reference, x), **TOL)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "rope_theta": 5e5}])
def test_llama_without_max_position_embeddings_scales_rope_from_2048(tmp_path, rope):
    # yarn's and llama3's original length defaults to max_position_embeddings, which defaults to 2048 for Llama
    _, transformers = require_reference()
    tiny_model("llama", tmp_path)
    edit_config(tmp_path, max_position_embeddings=None, rope_parameters=rope)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = qwen_np.load(tmp_path)
    assert model.config.rope_parameters["original_max_position_embeddings"] == 2048
    x = ids(1, 40)
    np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(reference, x), **TOL)


def test_swish_is_silu(tmp_path):
    compare("qwen3", tmp_path, hidden_act="swish")  # the reference's name for the same activation


PUBLISHED = {  # config.json of released checkpoints, as published (the keys qwen_np or the reference read)
    "Qwen2.5-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], bos_token_id=151643, eos_token_id=151645, hidden_act="silu",
        hidden_size=896, intermediate_size=4864, max_position_embeddings=32768, max_window_layers=21,
        model_type="qwen2", num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-06,
        rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True, torch_dtype="bfloat16",
        use_sliding_window=False, vocab_size=151936),
    "Qwen1.5-MoE-A2.7B-Chat": dict(
        architectures=["Qwen2MoeForCausalLM"], bos_token_id=151643, eos_token_id=151645, decoder_sparse_step=1,
        hidden_size=2048, intermediate_size=5632, max_position_embeddings=32768, max_window_layers=21,
        model_type="qwen2_moe", moe_intermediate_size=1408, norm_topk_prob=False, num_attention_heads=16,
        num_experts=60, num_experts_per_tok=4, num_hidden_layers=24, num_key_value_heads=16, rms_norm_eps=1e-06,
        rope_theta=1000000.0, shared_expert_intermediate_size=5632, sliding_window=32768, tie_word_embeddings=False,
        torch_dtype="float16", use_sliding_window=False, vocab_size=151936),
    "Qwen3-8B with the model card's YaRN": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, bos_token_id=151643, eos_token_id=151645,
        head_dim=128, hidden_size=4096, intermediate_size=12288, max_position_embeddings=40960, max_window_layers=36,
        model_type="qwen3", num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, rms_norm_eps=1e-06,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        rope_theta=1000000, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
        use_sliding_window=False, vocab_size=151936),
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"], attention_bias=False, bos_token_id=151643, decoder_sparse_step=1,
        eos_token_id=151645, head_dim=128, hidden_size=2048, intermediate_size=6144, max_position_embeddings=40960,
        max_window_layers=48, mlp_only_layers=[], model_type="qwen3_moe", moe_intermediate_size=768,
        norm_topk_prob=True, num_attention_heads=32, num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
        num_key_value_heads=4, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_sliding_window=False, vocab_size=151936),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_read_as_the_reference_reads_them(reference, name):
    _, transformers = reference
    raw = PUBLISHED[name]
    ours = config_from_dict(raw)
    theirs = transformers.AutoConfig.for_model(**raw)
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    assert ours.sliding_window is None and set(ours.layer_types) == {"full_attention"}
    assert ours.rope_parameters["rope_type"] == theirs.rope_parameters["rope_type"]
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings and ours.dtype == raw["torch_dtype"]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama"])
def test_keys_left_out_take_the_references_defaults(reference, model_type):
    # Only the required keys: every other value is the family's default (64 heads, which every
    # family's default number of key/value heads divides)
    _, transformers = reference
    raw = dict(model_type=model_type, vocab_size=100, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=64)
    ours, theirs = config_from_dict(raw), transformers.AutoConfig.for_model(**raw)
    names = ["num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
             "eos_token_id", "pad_token_id", "rope_parameters"]
    if model_type.endswith("_moe"):
        names += ["num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step"]
        assert ours.num_experts == getattr(theirs, "num_experts", getattr(theirs, "num_local_experts", None))
        assert ours.mlp_only_layers == tuple(theirs.mlp_only_layers)
    assert {name: getattr(ours, name) for name in names} == {name: getattr(theirs, name) for name in names}
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)


def test_qwen2_moe_shared_expert_size_defaults_as_the_reference():
    raw = dict(SIZES, model_type="qwen2_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32)
    assert config_from_dict(raw).shared_expert_intermediate_size == 5632  # Qwen2MoeConfig's default
    assert expected_shapes(config_from_dict(raw))["model.layers.0.mlp.shared_expert.up_proj.weight"] == (5632, 64)


def test_qwen2_always_has_q_k_v_biases():
    config = config_from_dict(dict(SIZES, model_type="qwen2", num_key_value_heads=2, qkv_bias=False,
                                   attention_bias=False))
    assert "model.layers.0.self_attn.q_proj.bias" in expected_shapes(config)  # Qwen2Attention: bias=True


def test_forward_with_cache_continues_where_prefill_stopped(tmp_path):
    model = qwen_np.load(tiny_model("qwen2", tmp_path) and tmp_path)
    x = ids(2, 10)
    full, _ = qwen_np.forward(model.params, model.config, x)
    last, _ = qwen_np.forward(model.params, model.config, x, last_only=True)  # the LM head of the last position
    assert last.shape == (2, 1, model.config.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], **TOL)
    _, cache = qwen_np.forward(model.params, model.config, x[:, :6])
    for i in range(6, 10):
        step, cache = qwen_np.forward(model.params, model.config, x[:, i:i + 1], cache=cache)
        np.testing.assert_allclose(step[:, 0], full[:, i], **TOL)
    assert cache.length == 10


# ---------------------------------------------------------------------------------------------
# Bad input: one clear QwenNPError naming the problem


@pytest.fixture
def checkpoint(tmp_path):
    tiny_model("qwen2", tmp_path, tie_word_embeddings=False)
    return tmp_path


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(qwen_np.QwenNPError, match="does not exist"):
        qwen_np.load(tmp_path / "nope")
    with pytest.raises(qwen_np.QwenNPError, match="no config.json"):
        qwen_np.load(tmp_path)
    (tmp_path / "config.json").mkdir()
    with pytest.raises(qwen_np.QwenNPError, match=r"no config.json found: \S+config.json is not a file"):
        qwen_np.load(tmp_path)


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.mkdir(), "Is a directory"),
    (lambda f: f.symlink_to(f.parent / "gone"), "No such file or directory"),
    (lambda f: f.symlink_to(f), "Too many levels of symbolic links"),
])
def test_a_weights_file_that_cannot_be_read_is_named(checkpoint, damage, problem):
    weights = checkpoint / "model.safetensors"
    weights.unlink()
    damage(weights)
    with pytest.raises(qwen_np.QwenNPError, match=rf"cannot read \S+model.safetensors: {problem}"):
        qwen_np.load(checkpoint)


def hub_cache_copy(checkpoint, hub, name, commits=("0123abc",), main="0123abc"):
    """Moves `checkpoint`'s files into the Hub's cache layout under `hub`, as `hf download name` leaves them:
    blobs/ once, snapshots/<commit>/ of links to them, refs/main naming the main branch's commit."""
    folder = hub / f"models--{name.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in checkpoint.iterdir() if p.is_file())):
        f.rename(folder / "blobs" / f"blob{i}")
        for commit in commits:
            (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / commit / f.name).symlink_to(f"../../blobs/blob{i}")
    if main is not None:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(main)
    return folder


def test_a_hub_cache_snapshot_of_symlinks_loads(checkpoint, tmp_path):
    # The Hub's cache keeps each file once under blobs/ and links it from snapshots/<commit>/.
    ids = np.array([[1, 2, 3]])
    expected = {}  # mmap -> logits (mapped weights keep the file's layout, see weights.weight_array: other rounding)
    for mmap in (False, True):
        original = qwen_np.load(checkpoint, mmap=mmap)
        expected[mmap] = qwen_np.forward(original.params, original.config, ids)[0]
    snapshot = hub_cache_copy(checkpoint, tmp_path / "hub", "Qwen/Tiny") / "snapshots" / "0123abc"
    for mmap in (False, True):
        model = qwen_np.load(snapshot, mmap=mmap)
        np.testing.assert_array_equal(qwen_np.forward(model.params, model.config, ids)[0], expected[mmap])


def test_a_model_folder_of_the_hub_cache_names_its_snapshot(tmp_path):
    folder = tmp_path / "models--Qwen--Qwen3-0.6B"
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    (folder / "snapshots" / "0123abc" / "config.json").write_text("{}")
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"cache: pass {folder / 'snapshots' / '0123abc'})")):
        qwen_np.load(folder)
    (folder / "snapshots" / "4567def").mkdir()
    (folder / "snapshots" / "4567def" / "config.json").write_text("{}")
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"cache: pass {folder / 'snapshots' / '<commit>'})")):
        qwen_np.load(folder)


def test_a_directory_of_gguf_files_says_to_pass_one_of_them(tmp_path):
    for name in ("qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct-fp16.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(
            f"(it holds GGUF files: pass one of them, such as {tmp_path / 'qwen2.5-0.5b-instruct-fp16.gguf'})")):
        qwen_np.load(tmp_path)


def test_a_file_of_a_checkpoint_or_a_folder_of_them_says_what_to_pass(checkpoint, tmp_path_factory):
    for name in ("model.safetensors", "config.json"):  # a file of the checkpoint, not its directory
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(
                f"{checkpoint / name} is neither a checkpoint directory (config.json and *.safetensors) nor a GGUF "
                f"file: pass the checkpoint directory that holds it, {checkpoint}")):
            qwen_np.load(checkpoint / name)
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(checkpoint, models / "b")
    shutil.copytree(checkpoint, models / "a")
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(
            f"no config.json found: {models / 'config.json'} does not exist (it holds checkpoint directories: pass "
            f"one of them, such as {models / 'a'})")):
        qwen_np.load(models)


def test_a_hub_id_that_is_not_a_local_path_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(
            f"Qwen/Qwen3-0.6B does not exist (nor is it in the Hugging Face cache, {tmp_path / 'hub'}; qwen_np reads "
            f"local files only. To fetch Qwen/Qwen3-0.6B from the Hub: pip install -U huggingface_hub, then hf "
            f"download Qwen/Qwen3-0.6B, and pass Qwen/Qwen3-0.6B again)")):
        qwen_np.load("Qwen/Qwen3-0.6B")
    for path in ("nope", "./nope/x", str(tmp_path / "a" / "b"), "a/b/c", "a/b.gguf", "a/b c", "café/x"):  # paths
        with pytest.raises(qwen_np.QwenNPError) as error:
            qwen_np.load(path)
        assert str(error.value).endswith("does not exist"), error.value


def test_a_hub_id_loads_from_the_hugging_face_cache(checkpoint, tmp_path, monkeypatch):
    ids = np.array([[1, 2, 3]])
    original = qwen_np.load(checkpoint)
    expected = qwen_np.forward(original.params, original.config, ids)[0]
    folder = hub_cache_copy(checkpoint, tmp_path / "cache" / "huggingface" / "hub", "Qwen/Tiny",
                            commits=("0123abc", "4567def"), main="4567def")
    monkeypatch.chdir(tmp_path)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)
    # Where the cache is: as huggingface_hub finds it.
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"  # none of the variables set
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert hub_cache() == tmp_path / "cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # before XDG_CACHE_HOME
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("TOP", str(tmp_path))  # $VARS in these are expanded, as huggingface_hub does
    monkeypatch.setenv("HF_HUB_CACHE", "$TOP/cache/huggingface/hub")
    model = qwen_np.load("Qwen/Tiny")
    assert model.path == folder / "snapshots" / "4567def"  # main's commit, of the two
    np.testing.assert_array_equal(qwen_np.forward(model.params, model.config, ids)[0], expected)

    (folder / "refs" / "main").write_bytes(b"\xff\xfe")  # two snapshots, neither known as main's: not guessed at
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(
            f"Qwen/Tiny: the Hugging Face cache holds 2 snapshots of Qwen/Tiny and no refs/main to choose one; pass "
            f"one of them: {folder / 'snapshots' / '<commit>'} (0123abc, 4567def)")):
        qwen_np.load("Qwen/Tiny")
    shutil.rmtree(folder / "snapshots" / "0123abc")  # one snapshot: that one
    assert qwen_np.load("Qwen/Tiny").path == folder / "snapshots" / "4567def"
    # A GGUF repository's file: owner/name/file.gguf.
    gguf_snapshot = tmp_path / "cache" / "huggingface" / "hub" / "models--Qwen--Tiny-GGUF" / "snapshots" / "89ab"
    gguf_snapshot.mkdir(parents=True)
    (gguf_snapshot / "tiny-q8_0.gguf").write_bytes(b"")
    assert hub_cache_model("Qwen/Tiny-GGUF/tiny-q8_0.gguf") == gguf_snapshot / "tiny-q8_0.gguf"
    assert hub_cache_model("Qwen/Tiny-GGUF/tiny-q4_0.gguf") is None
    (gguf_snapshot / "TINY.GGUF").write_bytes(b"")
    assert hub_cache_model("Qwen/Tiny-GGUF/TINY.GGUF") == gguf_snapshot / "TINY.GGUF"
    (gguf_snapshot / "Q4").mkdir()  # a repository with a folder per quantization
    (gguf_snapshot / "Q4" / "tiny-q4.gguf").write_bytes(b"")
    assert hub_cache_model("Qwen/Tiny-GGUF/Q4/tiny-q4.gguf") == gguf_snapshot / "Q4" / "tiny-q4.gguf"
    with pytest.raises(qwen_np.QwenNPError, match="then hf download Qwen/Tiny-GGUF tiny-q4_0.gguf, and pass "
                                                  "Qwen/Tiny-GGUF/tiny-q4_0.gguf again"):
        qwen_np.load("Qwen/Tiny-GGUF/tiny-q4_0.gguf")
    (tmp_path / "Qwen" / "Tiny").mkdir(parents=True)  # a local path of that name comes first, as in transformers
    with pytest.raises(qwen_np.QwenNPError, match=r"no config.json found: Qwen/Tiny/config.json does not exist"):
        qwen_np.load("Qwen/Tiny")


def test_unsupported_model_type(checkpoint):
    edit_config(checkpoint, model_type="gpt2")
    with pytest.raises(qwen_np.QwenNPError, match="unsupported model_type 'gpt2'"):
        qwen_np.load(checkpoint)


def test_missing_required_key(checkpoint):
    edit_config(checkpoint, hidden_size=None)
    with pytest.raises(qwen_np.QwenNPError, match="missing required key.*hidden_size"):
        qwen_np.load(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**raw, "hidden_size": 64, "num_attention_heads": None}))
    with pytest.raises(qwen_np.QwenNPError, match=re.escape("missing required key(s) num_attention_heads (null)")):
        qwen_np.load(checkpoint)


BAD_VALUES = [  # (config.json changes, the error's words)
    (dict(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(num_hidden_layers=3.0), "num_hidden_layers must be a positive integer, got 3.0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a number >= 0"),
    (dict(eos_token_id="151645"), "eos_token_id must be a token id or a list of token ids"),
    (dict(eos_token_id=2.5), "eos_token_id must be a token id or a list of token ids, got 2.5"),  # not a TypeError
    (dict(layer_types=["full_attention", "bogus", "full_attention"]), "layer_types must be a list of"),
    (dict(layer_types=[["full_attention"], "full_attention", "full_attention"]), "layer_types must be a list of"),
    (dict(rms_norm_eps=10**400), "rms_norm_eps must be a number >= 0, got 1000"),  # too large for a float
    (dict(num_hidden_layers=10**9), "num_hidden_layers=1000000000 is not a plausible value"),  # not an out-of-memory
    # past NumPy's int64 and Python's float: an OverflowError deep inside the masks and RoPE
    (dict(use_sliding_window=True, sliding_window=2**63), "sliding_window=9223372036854775808 is not a plausible"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                           "original_max_position_embeddings": 10**400}),
     "rope parameters: original_max_position_embeddings=100000000000000000...0000000000000000000 is not a plausible"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e-320}),  # silently NaN logits
     "rope parameters: rope_theta=1e-320 is not a plausible value (outside 1e-30..1e30)"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 1e308}),
     "rope parameters: beta_fast=1e+308 is not a plausible value"),  # a bare "math domain error"
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1, "factor": 2.0}), "'yarn' needs a rope_theta > 1"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(num_key_value_heads=None),  # the key left out: the reference's default, 32 for qwen2
     "num_attention_heads=4 is not a multiple of num_key_value_heads=32 (absent: the reference's default for qwen2)"),
    (dict(head_dim=15), "head_dim=15 must be a positive even number"),
    (dict(hidden_size=2, num_attention_heads=4, num_key_value_heads=4), "head_dim=0 must be a positive even"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window must be a positive integer"),
    (dict(rope_parameters=[1e4]), "rope_scaling / rope_parameters must be an object"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope parameters: rope_theta must be a"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0}), "factor must be a number > 0"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0}),
     "rope type 'llama3' needs a 'low_freq_factor'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 16}),
     "rope type 'yarn' needs a 'factor'"),  # transformers refuses it too
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported: qwen_np's MLP is SwiGLU with SiLU"),
    (dict(head_dim=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope type 'dynamic' needs a head_dim above 2, got 2"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES)
def test_config_values_of_the_wrong_kind_are_named(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(message)):
        qwen_np.load(checkpoint)


def test_zero_is_read_where_a_number_may_be_zero(checkpoint):
    # rms_norm_eps 0, and YaRN's betas 0 (which the reference reads as its defaults, 32 and 1)
    edit_config(checkpoint, rms_norm_eps=0.0, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                                                "beta_fast": 0, "beta_slow": 0})
    config = qwen_np.load(checkpoint).config
    assert config.rms_norm_eps == 0.0
    assert config.rope_parameters["beta_fast"] == config.rope_parameters["beta_slow"] == 0


def test_keys_the_reference_ignores_are_not_checked(checkpoint):
    edit_config(checkpoint, num_experts="none", norm_topk_prob="n/a", use_sliding_window=False, sliding_window=0)
    assert qwen_np.load(checkpoint).config.sliding_window is None


def test_a_null_rope_theta_is_named(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("rope_parameters")
    (checkpoint / "config.json").write_text(json.dumps({**raw, "rope_theta": None}))  # edit_config drops None
    with pytest.raises(qwen_np.QwenNPError, match="rope_theta is null; it must be a number > 0"):
        qwen_np.load(checkpoint)


def test_negative_token_ids_in_old_configs_are_read(checkpoint):
    edit_config(checkpoint, pad_token_id=-1, bos_token_id=0, eos_token_id=1)  # Llama configs of 2023 say -1: none
    assert qwen_np.load(checkpoint).config.pad_token_id == -1


def test_malformed_config(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(qwen_np.QwenNPError, match="config.json is not valid JSON"):
        qwen_np.load(checkpoint)


def test_unsupported_rope_type(checkpoint):
    edit_config(checkpoint, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(qwen_np.QwenNPError, match="unsupported rope type 'longrope'"):
        qwen_np.load(checkpoint)


def test_shape_mismatch_names_file_and_tensor(checkpoint):
    edit_config(checkpoint, intermediate_size=100)
    with pytest.raises(qwen_np.QwenNPError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj"
                                                  r"\.weight' has shape \[96, 64\] but the config implies \[100, 64\]"):
        qwen_np.load(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    drop_tensor(checkpoint, "model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(qwen_np.QwenNPError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        qwen_np.load(checkpoint)


def test_tied_embeddings_an_index_places_wrongly_are_named(checkpoint):
    # tie_word_embeddings true, lm_head.weight in a second file, and the index sends embed_tokens there too
    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()  # (beside an index, a model.safetensors is read alone)
    save_file({"lm_head.weight": tensors.pop("lm_head.weight")}, checkpoint / "head.safetensors")
    save_file(tensors, checkpoint / "body.safetensors")
    weight_map = {name: "body.safetensors" for name in tensors}
    weight_map.update({"lm_head.weight": "head.safetensors", "model.embed_tokens.weight": "head.safetensors"})
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    edit_config(checkpoint, tie_word_embeddings=True)
    with pytest.raises(qwen_np.QwenNPError, match=r"missing tensor 'model\.embed_tokens\.weight' in .*head\.safetensors"):
        qwen_np.load(checkpoint)


def test_a_tied_configs_lm_head_of_another_shape_is_named(checkpoint):
    # Not taken for a copy of the embeddings and left unread: read as an untied head, its shape is wrong
    # (transformers refuses the size mismatch too)
    tensors = load_file(checkpoint / "model.safetensors")
    V, D = tensors["model.embed_tokens.weight"].shape
    tensors["lm_head.weight"] = np.zeros((V + 1, D), np.float32)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    edit_config(checkpoint, tie_word_embeddings=True)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"tensor 'lm_head.weight' has shape [{V + 1}, {D}] but "
                                                            f"the config implies [{V}, {D}]")):
        qwen_np.load(checkpoint)


def test_a_tied_lm_head_the_index_lists_but_no_file_holds_is_the_embeddings(checkpoint):
    # As transformers reads it: what the shard holds counts, not what the index claims; a tied model needs no head.
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["lm_head.weight"]
    (checkpoint / "model.safetensors").unlink()
    save_file(tensors, checkpoint / "body.safetensors")
    weight_map = {name: "body.safetensors" for name in [*tensors, "lm_head.weight"]}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    edit_config(checkpoint, tie_word_embeddings=True)
    params = qwen_np.load(checkpoint).params
    assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]


def test_empty_cache_and_config_from_dict_name_a_wrong_argument():
    config = config_from_dict({"model_type": "qwen2", **SIZES, "num_key_value_heads": 4})
    model = types.SimpleNamespace(config=config)
    for args, message in [((model, 1, 8), "config must be model.config, got SimpleNamespace"),
                          ((config, 0, 8), "batch_size must be a whole number of at least 1, got 0"),
                          ((config, 1, 1.5 * 8), "capacity must be a whole number of at least 0, got 12.0"),
                          ((config, 1, -1), "capacity must be a whole number of at least 0, got -1")]:
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(message)):
            empty_cache(*args)
    assert empty_cache(config, 2, np.int64(3)).keys[0].shape == (2, 4, 3, 16)
    for raw in ("config.json", json.dumps({"model_type": "qwen2", **SIZES}), None, config):
        with pytest.raises(qwen_np.QwenNPError, match=rf"config_from_dict takes the dict config.json holds .*got "
                                                      rf"{type(raw).__name__}; read_config reads a file"):
            config_from_dict(raw)


def test_quantized_checkpoint_is_refused_by_name(checkpoint):
    edit_config(checkpoint, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(qwen_np.QwenNPError, match="quantized .*quant_method 'gptq'"):
        qwen_np.load(checkpoint)
    # MLX's conversions say so under "quantization" (its packed weights would only show as wrong shapes)
    edit_config(checkpoint, quantization_config=None, quantization={"group_size": 64, "bits": 4})
    with pytest.raises(qwen_np.QwenNPError, match=r"quantized \(quantization: \{'bits': 4, 'group_size': 64\}\)"):
        qwen_np.load(checkpoint)


def test_untied_checkpoint_without_lm_head_is_refused(checkpoint):
    # transformers would start the head from random numbers; the embeddings are not a stand-in.
    drop_tensor(checkpoint, "lm_head.weight")
    with pytest.raises(qwen_np.QwenNPError, match="missing tensor 'lm_head.weight'.*tie_word_embeddings false"):
        qwen_np.load(checkpoint)
    # A reward or classifier model (Qwen2ForSequenceClassification, as Qwen2.5-Math-RM): its head is named.
    tensors = load_file(checkpoint / "model.safetensors")
    save_file({**tensors, "score.weight": np.zeros((1, tensors["model.norm.weight"].size), np.float32)},
              checkpoint / "model.safetensors")
    with pytest.raises(qwen_np.QwenNPError, match=r"calls for it\); it holds a classification head "
                                                  r"\(\.\.\.ForSequenceClassification, \.\.\.ForTokenClassification\) "
                                                  r"instead \('score\.weight'\): qwen_np runs language models "
                                                  r"\(\.\.\.ForCausalLM\)$"):
        qwen_np.load(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(qwen_np.QwenNPError, match=r"model\.safetensors is truncated: tensor '.*' needs bytes"):
        qwen_np.load(checkpoint)
    path.write_bytes(b"\x10\x00")
    with pytest.raises(qwen_np.QwenNPError, match="is not a safetensors file"):
        qwen_np.load(checkpoint)


@pytest.mark.parametrize("stored, low_memory", [("F32", False), ("BF16", False), ("BF16", True), ("F32", True)])
def test_a_file_that_shrinks_after_its_header_is_read(tmp_path, stored, low_memory):
    # Read as stored, widened or narrowed: a short read is named, never zeros in the weights.
    from qwen_np.bench import write_safetensors

    path = tmp_path / "model.safetensors"
    values = (np.arange(3000) % 200).astype(np.float32).reshape(30, 100)  # exact in bfloat16
    write_safetensors(path, {"w": float32_to_bf16(values) if stored == "BF16" else values}, stored)
    header = read_safetensors_header(path)
    np.testing.assert_array_equal(read_tensor(path, "w", *header["w"]), values)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(qwen_np.QwenNPError, match=r"model\.safetensors is truncated: tensor 'w' ends past the end"):
        read_tensor(path, "w", *header["w"], bf16=low_memory)
    with pytest.raises(qwen_np.QwenNPError, match=r"model\.safetensors is truncated: tensor 'w' ends past the end"):
        read_tensor(path, "w", *header["w"], by_columns=not low_memory)


@pytest.mark.parametrize("stored", ["F32", "BF16", "F16"])
def test_a_matrix_read_by_columns_holds_the_files_values(tmp_path, stored, monkeypatch):
    from qwen_np.bench import write_safetensors

    path = tmp_path / "model.safetensors"
    values = (np.arange(3000) % 200).astype(np.float32).reshape(100, 30)  # exact in bfloat16 and float16
    as_stored = {"F32": values, "BF16": float32_to_bf16(values), "F16": values.astype(np.float16)}[stored]
    write_safetensors(path, {"w": as_stored}, stored)
    monkeypatch.setattr(qwen_np.weights, "COLUMN_MAJOR_ROWS", 16)  # 16 rows at a time, the last block 4
    w = read_tensor(path, "w", *read_safetensors_header(path)["w"], by_columns=True)
    assert w.shape == (100, 30) and w.dtype == np.float32 and w.flags.f_contiguous and not w.flags.c_contiguous
    np.testing.assert_array_equal(w, values)


@pytest.mark.parametrize("tied", [True, False])
def test_load_lays_out_tall_matrices_of_short_rows_by_columns(tmp_path, tied):
    # `linear` streams such a weight faster by columns (ops.column_major); the rest keep the file's rows.
    from qwen_np.bench import SMOKE_SHAPES, write_checkpoint
    from qwen_np.ops import SHORT_ROW

    shape = dict(SMOKE_SHAPES["tiny-qwen2"], tie_word_embeddings=tied)  # hidden 64, intermediate 128, vocab 512
    write_checkpoint(tmp_path / "short", shape, dtype="bfloat16")
    model = qwen_np.load(tmp_path / "short")
    mlp, attn = model.params["model"]["layers"][0]["mlp"], model.params["model"]["layers"][0]["self_attn"]
    by_columns = [mlp["gate_proj"]["weight"], mlp["up_proj"]["weight"], model.params["lm_head"]["weight"]]
    by_rows = [mlp["down_proj"]["weight"], attn["q_proj"]["weight"], attn["k_proj"]["weight"]]
    if not tied:  # looked up row by row, never multiplied
        by_rows.append(model.params["model"]["embed_tokens"]["weight"])
    assert all(w.shape[0] > w.shape[1] and w.flags.f_contiguous and not w.flags.c_contiguous for w in by_columns)
    assert all(w.flags.c_contiguous for w in by_rows)
    assert (model.params["lm_head"]["weight"] is model.params["model"]["embed_tokens"]["weight"]) == tied
    low = flatten(qwen_np.load(tmp_path / "short", low_memory=True).params)  # bf16 bits keep the file's rows
    for name, w in flatten(model.params).items():
        assert low[name].flags.c_contiguous
        np.testing.assert_array_equal(w, low[name] if low[name].dtype == np.float32 else
                                      bf16_to_float32(low[name]))
    # A float32 checkpoint: read into columns too; mapped (mmap=True), its weights stay the file's rows.
    write_checkpoint(tmp_path / "f32", shape, dtype="float32")
    read = flatten(qwen_np.load(tmp_path / "f32").params)
    mapped = flatten(qwen_np.load(tmp_path / "f32", mmap=True).params)
    assert read["model.layers.0.mlp.gate_proj.weight"].flags.f_contiguous
    for name, w in read.items():
        assert mapped[name].flags.c_contiguous
        np.testing.assert_array_equal(w, mapped[name])
    # Rows of SHORT_ROW floats and more stream fast enough as they are.
    write_checkpoint(tmp_path / "long", dict(shape, hidden_size=SHORT_ROW, intermediate_size=2 * SHORT_ROW,
                                              num_hidden_layers=1), dtype="bfloat16")
    gate = qwen_np.load(tmp_path / "long").params["model"]["layers"][0]["mlp"]["gate_proj"]["weight"]
    assert gate.shape == (2 * SHORT_ROW, SHORT_ROW) and gate.flags.c_contiguous


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(qwen_np.QwenNPError, match="no weights in"):
        qwen_np.load(checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(b"")  # an old checkpoint: pickled torch tensors
    with pytest.raises(qwen_np.QwenNPError, match=r"found only PyTorch pickle weights \(pytorch_model\.bin\)"):
        qwen_np.load(checkpoint)


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_HEADERS = [  # (a safetensors header, the error's words after "<file> has a corrupt safetensors header: ")
    (["w"], "it must be a JSON object, found list"),
    ("w", "it must be a JSON object, found str"),
    (3, "it must be a JSON object, found int"),
    ({"w": [1]}, "tensor 'w' is described by [1], not an object"),
    *(({"w": {k: v for k, v in GOOD_ENTRY.items() if k != key}}, f"tensor 'w' has no {key!r}") for key in GOOD_ENTRY),
    ({"w": {**GOOD_ENTRY, "dtype": ["F32"]}}, "tensor 'w' has dtype ['F32']; it must be a string"),
    ({"w": {**GOOD_ENTRY, "shape": None}}, "tensor 'w' has shape None; it must be a list of integers >= 0"),
    ({"w": {**GOOD_ENTRY, "shape": [2.0, 2]}}, "tensor 'w' has shape [2.0, 2]; it must be"),
    ({"w": {**GOOD_ENTRY, "shape": [-2, -2]}}, "tensor 'w' has shape [-2, -2]; it must be"),
    *(({"__metadata__": {"format": "pt"}, "w": {**GOOD_ENTRY, "data_offsets": offsets}},
       f"tensor 'w' has data_offsets {offsets}; it must be [begin, end] with 0 <= begin <= end")
      for offsets in ([0, 8, 16], ["0", "16"], [0.0, 16.0], [-8, 8], [16, 0])),
    # The byte ranges must tile the 16 bytes of data, as the safetensors library checks:
    ({"w": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},  # b reads w's bytes
     "the bytes of tensor 'b' (data_offsets [8, 16]) overlap tensor 'w', which ends at 16"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
     "the bytes of tensor 'b' (data_offsets [8, 12]) leave a gap of 4 bytes after tensor 'a'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
     "the bytes of tensor 'w' (data_offsets [8, 16]) leave a gap of 8 bytes after the header"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "its tensors end at byte"),  # 8 bytes left over
]


@pytest.mark.parametrize("header, message", BAD_HEADERS)
def test_corrupt_safetensors_header_is_named(tmp_path, header, message):
    path = tmp_path / "model.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))  # header length, header, 16 bytes of data
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"{path} has a corrupt safetensors header: {message}")):
        read_safetensors_header(path)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], "model.safetensors", {"model.norm.weight": 1},
                                        {"model.norm.weight": ["model.safetensors"]}])
def test_index_whose_weight_map_is_not_names_to_files(checkpoint, weight_map):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00001.safetensors")  # the index is read
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"{index} is not a valid index")):
        qwen_np.load(checkpoint)


def test_a_model_safetensors_beside_an_index_is_read_alone_as_transformers_reads_it(checkpoint):
    # save_pretrained leaves the index of a sharded checkpoint behind when it saves it as one file
    expected = qwen_np.load(checkpoint).params["model"]["norm"]["weight"]
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors"}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(qwen_np.load(checkpoint).params["model"]["norm"]["weight"], expected)


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json", "tokenizer_config.json",
                                  "chat_template.jinja", "model.safetensors.index.json"])
def test_a_side_file_whose_link_is_broken_is_named_not_taken_for_absent(checkpoint, name):
    # (a Hugging Face cache snapshot whose blob was deleted)
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00001.safetensors")  # the index is read
    (checkpoint / name).unlink(missing_ok=True)
    (checkpoint / name).symlink_to(checkpoint / "gone")
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"cannot read {checkpoint / name}: No such file")):
        qwen_np.load(checkpoint)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_pipe_in_place_of_a_file_is_named_not_read(checkpoint, name):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00001.safetensors")
    (checkpoint / name).unlink(missing_ok=True)
    os.mkfifo(checkpoint / name)  # reading it would block for ever
    # Should the check go, the test fails after 30 s instead of hanging the suite: the alarm's
    # exception interrupts the blocked open().
    def blocked(signum, frame):
        pytest.fail(f"load blocked on the pipe {name}")  # an exception no handler of load's catches

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(30)
    try:
        with pytest.raises(qwen_np.QwenNPError, match="is not a regular file"):
            qwen_np.load(checkpoint)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_tensor_in_two_files_without_an_index(checkpoint):
    norm = load_file(checkpoint / "model.safetensors")["model.norm.weight"]
    save_file({"model.norm.weight": norm + 1}, checkpoint / "model-extra.safetensors")
    # Beside model.safetensors no other file is read, as transformers reads only it...
    np.testing.assert_array_equal(qwen_np.load(checkpoint).params["model"]["norm"]["weight"], norm)
    # ...without it, every .safetensors file is a shard, and a tensor may be in one only.
    (checkpoint / "model.safetensors").rename(checkpoint / "model-main.safetensors")
    both = r"tensor 'model\.norm\.weight' is in both \S*/model-extra\.safetensors and \S*/model-main\.safetensors"
    with pytest.raises(qwen_np.QwenNPError, match=both):
        qwen_np.load(checkpoint)


@pytest.mark.parametrize("family, changes, tensor", [
    ("qwen3", dict(model_type="llama"), r"model\.layers\.0\.self_attn\.[qk]_norm\.weight"),  # q/k norms left out
    ("qwen2", dict(num_hidden_layers=2, layer_types=None), r"model\.layers\.2\.\S+"),  # the last layer left out
])
def test_layer_tensors_the_config_does_not_call_for_are_refused(tmp_path, family, changes, tensor):
    tiny_model(family, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(qwen_np.QwenNPError, match=rf"model\.safetensors: tensor '{tensor}' is in the checkpoint but "
                                                  r"the config .* does not call for it"):
        qwen_np.load(tmp_path)


def test_extra_tensors_outside_the_layers_and_inv_freq_still_load(tmp_path):
    # A tied checkpoint that also stores a copy of the embeddings as lm_head, and the rotary buffer that
    # some older checkpoints saved.
    tiny_model("qwen2", tmp_path, tie_word_embeddings=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    params = qwen_np.load(tmp_path).params
    assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
@pytest.mark.parametrize("text, kind", [("[1]", "list"), ('"x"', "str")])
def test_side_files_must_hold_json_objects(checkpoint, name, text, kind):
    assert read_json(checkpoint / "absent.json") is None  # a missing side file is no error: the loader takes {}
    (checkpoint / name).write_text(text)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"{name} must hold a JSON object, found {kind}")):
        qwen_np.load(checkpoint)


def test_chat_template_that_is_not_utf8(checkpoint):
    (checkpoint / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(qwen_np.QwenNPError, match=r"chat_template\.jinja is not UTF-8 text"):
        qwen_np.load(checkpoint)


def test_a_cache_from_another_model_is_refused(checkpoint, tmp_path):
    model = qwen_np.load(checkpoint)
    other = qwen_np.load(tiny_model("qwen3", tmp_path / "qwen3") and tmp_path / "qwen3")  # head_dim 24, not 16
    _, cache = qwen_np.forward(other.params, other.config, np.array([[1, 2]]))
    with pytest.raises(qwen_np.QwenNPError, match="the cache was made for another model: 3 layers of 2 key/value "
                                                  "heads of 24, where this one has 3 of 2 of 16"):
        qwen_np.forward(model.params, model.config, np.array([[3]]), cache)
    with pytest.raises(qwen_np.QwenNPError, match="cache must be the KVCache that forward returned, got tuple"):
        qwen_np.forward(model.params, model.config, np.array([[3]]), tuple(cache))


def test_a_cache_of_another_batch_size_is_refused(checkpoint):
    model = qwen_np.load(checkpoint)
    _, cache = qwen_np.forward(model.params, model.config, np.array([[1, 2, 3]]))
    with pytest.raises(qwen_np.QwenNPError, match="the cache holds 1 sequences but input_ids has 2"):
        qwen_np.forward(model.params, model.config, np.array([[4], [5]]), cache)
    _, cache = qwen_np.forward(model.params, model.config, np.array([[1, 2], [3, 4]]))
    with pytest.raises(qwen_np.QwenNPError, match="the cache holds 2 sequences but input_ids has 1"):
        qwen_np.forward(model.params, model.config, np.array([[5]]), cache)


def test_token_ids_outside_the_vocabulary(checkpoint):
    model = qwen_np.load(checkpoint)
    with pytest.raises(qwen_np.QwenNPError, match=r"token id 128 is outside the vocabulary \(0\.\.127\)"):
        qwen_np.forward(model.params, model.config, np.array([[1, 2, 128]]))
    with pytest.raises(qwen_np.QwenNPError, match="token id -1 "):  # the id that is out, not the 0 before it
        qwen_np.forward(model.params, model.config, np.array([[0, -1, 127]]))
    for bad in (np.array([1.0, 2.0]), [[1, 2], [3]], np.zeros((0, 3), np.int64)):  # floats, ragged, no rows
        with pytest.raises(qwen_np.QwenNPError, match="input_ids must be a non-empty integer array"):
            qwen_np.forward(model.params, model.config, bad)


def test_forward_arguments_of_the_wrong_kind_are_named(checkpoint):
    model = qwen_np.load(checkpoint)
    ids = np.array([[1, 2]])
    with pytest.raises(qwen_np.QwenNPError, match=r"params must be model.params, the tree of weights, got Config "
                                                  r"\(params and config are swapped\?\)"):
        qwen_np.forward(model.config, model.params, ids)
    with pytest.raises(qwen_np.QwenNPError, match="params must be model.params, the tree of weights, got Model$"):
        qwen_np.forward(model, model.config, ids)
    with pytest.raises(qwen_np.QwenNPError, match="config must be model.config, got NoneType$"):
        qwen_np.forward(model.params, None, ids)
    with pytest.raises(qwen_np.QwenNPError, match="whose top keys are 'model' and 'lm_head', got a dict of "
                                                  r"\['embed_tokens', 'norm', 'layers'\]"):
        qwen_np.forward(model.params["model"], model.config, ids)
    with pytest.raises(qwen_np.QwenNPError, match=r"top keys are 'model' and 'lm_head', got a dict of \['model'\]"):
        qwen_np.forward({"model": model.params["model"]}, model.config, ids)  # lm_head dropped, as if tied
    other = dataclasses.replace(model.config, num_hidden_layers=2, layer_types=model.config.layer_types[:2])
    with pytest.raises(qwen_np.QwenNPError, match="params and config are of different models: the params have 3 "
                                                  "layers and a 128 x 64 embedding, the config 2 and 128 x 64$"):
        qwen_np.forward(model.params, other, ids)


@pytest.mark.parametrize("mask, message", [
    ([["0", "1"]], "attention_mask must hold 1 (a real token) and 0 (padding), got an array of <U1"),
    ([[np.nan, 1]], "attention_mask must hold 1 (a real token) and 0 (padding), found nan"),
    ([[0, 2]], "attention_mask must hold 1 (a real token) and 0 (padding), found 2"),
    ([[1, 1], [1]], "attention_mask must be an array (1, 2) of 1 and 0, like input_ids; got [[1, 1], [1]]"),
    ([[1, 1, 1]], "attention_mask has shape (1, 3), expected (1, 2), that of input_ids"),
    ([1, 1], "attention_mask has shape (2,), expected (1, 2), that of input_ids")])
def test_an_attention_mask_that_is_not_zeros_and_ones_of_the_ids_shape_is_named(checkpoint, mask, message):
    model = qwen_np.load(checkpoint)
    with pytest.raises(qwen_np.QwenNPError, match=f"^{re.escape(message)}$"):
        qwen_np.forward(model.params, model.config, np.array([[1, 2]]), attention_mask=mask)
    ints = qwen_np.forward(model.params, model.config, np.array([[1, 2]]), attention_mask=[[0, 1]])[0]
    for same in ([[False, True]], np.array([[0.0, 1.0]], np.float32), np.array([[0, 1]], object)):
        np.testing.assert_array_equal(qwen_np.forward(model.params, model.config, np.array([[1, 2]]),
                                                      attention_mask=same)[0], ints)


def test_load_arguments_of_the_wrong_kind_are_named(checkpoint):
    for wrong, kind in ((qwen_np.load(checkpoint), "Model"), (None, "NoneType"), (bytes(checkpoint), "bytes")):
        with pytest.raises(qwen_np.QwenNPError, match="load takes the path of a checkpoint directory or .gguf file "
                                                      rf"\(a str or Path\), or a Hub id, got {kind}$"):
            qwen_np.load(wrong)
    for name in ("mmap", "low_memory"):
        with pytest.raises(qwen_np.QwenNPError, match=f"load: {name} must be True or False, got 'no'"):
            qwen_np.load(checkpoint, **{name: "no"})
        for value in (0, 1):  # as False and True
            qwen_np.load(checkpoint, **{name: value})
    with pytest.raises(qwen_np.QwenNPError, match="^~no-such-user-here/model does not exist$"):
        qwen_np.load("~no-such-user-here/model")  # pathlib cannot expand it: the path as written


def test_tokenizer_is_loaded_when_present(checkpoint, shared_data):
    assert qwen_np.load(checkpoint).tokenizer is None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((shared_data / "qwen3-tokenizer" / name).read_bytes())
    model = qwen_np.load(checkpoint)
    assert model.tokenizer.encode("Hello, world! 你好").ids == [9707, 11, 1879, 0, 220, 108386]
    assert "enable_thinking" in model.tokenizer_config["chat_template"]


@pytest.mark.parametrize("tied", [True, False])
def test_a_base_model_checkpoint_without_the_model_prefix_loads_as_transformers_loads_it(tmp_path, tied):
    # Qwen3-Embedding is published as saved from Qwen3Model: "layers.0...", not "model.layers.0...".
    torch, transformers = require_reference()
    config = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      tie_word_embeddings=tied)
    transformers.Qwen3Model(config).save_pretrained(tmp_path, max_shard_size="100KB")  # sharded, with an index
    if not tied:  # an untied head saved beside the base model keeps its own name
        head = {"lm_head.weight": rng.normal(size=(128, 64)).astype(np.float32)}
        save_file(head, tmp_path / "head.safetensors")
        index = read_json(tmp_path / "model.safetensors.index.json")
        index["weight_map"]["lm_head.weight"] = "head.safetensors"
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not any(name.startswith("model.") for name in read_json(tmp_path / "model.safetensors.index.json")[
        "weight_map"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = qwen_np.load(tmp_path)
    x = ids(2, 12)
    np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(reference, x), **TOL)


@pytest.mark.parametrize("text, message", [("[" * 100_000, "nested too deeply"),
                                           ('{"vocab_size": ' + "9" * 5000 + "}", "an integer of thousands of digits")])
def test_json_that_python_cannot_take_in_is_named(checkpoint, text, message):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(qwen_np.QwenNPError, match=rf"config\.json is not valid JSON: it .*{message}"):
        qwen_np.load(checkpoint)
    header = text.encode()
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(qwen_np.QwenNPError, match=r"model\.safetensors has a corrupt safetensors header"):
        read_safetensors_header(checkpoint / "model.safetensors")


def test_a_shape_whose_element_count_overflows_int64_is_named(tmp_path):
    from qwen_np.weights import read_tensor
    (tmp_path / "t.bin").write_bytes(b"")
    with pytest.raises(qwen_np.QwenNPError, match=r"tensor 'x' has 0 bytes, not 18446744073709551616 F32 values"):
        read_tensor(tmp_path / "t.bin", "x", "F32", (2**62, 4), 0, 0)  # np.prod would say 0 values


def test_the_older_name_of_the_hub_cache_variable_is_honoured(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hub_cache() == tmp_path / "old"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))  # the new name wins
    assert hub_cache() == tmp_path / "new"


# Fewer entries than layers: a bare IndexError in forward; more: silently ignored.
@pytest.mark.parametrize("entries", [2, 5])
def test_layer_types_of_another_length_than_the_layers_is_named(checkpoint, entries):
    edit_config(checkpoint, layer_types=["full_attention"] * entries)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(f"layer_types has {entries} entries for 3 layers")):
        qwen_np.load(checkpoint)


# A file whose first 8 bytes claim a header longer than the file: a Git LFS pointer
# (a checkout without `git lfs pull`), a cut download. Without the check: MemoryError / OverflowError from f.read.
def test_a_header_longer_than_the_file_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 441456\n"
    for blob, claimed in [(lfs, struct.unpack("<Q", lfs[:8])[0]), (data[:200], struct.unpack("<Q", data[:8])[0]),
                          (struct.pack("<Q", 2**64 - 1) + data[8:], 2**64 - 1)]:
        path.write_bytes(blob)
        with pytest.raises(qwen_np.QwenNPError, match=re.escape(
                f"model.safetensors is truncated or not a safetensors file: its header claims {claimed} bytes "
                f"but the file has {len(blob)}")):
            qwen_np.load(checkpoint)


# Without the check, the load fails later on the first missing shard ("cannot read ...: No such
# file or directory"), without saying that the index names it.
def test_an_index_naming_a_missing_shard_is_named(tmp_path):
    tiny_model("qwen2", tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(
            f"model.safetensors.index.json names shard(s) that do not exist: {shards[-1].name}")):
        qwen_np.load(tmp_path)


@pytest.mark.parametrize("dtype, kind", [(np.float64, "F64"), (np.int8, "I8")])
def test_a_tensor_of_a_dtype_qwen_np_does_not_read_is_named(checkpoint, dtype, kind):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(qwen_np.QwenNPError, match=rf"model.safetensors: tensor 'model.norm.weight' has dtype {kind}; "
                                                  r"qwen_np reads F32, F16 and BF16"):
        qwen_np.load(checkpoint)
