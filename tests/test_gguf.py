"""GGUF files: our dequantizers against the gguf package's, tiny models of every family written
as GGUF against transformers loading the same file, the config and the tokenizer from the
metadata, and bad files."""

import json
import re
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import VARIED_TEXT, embeddings_huge_page_kb
from gguf_files import (gguf, llama_cpp_permute, qwen_tokenizer_metadata, random_gguf, read_safetensors,
                        small_config, write_gguf)
from tiny import FAMILIES, reference_logits, tiny_model

import qwen_np
from qwen_np.config import config_from_dict
from qwen_np.gguf import (DEQUANTIZERS, GGML_TYPES, IQ4_LEVELS, bytes_to_unicode, chat_settings,
                          check_special_token_ids, config_from_gguf, dequantize, end_token_ids_of_gguf, gguf_params,
                          gguf_tokenizer, pre_tokenizer, read_gguf, unpermute_rope_rows)
from qwen_np.ops import bf16_to_float32, column_major
from qwen_np.weights import expected_shapes, flatten, float32_to_bf16

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------
# Dequantizers

# The types the package cannot quantize, and the byte offsets of their f16 scales
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
                 "IQ4_XS": (0,)}


@pytest.mark.parametrize("name", list(DEQUANTIZERS))
def test_dequantizer_matches_the_gguf_package(name, monkeypatch):
    qtype = Q[name]
    assert DEQUANTIZERS[name][:2] == gguf.GGML_QUANT_SIZES[qtype]  # values and bytes per block
    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    if name in SCALE_OFFSETS:  # random blocks, finite f16 scales
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows * cols // block_values, block_bytes), dtype=np.uint8)
        for offset in SCALE_OFFSETS[name]:
            scales = (rng.normal(size=(len(blocks), 1)) * 0.01).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8)
        raw = blocks.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), qtype)
    with monkeypatch.context() as m:
        m.setattr(qwen_np.weights, "CHUNK", 300)  # a row at a time: the same values
        chunked = dequantize(raw, name, (rows, cols))
        m.setattr(qwen_np.weights, "COLUMN_MAJOR_ROWS", 4)  # column-major, 4 rows then 2: the same values
        by_columns = dequantize(raw, name, (rows, cols), by_columns=True)
    ours = dequantize(raw, name, (rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    assert np.count_nonzero(ours) > rows * cols // 2
    expected = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(chunked, expected)
    assert ours.flags.c_contiguous and by_columns.flags.f_contiguous and not by_columns.flags.c_contiguous
    np.testing.assert_array_equal(by_columns, expected)


def test_type_numbers_are_ggmls():
    # The tensor table gives a type as a number: each must name the type llama.cpp's package gives it
    # (types newer than the installed package aside)
    known = {t.name: int(t) for t in Q}
    assert set(DEQUANTIZERS) <= set(known) and set(DEQUANTIZERS) <= set(GGML_TYPES.values())
    assert [(number, name) for number, name in GGML_TYPES.items() if name in known and known[name] != number] == []
    # and none is left out: each type the package numbers within the table's range is in it, under its number
    assert {known[name]: name for name in known if known[name] <= max(GGML_TYPES)} == \
        {number: name for number, name in GGML_TYPES.items() if name in known}


def test_q8_0_and_q4_0_block_layouts_by_hand():
    d = np.array([0.5], np.float16).view(np.uint8)
    q8 = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([d, q8.view(np.uint8)])[None]  # [1, 34]: d, then 32 int8 values
    np.testing.assert_array_equal(dequantize(block, "Q8_0", (32,)), 0.5 * q8)
    codes = np.arange(32) % 16  # 4-bit codes; value j in byte j's low nibble, value j + 16 in its high one
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([d, packed])[None]  # [1, 18]
    np.testing.assert_array_equal(dequantize(block, "Q4_0", (32,)), 0.5 * (codes - 8))


def test_iq4_block_layouts_by_hand():
    d = np.array([0.5], np.float16).view(np.uint8)
    codes = np.arange(32) % 16  # indices into the 16 levels, packed as Q4_0's values
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([d, packed])[None]  # [1, 18]
    np.testing.assert_array_equal(dequantize(block, "IQ4_NL", (32,)), 0.5 * IQ4_LEVELS[codes])
    # IQ4_XS: sub-block j's 6-bit scale is nibble j of scales_l and bits 2j, 2j+1 of scales_h, minus 32.
    scales = np.array([0, 1, 31, 32, 33, 47, 48, 63])
    scales_l = (scales[0::2] & 15) | ((scales[1::2] & 15) << 4)
    scales_h = np.sum((scales >> 4) << np.arange(0, 16, 2))
    block = np.concatenate([d, np.array([scales_h], np.uint16).view(np.uint8), scales_l.astype(np.uint8),
                            np.tile(packed, 8)])[None]  # [1, 136]
    expected = 0.5 * (scales[:, None] - 32) * IQ4_LEVELS[codes]  # [8 sub-blocks, 32]
    np.testing.assert_array_equal(dequantize(block, "IQ4_XS", (256,)), expected.reshape(256))


def test_unpermute_undoes_llama_cpps_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)  # 3 heads of Dh = 8
    permuted = llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted[:, 0], 3), w[:, 0])  # a bias too


# ---------------------------------------------------------------------------------------------
# Whole models: tiny random models of every family, written as GGUF

# transformers' GGUF config reader ignores attention.key_length for qwen3 and the expert sizes of
# the MoE families (it would take its own defaults), so it gets those models' config; it reads
# qwen2 and llama from the file alone.
CONFIG_FROM_FILE = {"qwen2", "llama"}
CASES = [(family, Q.F32) for family in FAMILIES] + [(family, Q.Q8_0) for family in FAMILIES] + [
    ("llama", Q.Q4_1), ("qwen2", Q.Q5_0)]
STRUCTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "tie_word_embeddings", "rope_parameters", "attention_bias", "num_experts", "num_experts_per_tok",
             "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "mlp_only_layers")


@pytest.mark.parametrize("family,qtype", CASES, ids=[f"{f}-{q.name}" for f, q in CASES])
def test_tiny_gguf_matches_transformers(tmp_path, family, qtype, reference):
    torch, transformers = reference
    hf = tiny_model(family, tmp_path / "hf")
    write_gguf(tmp_path / "model.gguf", family, hf.config.to_dict(), read_safetensors(tmp_path / "hf"), qtype)
    model = qwen_np.load(tmp_path / "model.gguf")

    # The config rebuilt from the metadata is the one config.json gives.
    directory_config = config_from_dict(hf.config.to_dict())
    for field in STRUCTURE:
        assert getattr(model.config, field) == getattr(directory_config, field), field
    assert model.config.rms_norm_eps == pytest.approx(directory_config.rms_norm_eps, rel=1e-6)  # stored as f32

    kwargs = {} if family in CONFIG_FROM_FILE else {"config": hf.config}
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager", **kwargs)
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 9))
    ours, _ = qwen_np.forward(model.params, model.config, ids)
    np.testing.assert_allclose(ours, reference_logits(reference, ids), atol=1e-4, rtol=1e-4)
    if qtype == Q.F32:  # unquantized, the file holds the original weights (llama's q/k rows put back)
        np.testing.assert_allclose(ours, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


def iq4_nl(x):  # [rows, cols] float32 -> [rows, cols / 32 * 18] uint8: a plain IQ4_NL quantizer, for tests
    blocks = x.reshape(-1, 32)
    d = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)] / IQ4_LEVELS[0]  # largest -> level -127
    q = np.abs(blocks[:, :, None] / d[:, None, None] - IQ4_LEVELS).argmin(axis=-1)  # nearest level
    packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), packed], axis=1).reshape(len(x), -1)


def test_iq4_nl_model_matches_transformers(tmp_path, reference):
    # llama.cpp writes IQ4_NL for a Q2_K / Q3_K file's tensors whose rows are not a multiple of 256
    # (all of a tiny model's): the projections here are IQ4_NL, as there.
    torch, transformers = reference
    hf = tiny_model("qwen2", tmp_path / "hf")
    tensors = read_safetensors(tmp_path / "hf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, hf.config.num_hidden_layers)
    raw = {names.get_name(name, try_suffixes=(".weight",)): (iq4_nl(value), Q.IQ4_NL)
           for name, value in tensors.items() if name.endswith("_proj.weight")}
    path = write_gguf(tmp_path / "model.gguf", "qwen2", hf.config.to_dict(), tensors, raw_tensors=raw)
    assert read_gguf(path)[1]["blk.0.attn_q.weight"].type_name == "IQ4_NL"
    model = qwen_np.load(path)
    q_proj = model.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    original = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.shape == original.shape and 0 < np.abs(q_proj - original).max() < 0.2 * np.abs(original).max()

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 9))
    ours, _ = qwen_np.forward(model.params, model.config, ids)
    np.testing.assert_allclose(ours, reference_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_moe_experts_are_views_of_one_array(tmp_path):
    config = {**small_config("qwen3_moe"), "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
              "head_dim": 8}
    model = qwen_np.load(random_gguf(tmp_path / "moe.gguf", "qwen3_moe", config))
    experts = model.params["model"]["layers"][0]["mlp"]["experts"]
    assert len(experts) == 4 and experts[0]["gate_proj"]["weight"].shape == (16, 32)
    first, last = experts[0]["up_proj"]["weight"], experts[3]["up_proj"]["weight"]
    assert first.base is not None and first.base is last.base and first.base.size == 4 * 16 * 32
    # The same stacked tensor with one more GGUF dim of size 1 ([in, out, E, 1]) gives the same experts.
    metadata, tensors = read_gguf(model.path)
    up = tensors["blk.1.ffn_up_exps.weight"]
    tensors["blk.1.ffn_up_exps.weight"] = up._replace(dims=(*up.dims, 1))
    params = gguf_params(tensors, model.config, model.path)
    for e in range(4):
        np.testing.assert_array_equal(params["model"]["layers"][1]["mlp"]["experts"][e]["up_proj"]["weight"],
                                      model.params["model"]["layers"][1]["mlp"]["experts"][e]["up_proj"]["weight"])


# ---------------------------------------------------------------------------------------------
# Config from metadata, and bad files


def test_rope_scaling_and_token_ids_from_metadata(tmp_path):
    S = gguf.GGUFValueType
    metadata = [("llama.rope.scaling.type", "yarn", S.STRING), ("llama.rope.scaling.factor", 4.0, S.FLOAT32),
                ("llama.rope.scaling.original_context_length", 64, S.UINT32)]
    model = qwen_np.load(random_gguf(tmp_path / "yarn.gguf", "llama", small_config("llama"), extra_metadata=metadata))
    assert model.config.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64}
    assert model.tokenizer is None and model.generation_config == {}  # no vocabulary in this file
    with pytest.raises(qwen_np.QwenNPError, match=r"yarn.gguf has no tokenizer \(its metadata holds no vocabulary\)"):
        next(qwen_np.generate(model, "text"))
    ids = [("tokenizer.ggml.bos_token_id", 0, S.UINT32), ("tokenizer.ggml.eos_token_id", 1, S.UINT32)]
    model = qwen_np.load(random_gguf(tmp_path / "ids.gguf", "llama", small_config("llama"), extra_metadata=ids))
    assert model.tokenizer is None and model.tokenizer_config == {}  # ids without a vocabulary: no token to name
    assert model.generation_config == {"bos_token_id": 0, "eos_token_id": 1}

    metadata = [("llama.rope.scaling.type", "longrope", S.STRING)]
    with pytest.raises(qwen_np.QwenNPError, match="unsupported RoPE scaling 'longrope'"):
        qwen_np.load(random_gguf(tmp_path / "long.gguf", "llama", small_config("llama"), extra_metadata=metadata))


@pytest.mark.parametrize("metadata, rope", [
    # As llama.cpp reads them: YaRN's original length defaults to context_length (256 here), the
    # type to linear, and the factor may be under its older name; a factor of 1 scales nothing.
    ([("rope.scaling.type", "yarn", "s"), ("rope.scaling.factor", 4.0, "f")],
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    ([("rope.scaling.type", "yarn", "s"), ("rope.scaling.factor", 4.0, "f"), ("rope.scaling.yarn_beta_fast", 16.0, "f"),
      ("rope.scaling.yarn_beta_slow", 2.0, "f")],
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16.0,
      "beta_slow": 2.0}),
    ([("rope.scaling.factor", 2.0, "f")], {"rope_type": "linear", "factor": 2.0}),
    ([("rope.scale_linear", 2.0, "f")], {"rope_type": "linear", "factor": 2.0}),
    ([("rope.scaling.type", "yarn", "s"), ("rope.scale_linear", 4.0, "f")],  # the older name serves YaRN too
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    ([("rope.scaling.type", "linear", "s"), ("rope.scaling.factor", 1.0, "f")], {"rope_type": "default"}),
])
def test_rope_scaling_keys_read_as_llama_cpp_reads_them(tmp_path, metadata, rope):
    kinds = {"s": gguf.GGUFValueType.STRING, "f": gguf.GGUFValueType.FLOAT32}
    metadata = [(f"llama.{name}", value, kinds[kind]) for name, value, kind in metadata]
    model = qwen_np.load(random_gguf(tmp_path / "m.gguf", "llama", small_config("llama"), extra_metadata=metadata))
    assert model.config.rope_parameters == {**rope, "rope_theta": 10000.0}


@pytest.mark.parametrize("family, expert_weights_norm, top_k", [("qwen2_moe", True, 2), ("qwen3_moe", False, 2),
                                                                ("qwen2_moe", False, 1)])
def test_moe_sizes_and_renormalisation_as_llama_cpp_sets_them(tmp_path, family, expert_weights_norm, top_k):
    # llama.cpp renormalises the top-k weights for Qwen3-MoE only, whatever expert_weights_norm says,
    # and derives the sizes a file leaves out: the experts' as feed_forward_length / expert_used_count,
    # the shared expert's as feed_forward_length.
    shared = {"shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {}
    config = small_config(family, num_experts=4, num_experts_per_tok=top_k, moe_intermediate_size=64 // top_k, **shared,
                          **({"head_dim": 8} if family == "qwen3_moe" else {}))
    arch = "qwen2moe" if family == "qwen2_moe" else "qwen3moe"
    path = random_gguf(tmp_path / "m.gguf", family, config, omit=("expert_feed_forward_length",
                                                                  "expert_shared_feed_forward_length"),
                       extra_metadata=[(f"{arch}.expert_weights_norm", expert_weights_norm, gguf.GGUFValueType.BOOL)])
    model = qwen_np.load(path)
    assert model.config.norm_topk_prob == (family == "qwen3_moe")
    assert model.config.moe_intermediate_size == 64 // top_k
    assert model.config.shared_expert_intermediate_size == (64 if family == "qwen2_moe" else 0)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(qwen_np.QwenNPError, match="unsupported GGUF architecture 'gemma2'") as e:
        qwen_np.load(path)
    assert str(path) in str(e.value)


def test_dequantized_weights_are_in_the_systems_default_pages(tmp_path):
    # As for safetensors (see fresh_array): NumPy would ask for huge pages for these 8 MB.
    config = small_config("qwen3", vocab_size=8192, hidden_size=256, head_dim=8)
    path = random_gguf(tmp_path / "m.gguf", "qwen3", config, qtype=Q.Q8_0)
    assert embeddings_huge_page_kb(path) == 0


def test_qwen_np_reads_gguf_without_the_test_only_packages(tmp_path):
    # The gguf package writes the test files; qwen_np itself reads the format, and never imports
    # torch or transformers either.
    path = random_gguf(tmp_path / "m.gguf", "qwen3", small_config("qwen3", head_dim=8), qtype=Q.Q8_0)
    code = ("import sys; sys.modules.update(gguf=None, torch=None, transformers=None); import numpy as np, qwen_np; "
            f"m = qwen_np.load({str(path)!r}); print(qwen_np.forward(m.params, m.config, np.array([[1, 2]]))[0].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "(1, 2, 64)\n"


def test_mmap_is_refused_for_gguf(tmp_path):
    path = random_gguf(tmp_path / "m.gguf", "llama", small_config("llama"))
    with pytest.raises(qwen_np.QwenNPError, match="m.gguf: mmap is for safetensors checkpoints; a GGUF file is "
                                                  "always dequantized"):
        qwen_np.load(path, mmap=True)


def widened(tree):  # the params tree with its bfloat16 matrices widened to float32
    if isinstance(tree, (dict, list)):
        return {k: widened(v) for k, v in tree.items()} if isinstance(tree, dict) else list(map(widened, tree))
    return bf16_to_float32(tree) if tree.dtype == np.uint16 else tree


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_low_memory_keeps_a_gguf_files_matrices_in_bf16(tmp_path, family, monkeypatch):
    # llama: its q/k rows permuted back; qwen3_moe: experts as views of one stacked array.
    monkeypatch.setattr(qwen_np.weights, "CHUNK", 100)  # every tensor dequantized in several blocks of rows
    monkeypatch.setattr(qwen_np.weights, "COLUMN_MAJOR_ROWS", 3)
    config = small_config(family, **({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                      "head_dim": 8} if family == "qwen3_moe" else {}))
    path = random_gguf(tmp_path / "m.gguf", family, config, qtype=Q.Q8_0)
    default, low = qwen_np.load(path), qwen_np.load(path, low_memory=True)
    matrices, low_params = 0, flatten(low.params)
    for name, value in flatten(default.params).items():
        kept = low_params[name]
        if value.ndim == 2:  # the dequantized values rounded to bfloat16, as from a float32 checkpoint
            assert kept.dtype == np.uint16, name
            np.testing.assert_array_equal(kept, float32_to_bf16(value))
            matrices += 1
        else:  # norms and biases as they are
            assert kept.dtype == np.float32, name
            np.testing.assert_array_equal(kept, value)
    assert matrices == sum(v.ndim == 2 for v in flatten(default.params).values()) > 10
    for name, value in flatten(default.params).items():  # as from safetensors, tall matrices by columns (not experts)
        assert (not value.flags.c_contiguous) == (column_major(value.shape) and ".experts." not in name), name
    assert not default.params["lm_head"]["weight"].flags.c_contiguous  # the tied embeddings, [64, 32]
    if family == "qwen3_moe":
        experts = low.params["model"]["layers"][0]["mlp"]["experts"]
        assert experts[0]["up_proj"]["weight"].base is experts[3]["up_proj"]["weight"].base
    # The forward pass widens the bfloat16 matrices exactly: the logits of the rounded weights in float32.
    rounded = widened(low.params)
    x = np.random.default_rng(1).integers(0, config["vocab_size"], (2, 9))
    np.testing.assert_array_equal(qwen_np.forward(low.params, low.config, x)[0],
                                  qwen_np.forward(rounded, low.config, x)[0])


def test_unsupported_tensor_type(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (64, 17), dtype=np.uint8)  # [64, 32] as MXFP4: 17 bytes a row
    path = random_gguf(tmp_path / "mxfp4.gguf", "llama", small_config("llama"),
                       raw_tensors={"blk.1.ffn_up.weight": (raw, Q.MXFP4)})
    with pytest.raises(qwen_np.QwenNPError, match=r"tensor 'blk.1.ffn_up.weight' has type MXFP4, which qwen_np "
                                                  r"cannot read \(it reads F32, F16, BF16, Q8_0") as e:
        qwen_np.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("alignment", [1, 64])
def test_tensor_data_aligned_otherwise_than_32_bytes(tmp_path, alignment):
    # general.alignment may be any power of two, 1 included (llama.cpp refuses only 0 and the rest)
    config = small_config("llama")
    path = random_gguf(tmp_path / "aligned.gguf", "llama", config, qtype=Q.Q8_0, alignment=alignment)
    offsets = [tensor.data_offset for tensor in gguf.GGUFReader(path).tensors]
    assert all(offset % alignment == 0 for offset in offsets)
    if alignment == 1:
        assert any(offset % 32 for offset in offsets)  # rows of 34 bytes (Q8_0), unpadded
    expected = qwen_np.load(random_gguf(tmp_path / "default.gguf", "llama", config, qtype=Q.Q8_0))
    weights = flatten(qwen_np.load(path).params)
    for name, weight in flatten(expected.params).items():
        np.testing.assert_array_equal(weights[name], weight, err_msg=name)


def test_truncated_and_foreign_files(tmp_path):
    data = random_gguf(tmp_path / "full.gguf", "llama", small_config("llama")).read_bytes()
    for cut in (len(data) // 2, 200):  # in the tensor data, in the metadata
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(qwen_np.QwenNPError, match=rf"cut{cut}.gguf \({cut:,} bytes\) is truncated or corrupt"):
            qwen_np.load(path)
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    with pytest.raises(qwen_np.QwenNPError, match="notes.gguf is not a GGUF file"):
        qwen_np.load(path)


def test_a_part_of_a_split_gguf_says_to_join_the_parts(tmp_path):
    U16 = gguf.GGUFValueType.UINT16
    metadata = [("split.no", 1, U16), ("split.count", 3, U16), ("split.tensors.count", 20, gguf.GGUFValueType.INT32)]
    path = random_gguf(tmp_path / "m-00002-of-00003.gguf", "qwen2", small_config("qwen2"), extra_metadata=metadata)
    with pytest.raises(qwen_np.QwenNPError, match=r"m-00002-of-00003.gguf is part 2 of a GGUF split into 3 files; "
                                                  r"qwen_np reads one-file GGUFs: join the parts first"):
        qwen_np.load(path)
    metadata = [("split.no", 0, U16), ("split.count", 1, U16)]  # a one-part split is a whole file
    assert qwen_np.load(random_gguf(tmp_path / "whole.gguf", "qwen2", small_config("qwen2"),
                                    extra_metadata=metadata)).config.model_type == "qwen2"


def test_bad_metadata_values_are_named(tmp_path):
    config = small_config("qwen2")
    tensors = {name: np.ones(shape, np.float32) for name, shape in expected_shapes(config_from_dict(config)).items()}
    path = write_gguf(tmp_path / "heads.gguf", "qwen2", {**config, "num_attention_heads": 0, "head_dim": 8}, tensors)
    with pytest.raises(qwen_np.QwenNPError, match="heads.gguf: the metadata's qwen2.attention.head_count must be a "
                                                  "positive integer, got 0"):
        qwen_np.load(path)
    path = write_gguf(tmp_path / "name.gguf", "qwen2", config, tensors,
                      extra_metadata=[("general.name", b"\xff\xfe", gguf.GGUFValueType.STRING)])
    with pytest.raises(qwen_np.QwenNPError, match="name.gguf: a metadata string is not valid UTF-8"):
        qwen_np.load(path)
    path = write_gguf(tmp_path / "eps.gguf", "qwen2", {**config, "rms_norm_eps": -1.0}, tensors)
    with pytest.raises(qwen_np.QwenNPError, match="eps.gguf: rms_norm_eps must be a number >= 0"):
        qwen_np.load(path)


def test_unexpected_and_missing_tensors(tmp_path):
    llama = small_config("llama")
    moe = small_config("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)
    for name, family, config, x in [
            ("rope_freqs.weight", "llama", llama, np.ones(4, np.float32)),
            ("enc.0.attn_norm.weight", "llama", llama, np.ones(32, np.float32)),  # numbered, but not a blk.N tensor
            ("blk.0.ffn_up_exps.bias", "qwen3_moe", moe, np.ones((4, 16), np.float32)),  # experts' of a kind not read
            ("blk.0.ffn_up_exps.weight", "llama", llama, np.ones((4, 16, 32), np.float32))]:  # experts, in a dense file
        path = random_gguf(tmp_path / f"{name}.gguf", family, config, extra_tensors={name: x})
        with pytest.raises(qwen_np.QwenNPError, match=f"unexpected tensor '{re.escape(name)}'"):
            qwen_np.load(path)
    shapes = expected_shapes(config_from_dict(llama))
    tensors = {name: np.ones(shape, np.float32) for name, shape in shapes.items() if "layers.1.mlp.up" not in name}
    path = write_gguf(tmp_path / "short.gguf", "llama", llama, tensors)
    with pytest.raises(qwen_np.QwenNPError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        qwen_np.load(path)


@pytest.mark.parametrize("pre, pieces", [
    # GPT-2's split keeps a run of digits and a space before it together, and splits newlines apart
    ("gpt2", ["Hello", "Ġworld", "'s", "Ġ123", "!", "Ċ", "Ċ", "ok"]),
    # SmolLM's and StarCoder's split every digit off first (Qwen2's: by llama.cpp's vectors below)
    ("smollm", ["Hello", "Ġworld", "'s", "Ġ", "1", "2", "3", "!", "Ċ", "Ċ", "ok"]),
])
def test_pre_tokenizers_split_as_llama_cpps(pre, pieces):
    normalizer, split = pre_tokenizer(pre, "x.gguf")
    assert normalizer is None
    assert [piece for piece, _ in split.pre_tokenize_str("Hello world's 123!\n\nok")] == pieces


@pytest.mark.parametrize("model,pre,merge,message", [
    ("gpt2", "llama-bpe", "! \"", "unsupported pre-tokenizer tokenizer.ggml.pre = 'llama-bpe'; qwen_np knows qwen2, "),
    ("llama", "default", "! \"", "unsupported tokenizer 'llama'; qwen_np builds byte-level BPE tokenizers"),
    ("gpt2", "qwen2", "# $", "the merge '# \\$' in tokenizer.ggml.merges does not join two tokens"),
    # Its join is a token, its first part is not (unchecked: a bare Exception from the tokenizers
    # library, "Token `é` out of vocabulary")
    ("gpt2", "qwen2", "é \"", "the merge 'é \"' in tokenizer.ggml.merges does not join two tokens")])
def test_unsupported_tokenizers(tmp_path, model, pre, merge, message):
    tokens = [chr(c) for c in range(ord("!"), ord("!") + 62)] + ['!"', 'é"']  # one token per embedding row
    tokenizer = {"model": model, "pre": pre, "tokens": tokens, "types": [1] * 64, "merges": [merge]}
    path = random_gguf(tmp_path / "tok.gguf", "llama", small_config("llama"), tokenizer=tokenizer)
    with pytest.raises(qwen_np.QwenNPError, match=message):
        qwen_np.load(path)


@pytest.mark.parametrize("changes, message", [
    ({"types": [1] * 10}, "tokenizer.ggml.token_type must be an array of integers, one per token"),
    ({"eos": 64}, r"tokenizer.ggml.eos_token_id=64 is not a token id of the vocabulary \(0..63\)")])
def test_inconsistent_tokenizer_metadata(tmp_path, changes, message):
    tokens = [chr(c) for c in range(ord("!"), ord("!") + 63)] + ['!"']
    tokenizer = {"pre": "qwen2", "tokens": tokens, "types": [1] * 64, "merges": ['! "'], **changes}
    path = random_gguf(tmp_path / "tok.gguf", "llama", small_config("llama"), tokenizer=tokenizer)
    with pytest.raises(qwen_np.QwenNPError, match=message):
        qwen_np.load(path)


def test_a_gguf_file_named_otherwise_is_read_by_its_magic_bytes(tmp_path):
    # Ollama keeps its models as blobs named by their checksum: ~/.ollama/models/blobs/sha256-...
    path = random_gguf(tmp_path / "m.gguf", "qwen2", small_config("qwen2"))
    blob = path.rename(tmp_path / "sha256-6a1a2eb6d15622bf3c96857206351ba97e1af16c30d7a74ee38970e434e9407e")
    assert qwen_np.load(blob).config.model_type == "qwen2"
    other = tmp_path / "notes"
    other.write_bytes(b"GGU")  # shorter than the magic: neither a directory nor a GGUF file
    with pytest.raises(qwen_np.QwenNPError, match="notes is neither a checkpoint directory .* nor a GGUF file"):
        qwen_np.load(other)


def test_the_byte_alphabet_is_the_tokenizers_librarys():
    # Its symbol for each byte that UTF-8 text can hold (all but 0xC0, 0xC1 and 0xF5-0xFF), read off
    # its byte-level pre-tokenizer: every character up to U+0800, then one for each lead byte after
    from tokenizers import pre_tokenizers
    symbol = bytes_to_unicode()
    leads = [0x800, *range(0x1000, 0x10000, 0x1000), 0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]  # E0-EF, F0-F4
    text = "".join(chr(c) for c in [*range(0x800), *leads])
    assert len(set(text.encode())) == 256 - 13
    [(spelled, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert spelled == "".join(symbol[b] for b in text.encode())
    assert set(symbol.values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_control_and_user_defined_tokens_outside_the_byte_alphabet_are_matched_whole(tmp_path):
    # llama.cpp's converter stores added tokens as their raw text: DeepSeek-R1-Distill-Qwen's control
    # tokens hold U+FF5C and U+2581, and it writes user-defined tokens with U+2581 turned into a space.
    # llama.cpp matches every control and user-defined token whole, by that text.
    symbols = list(bytes_to_unicode().values())  # 256 byte tokens, ids 0..255
    added = [("ab", 1), ("<｜begin▁of▁sentence｜>", 3), ("<｜User｜>", 3), ("<｜Assistant｜>", 3),
             ("<｜end▁of▁sentence｜>", 3), ("new token", 4), (" ", 4)]  # types: 1 normal, 3 control, 4 user-defined
    tokens, types = symbols + [t for t, _ in added], [1] * 256 + [kind for _, kind in added]
    ids = {t: tokens.index(t) for t, _ in added}
    tokenizer = {"pre": "deepseek-r1-qwen", "tokens": tokens, "types": types, "merges": ["a b"],
                 "bos": ids["<｜begin▁of▁sentence｜>"], "eos": ids["<｜end▁of▁sentence｜>"],
                 "chat_template": "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
                                  "<｜Assistant｜>"}
    config = small_config("qwen2", vocab_size=len(tokens), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    model = qwen_np.load(random_gguf(tmp_path / "r1.gguf", "qwen2", config, tokenizer=tokenizer))
    a = symbols.index("a")
    for text, expected in [("<｜User｜>", [ids["<｜User｜>"]]), ("a new token", [a, ids[" "], ids["new token"]]),
                           ("ab a", [ids["ab"], ids[" "], a])]:
        assert model.tokenizer.encode(text).ids == expected, text
    ends = [ids["<｜User｜>"], a, ids["new token"], ids["<｜end▁of▁sentence｜>"]]
    assert model.tokenizer.decode(ends) == "anew token"  # control tokens skipped, user-defined ones kept
    assert model.tokenizer.get_vocab_size() == len(tokens)  # the user-defined " " did not take the place of "Ġ"
    assert qwen_np.chat_ids(model, [{"role": "user", "content": "a"}], add_generation_prompt=True) == [
        ids["<｜begin▁of▁sentence｜>"], ids["<｜User｜>"], a, ids["<｜Assistant｜>"]]


def test_generation_ends_at_the_tokens_llama_cpp_ends_it_at():
    tokens = ["a", "<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<fim_pad>", "<|eot_id|>", "<|file_sep|>", "b"]
    metadata = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 7}
    # The file's eos first; end of turn and fill-in-the-middle padding by their texts (the first of
    # each); every token with an end-of-generation text.
    assert end_token_ids_of_gguf(metadata) == [7, 1, 3, 6, 2, 5]
    # Ids the file names take the place of the texts: <|fim_pad|> is not an end here.
    named = {**metadata, "tokenizer.ggml.eot_token_id": 0, "tokenizer.ggml.fim_pad_token_id": 4}
    assert end_token_ids_of_gguf(named) == [7, 0, 4, 6, 1, 2, 5]
    assert end_token_ids_of_gguf({"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.eos_token_id": 1}) == [1]


# ---------------------------------------------------------------------------------------------
# The tokenizer from metadata: a Qwen2 GGUF carrying the real Qwen2.5 vocabulary


@pytest.fixture(scope="module")
def qwen2_gguf(shared_data, tmp_path_factory):
    """(path, model) of a small random Qwen2 model whose GGUF metadata holds the real Qwen2.5
    tokenizer, written as llama.cpp's converter writes it."""
    path = tmp_path_factory.mktemp("qwen2") / "qwen2-tokenizer.gguf"
    config = small_config("qwen2", vocab_size=151936, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    tokenizer = qwen_tokenizer_metadata(shared_data / "qwen2.5-tokenizer")
    random_gguf(path, "qwen2", config, qtype=Q.F16, tokenizer=tokenizer)
    return path, qwen_np.load(path)


def test_qwen2_gguf_tokenizer_reproduces_the_reference_vectors(qwen2_gguf, shared_data):
    tokenizer = qwen2_gguf[1].tokenizer
    vectors = shared_data / "tokenizer-vectors"
    texts = (vectors / "ggml-vocab-qwen2.gguf.inp").read_text("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = (vectors / "ggml-vocab-qwen2.gguf.out").read_text().splitlines()
    assert len(texts) == len(expected) == 43
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text).ids == [int(i) for i in ids.split()], text
    golden = json.loads((vectors / "qwen2.5_hf_golden_tokens.json").read_text("utf-8"))
    assert len(golden) == 51
    for case in golden:
        assert tokenizer.encode(case["text"]).ids == case["ids"], case["text"]


def test_qwen2_gguf_tokenizer_is_the_directory_tokenizer(qwen2_gguf, shared_data):
    from tokenizers import Tokenizer
    ours = qwen2_gguf[1].tokenizer
    directory = Tokenizer.from_file(str(shared_data / "qwen2.5-tokenizer" / "tokenizer.json"))
    for text in (VARIED_TEXT, "cafe\u0301 vs café", "<tool_call>{}</tool_call> 151643",  # NFD é: NFC as Qwen's
                 "<|im_start|>user\nhi<|im_end|>"):
        assert ours.encode(text).ids == directory.encode(text).ids, text
        for skip in (False, True):  # skipped: the control tokens (special), not <tool_call> (user-defined)
            assert ours.decode(ours.encode(text).ids, skip_special_tokens=skip) == directory.decode(
                directory.encode(text).ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("<|im_start|><tool_call>").ids) == "<tool_call>"
    assert ours.encode("<|im_start|>").ids == [151644]
    assert ours.encode("<tool_call>").ids == [151657]  # user-defined: whole, though not special


def test_qwen2_gguf_tokenizer_adds_bos_or_eos_when_the_file_asks(qwen2_gguf):
    metadata, _ = read_gguf(qwen2_gguf[0])
    bos_only = {**metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 151643}
    del bos_only["tokenizer.ggml.eos_token_id"]  # asked for BOS only, with no EOS id at all
    assert gguf_tokenizer(bos_only, qwen2_gguf[0]).encode("hi").ids == [151643, 6023]
    eos_only = {**metadata, "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": 151645}
    del eos_only["tokenizer.ggml.bos_token_id"]
    assert gguf_tokenizer(eos_only, qwen2_gguf[0]).encode("hi").ids == [6023, 151645]
    assert qwen2_gguf[1].tokenizer.encode("hi").ids == [6023]  # Qwen's files ask for neither


def test_qwen2_gguf_chat_settings(qwen2_gguf, shared_data):
    model = qwen2_gguf[1]
    template = json.loads((shared_data / "qwen2.5-tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    assert model.tokenizer_config == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                      "pad_token": "<|endoftext|>", "chat_template": template}
    # Generation stops where llama.cpp stops it: <|im_end|> (the file's eos), <|endoftext|>, and the
    # fill-in-the-middle <|fim_pad|>, <|repo_name|> and <|file_sep|>.
    assert model.generation_config == {"bos_token_id": 151643, "eos_token_id": [151645, 151643, 151662, 151663, 151664],
                                       "pad_token_id": 151643}
    assert model.config.vocab_size == 151936 and model.config.eos_token_id == 151645


def test_qwen2_gguf_tokenizer_matches_transformers(qwen2_gguf, reference):
    _, transformers = reference
    path, model = qwen2_gguf
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in VARIED_TEXT.split("\n") + [VARIED_TEXT]:
        assert model.tokenizer.encode(text).ids == theirs(text)["input_ids"], text


def with_inserted_metadata(data, key, value):  # -> GGUF bytes with one more metadata entry (raw value bytes)
    # The entry goes right after the 24-byte header, padded (by the key's length) to a multiple of
    # 32 bytes so that the tensor data keeps its alignment; kv_count (bytes 16-24) grows by one.
    entry = lambda k: struct.pack("<Q", len(k)) + k + value  # noqa: E731
    key += b"_" * (-len(entry(key)) % 32)
    kv_count = struct.unpack_from("<Q", data, 16)[0]
    return data[:16] + struct.pack("<Q", kv_count + 1) + entry(key) + data[24:]


ARRAY, UINT8 = struct.pack("<I", gguf.GGUFValueType.ARRAY), struct.pack("<I", gguf.GGUFValueType.UINT8)
UINT32 = struct.pack("<II", gguf.GGUFValueType.UINT32, 7)  # a whole uint32 value


@pytest.mark.parametrize("value, message", [
    # an array of 2**40 bytes in a small file (the gguf package's reader walks it for ever)
    (ARRAY + UINT8 + struct.pack("<Q", 2**40), "runs past the end of the file"),
    (ARRAY + struct.pack("<IQ", gguf.GGUFValueType.STRING, 2**40), "an array of 1,099,511,627,776 items at byte"),
    # more strings than the 84 KB file has room for (each takes 8 bytes at least), though fewer than its bytes
    (ARRAY + struct.pack("<IQ", gguf.GGUFValueType.STRING, 100_000), "an array of 100,000 items at byte"),
    # arrays nested 3000 deep
    (ARRAY + (ARRAY + struct.pack("<Q", 1)) * 3000 + UINT8 + struct.pack("<Q", 1) + b"\0",
     "arrays nested more than 16 deep"),
    (struct.pack("<I", 13) + b"\0" * 8, "unknown metadata value type 13"),
], ids=["a count of 2**40", "2**40 strings", "100000 strings", "nested 3000 deep", "value type 13"])
def test_metadata_that_cannot_be_read_is_named(tmp_path, value, message):
    data = random_gguf(tmp_path / "ok.gguf", "llama", small_config("llama")).read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(with_inserted_metadata(data, b"x.bad", value))
    # In a child process with a time limit: the bug this guards against is a hang.
    done = subprocess.run([sys.executable, "-c", f"import qwen_np; qwen_np.load({str(path)!r})"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "QwenNPError" in done.stderr and "bad.gguf" in done.stderr
    assert "is truncated or corrupt" in done.stderr and message in done.stderr


def test_a_tensor_of_four_dims_is_read(tmp_path):
    # ggml's most (a table giving more is corrupt: test_bad_headers_and_tables_are_named)
    x = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)
    path = random_gguf(tmp_path / "4d.gguf", "llama", small_config("llama"), extra_tensors={"extra.weight": x})
    _, tensors = read_gguf(path)
    assert tensors["extra.weight"].dims == (5, 4, 3, 2)  # fastest-varying first
    np.testing.assert_array_equal(np.frombuffer(tensors["extra.weight"].data, np.float32), x.ravel())


def test_a_version_2_file_reads_as_version_3(tmp_path):
    # Version 3 only added big-endian files (marked by the version's byte order), so the little-endian
    # layout is the same: older converters wrote version 2
    data = random_gguf(tmp_path / "v3.gguf", "llama", small_config("llama")).read_bytes()
    assert data[4:8] == struct.pack("<I", 3)
    (tmp_path / "v2.gguf").write_bytes(data[:4] + struct.pack("<I", 2) + data[8:])
    (metadata2, tensors2), (metadata3, tensors3) = read_gguf(tmp_path / "v2.gguf"), read_gguf(tmp_path / "v3.gguf")
    assert metadata2 == metadata3 and list(tensors2) == list(tensors3)
    assert all(np.array_equal(tensors2[name].data, tensors3[name].data) for name in tensors3)


def test_bad_headers_and_tables_are_named(tmp_path):
    data = random_gguf(tmp_path / "ok.gguf", "llama", small_config("llama"), qtype=Q.Q8_0).read_bytes()
    metadata, tensors = read_gguf(tmp_path / "ok.gguf")
    # Where the tensor table's first entry starts: after the header and every metadata entry.
    first = data.index(struct.pack("<Q", len("token_embd.weight")) + b"token_embd.weight")
    second = first + 57  # the second entry: after the first's name, n_dims, two dims, type and offset
    name_length = struct.unpack_from("<Q", data, second)[0]
    second_name = data[second + 8:second + 8 + name_length].decode()
    n_dims = struct.unpack_from("<I", data, second + 8 + name_length)[0]
    second_offset = second + 8 + name_length + 4 + 8 * n_dims + 4  # where its data offset is written
    cases = {
        "big.gguf": (b"GGUF" + struct.pack(">I", 3) + data[8:], "big.gguf is a big-endian GGUF file"),
        "v1.gguf": (b"GGUF" + struct.pack("<I", 1) + data[8:], "v1.gguf is a GGUF file of version 1; qwen_np reads "
                                                                 "versions 2 and 3"),
        "short.gguf": (b"GGUF\3", r"short.gguf \(5 bytes\) is truncated: it ends inside the GGUF header"),
        "key.gguf": (with_inserted_metadata(with_inserted_metadata(data, b"x.twice", UINT32), b"x.twice", UINT32),
                     "the metadata key 'x.twice_*' appears twice"),
        "align.gguf": (data[:16] + struct.pack("<Q", len(metadata) + 1) + struct.pack("<Q", 17)
                       + b"general.alignment" + struct.pack("<II", 4, 0) + data[24:],  # unpadded: refused first
                       r"general.alignment=0 is not a power of two"),
        "align48.gguf": (data[:16] + struct.pack("<Q", len(metadata) + 1) + struct.pack("<Q", 17)
                         + b"general.alignment" + struct.pack("<II", 4, 48) + data[24:],
                         r"general.alignment=48 is not a power of two"),
        # the Q8_0 embedding's GGUF dims [32, 64] as [16, 128]: the same count, rows of half a block
        "rows.gguf": (data[:first + 29] + struct.pack("<QQ", 16, 128) + data[first + 45:],
                      r"tensor 'token_embd.weight' has rows of 16 values, not a whole number of Q8_0 blocks of 32"),
        "tensor.gguf": (data[:first] + data[first:].replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", 1),
                        "the tensor 'blk.0.attn_q.weight' appears twice"),
        # data offsets that leave a gap, or make two tensors share bytes (llama.cpp refuses both)
        "gap.gguf": (data[:first + 49] + struct.pack("<Q", 32) + data[first + 57:],
                     r"tensor 'token_embd.weight' has offset 32, expected 0 \(the start of the data section\)"),
        "overlap.gguf": (data[:second_offset] + struct.pack("<Q", 0) + data[second_offset + 8:],
                         rf"tensor '{second_name}' has offset 0, expected [1-9][0-9,]* \(where the data of "
                         rf"'token_embd.weight' ends, padded to 32 bytes\)"),
        "dims.gguf": (data[:first + 25] + struct.pack("<I", 2**32 - 1) + data[first + 29:],  # after the name
                      "the tensor 'token_embd.weight' has 4,294,967,295 dims \\(GGUF allows 4\\)"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(qwen_np.QwenNPError, match=message):
            qwen_np.load(tmp_path / name)
    assert tensors["token_embd.weight"].type_name == "Q8_0" and metadata["general.architecture"] == "llama"


def test_metadata_of_every_scalar_type_reads_as_llama_cpps_package_writes_it(tmp_path):
    # Each type at a value that tells it from its neighbours: sign, width, float32 against float64
    S = gguf.GGUFValueType
    values = {S.UINT8: 255, S.INT8: -128, S.UINT16: 65535, S.INT16: -32768, S.UINT32: 2**32 - 1, S.INT32: -2**31,
              S.FLOAT32: 1.5, S.BOOL: True, S.UINT64: 2**64 - 1, S.INT64: -2**63, S.FLOAT64: 0.1}
    assert set(values) == set(S) - {S.STRING, S.ARRAY}
    written = [(f"test.{kind.name.lower()}", value, kind) for kind, value in values.items()]
    metadata, _ = read_gguf(random_gguf(tmp_path / "m.gguf", "llama", small_config("llama"), extra_metadata=written))
    assert [(key, metadata[key], type(metadata[key])) for key, _, _ in written] == \
        [(key, value, type(value)) for key, value, _ in written]


def test_metadata_values_of_the_wrong_type_are_named(tmp_path):
    S = gguf.GGUFValueType
    for value, kind, shown in (([1, 2], S.ARRAY, r"\[1, 2\]"), (-1, S.INT32, "-1")):  # a file without a vocabulary
        path = random_gguf(tmp_path / "eos.gguf", "llama", small_config("llama"),
                           extra_metadata=[("tokenizer.ggml.eos_token_id", value, kind)])
        with pytest.raises(qwen_np.QwenNPError, match=rf"eos.gguf: tokenizer.ggml.eos_token_id={shown} is not a "
                                                      rf"token id$"):
            qwen_np.load(path)
    with pytest.raises(qwen_np.QwenNPError, match=r"x.gguf: tokenizer.ggml.eos_token_id=-1 is not a token id$"):
        check_special_token_ids({"tokenizer.ggml.tokens": 5, "tokenizer.ggml.eos_token_id": -1}, "x.gguf")
    with pytest.raises(qwen_np.QwenNPError, match=r"x.gguf: unsupported GGUF architecture \['qwen2'\]"):
        config_from_gguf({"general.architecture": ["qwen2"]}, {}, "x.gguf")
    metadata, tensors = read_gguf(random_gguf(tmp_path / "heads.gguf", "llama", small_config("llama")))
    metadata = {k: v for k, v in metadata.items() if k != "llama.attention.key_length"}
    with pytest.raises(qwen_np.QwenNPError, match=r"x.gguf: llama.attention.head_count=7 does not divide "
                                                  r"llama.embedding_length=32, and the file gives no llama.attention"):
        config_from_gguf({**metadata, "llama.attention.head_count": 7}, tensors, "x.gguf")
    scalar = types.SimpleNamespace(dims=())  # a 0-D token_embd.weight
    with pytest.raises(qwen_np.QwenNPError, match="x.gguf: no 2-D token_embd.weight tensor"):
        config_from_gguf({"general.architecture": "qwen2"}, {"token_embd.weight": scalar}, "x.gguf")
    with pytest.raises(qwen_np.QwenNPError, match=r"unsupported pre-tokenizer tokenizer.ggml.pre = \['qwen2'\]"):
        pre_tokenizer(["qwen2"], "x.gguf")


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_an_implausible_block_count_is_refused_before_any_list_is_built(tmp_path, family):
    config = small_config(family, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)
    path = random_gguf(tmp_path / "m.gguf", family, config)
    metadata, tensors = read_gguf(path)
    arch = metadata["general.architecture"]
    with pytest.raises(qwen_np.QwenNPError, match=r"num_hidden_layers=18446744073709551614 is not a plausible"):
        config_from_gguf({**metadata, f"{arch}.block_count": 2**64 - 2}, tensors, path)


def test_a_gguf_asking_for_bos_without_a_bos_id_adds_none(qwen2_gguf):
    metadata, _ = read_gguf(qwen2_gguf[0])
    no_id = {**metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    del no_id["tokenizer.ggml.bos_token_id"], no_id["tokenizer.ggml.eos_token_id"]
    assert gguf_tokenizer(no_id, qwen2_gguf[0]).encode("hi").ids == [6023]


def test_a_text_twice_in_the_vocabulary_ends_generation_at_its_first_id():
    tokens = ["a", "<|im_end|>", "b", "<|im_end|>"]
    assert end_token_ids_of_gguf({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 2}) == [2, 1]


def test_a_file_without_rope_freq_base_gets_llama_cpps_default(tmp_path):
    path = random_gguf(tmp_path / "m.gguf", "llama", small_config("llama"))
    metadata, tensors = read_gguf(path)
    del metadata["llama.rope.freq_base"]
    assert config_from_gguf(metadata, tensors, path).rope_parameters["rope_theta"] == 10000.0


def test_one_end_token_is_given_as_one_id():
    tokens = ["a", "b"]  # no end-of-generation texts: the file's eos alone
    _, generation_config = chat_settings({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 1})
    assert generation_config == {"eos_token_id": 1}


def test_a_moe_gguf_with_a_dense_layer_reads_it_as_dense(tmp_path):
    # GGUF has no mlp_only_layers: a layer without a router (ffn_gate_inp) is a dense MLP. (The gguf
    # package's name map has no dense MLP names for the MoE architectures: those tensors are added by name.)
    config = small_config("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8,
                          mlp_only_layers=[1])
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in expected_shapes(config_from_dict(config)).items()}
    dense = {f"blk.1.ffn_{proj}.weight": tensors.pop(f"model.layers.1.mlp.{proj}_proj.weight")
             for proj in ("gate", "up", "down")}
    model = qwen_np.load(write_gguf(tmp_path / "m.gguf", "qwen3_moe", config, tensors, extra_tensors=dense))
    assert tuple(model.config.mlp_only_layers) == (1,)
    np.testing.assert_array_equal(model.params["model"]["layers"][1]["mlp"]["up_proj"]["weight"],
                                  dense["blk.1.ffn_up.weight"])


def test_partial_rotary_is_refused(tmp_path):
    path = random_gguf(tmp_path / "m.gguf", "llama", small_config("llama"))  # head_dim 8
    metadata, tensors = read_gguf(path)
    metadata["llama.rope.dimension_count"] = 4
    with pytest.raises(qwen_np.QwenNPError,
                       match=r"RoPE on 4 of 8 head dimensions \(partial rotary\) is not supported"):
        config_from_gguf(metadata, tensors, path)


# Without the check, a missing key flows on as the KeyError class: "rms_norm_eps must be a number >= 0,
# got <class 'KeyError'>", "the metadata's llama.block_count must be a positive integer, got <class 'KeyError'>".
@pytest.mark.parametrize("key", ["llama.attention.layer_norm_rms_epsilon", "llama.block_count"])
def test_a_required_metadata_key_that_is_absent_is_named(tmp_path, key):
    data = random_gguf(tmp_path / "ok.gguf", "llama", small_config("llama")).read_bytes()
    path = tmp_path / "x.gguf"
    path.write_bytes(data.replace(key.encode(), key[:-1].encode() + b"X", 1))  # renamed: absent
    with pytest.raises(qwen_np.QwenNPError, match=rf"x.gguf: the metadata has no {key}$"):
        qwen_np.load(path)


# Tensors whose shapes the metadata contradicts. Without the check: a bare ValueError from a reshape
# (another size), or nothing at all (a matrix stored transposed, read into the right shape).
@pytest.mark.parametrize("metadata_changes, transposed, named", [
    ({"intermediate_size": 48}, False, r"'blk.0.ffn_gate.weight' has shape \[64, 32\] but the config implies "
                                       r"\[48, 32\] \(model.layers.0.mlp.gate_proj.weight\)"),
    ({}, True, r"'blk.1.ffn_up.weight' has shape \[32, 64\] but the config implies \[64, 32\] "
               r"\(model.layers.1.mlp.up_proj.weight\)")], ids=["feed_forward_length", "transposed"])
def test_a_tensor_of_another_shape_than_the_metadata_implies_is_named(tmp_path, metadata_changes, transposed, named):
    config = small_config("qwen2")
    tensors = {name: np.ones(shape, np.float32) for name, shape in expected_shapes(config_from_dict(config)).items()}
    if transposed:
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].T.copy()
    path = write_gguf(tmp_path / "x.gguf", "qwen2", {**config, **metadata_changes}, tensors)
    with pytest.raises(qwen_np.QwenNPError, match=rf"x.gguf: tensor {named}$"):
        qwen_np.load(path)


# A tensor of a known kind the config does not call for (a layer beyond block_count, a
# Qwen3 q_norm in a llama file). Without the check: a bare KeyError from the shape check.
@pytest.mark.parametrize("name, hf_name, size", [
    ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight", 32),
    ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight", 8)])
def test_a_tensor_the_config_does_not_call_for_is_named(tmp_path, name, hf_name, size):
    path = random_gguf(tmp_path / "x.gguf", "llama", small_config("llama"),
                       extra_tensors={name: np.ones(size, np.float32)})
    with pytest.raises(qwen_np.QwenNPError, match=rf"x.gguf: tensor '{name}' \({hf_name}\) is not part of this "
                                                  rf"llama config"):
        qwen_np.load(path)


def test_a_vocabulary_without_token_types_is_all_normal_tokens(tmp_path):
    # llama.cpp's default where a file has no tokenizer.ggml.token_type: "<s>" is then ordinary text
    tokens = list(bytes_to_unicode().values()) + ["ab", "<s>"]
    tokenizer = {"pre": "qwen2", "tokens": tokens, "types": None, "merges": ["a b"]}
    config = small_config("llama", vocab_size=len(tokens))
    path = random_gguf(tmp_path / "tok.gguf", "llama", config, tokenizer=tokenizer)
    assert "tokenizer.ggml.token_type" not in read_gguf(path)[0]
    ids = qwen_np.load(path).tokenizer.encode("ab<s>").ids
    assert ids == [tokens.index("ab"), tokens.index("<"), tokens.index("s"), tokens.index(">")]


# Without the check: a bare TypeError ('int' object is not iterable) or AttributeError ('int' object
# has no attribute 'split') while the tokenizer is built.
@pytest.mark.parametrize("changes", [{"tokens": list(range(64))}, {"merges": [7]}], ids=["int tokens", "int merges"])
def test_a_vocabulary_that_is_not_strings_is_named(tmp_path, changes):
    tokens = [chr(c) for c in range(ord("!"), ord("!") + 63)] + ['!"']
    tokenizer = {"pre": "qwen2", "tokens": tokens, "types": [1] * 64, "merges": ['! "'], **changes}
    path = random_gguf(tmp_path / "tok.gguf", "llama", small_config("llama"), tokenizer=tokenizer)
    with pytest.raises(qwen_np.QwenNPError, match="tok.gguf: tokenizer.ggml.tokens and tokenizer.ggml.merges must "
                                                  "be arrays of strings"):
        qwen_np.load(path)
