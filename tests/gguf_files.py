"""Writes GGUF files for the tests the way llama.cpp's convert_hf_to_gguf.py does, with the gguf
package's own GGUFWriter and tensor-name map (so qwen_np's name mapping is checked against
llama.cpp's, not against itself). Imported by the tests (not a test)."""

import json
import re
from pathlib import Path

import numpy as np
from conftest import require_module

from qwen_np.config import config_from_dict
from qwen_np.weights import expected_shapes

gguf = require_module("gguf")  # llama.cpp's own package: its writer and tensor-name map are the reference

ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
         "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "llama": gguf.MODEL_ARCH.LLAMA}


def read_safetensors(directory):  # -> {HF name: float32 array} of a save_pretrained directory
    from safetensors.numpy import load_file
    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute, for q_proj / k_proj rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stack_experts(tensors):
    """experts.{e}.{proj}.weight -> one experts.{proj}.weight [E, out, in], as llama.cpp stores them."""
    out, groups = {}, {}
    for name, value in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            groups.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = value
        else:
            out[name] = value
    for name, experts in groups.items():
        out[name] = np.stack([experts[e] for e in range(len(experts))])
    return out


def write_gguf(path, family, config, tensors, qtype=gguf.GGMLQuantizationType.F32, tokenizer=None,
               extra_metadata=(), raw_tensors=None, extra_tensors=None, omit=(), alignment=None):
    """Writes `tensors` ({HF name: array}) of a `config` (config.json dict) as a GGUF file.

    2-D and 3-D weights are stored as `qtype` when their rows fit its blocks (else F32, as
    llama.cpp falls back); norms and biases stay F32. `tokenizer`: dict of tokenizer metadata
    (see `qwen_tokenizer_metadata`; "types" None writes no token types). `extra_metadata`:
    (key, value, GGUFValueType) triples.
    `raw_tensors`: {GGUF name: (raw bytes [rows, bytes per row] uint8, ggml type)} written instead.
    `extra_tensors`: {GGUF name: array} written as they are, after the model's. `omit`: the MoE size
    keys to leave out ("expert_feed_forward_length", "expert_shared_feed_forward_length").
    `alignment`: general.alignment, to which the tensor data is padded (default 32, unwritten)."""
    raw_tensors = raw_tensors or {}
    arch = ARCHS[family]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    experts = config.get("num_experts") or config.get("num_local_experts")  # transformers 5 writes the latter
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "expert_feed_forward_length" not in omit:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size") and "expert_shared_feed_forward_length" not in omit:
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    for key, value, kind in extra_metadata:
        writer.add_key_value(key, value, kind)
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer.get("model", "gpt2"))
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        if tokenizer["types"] is not None:
            writer.add_token_types(tokenizer["types"])
        writer.add_token_merges(tokenizer["merges"])
        for key in ("bos", "eos", "pad"):
            if tokenizer.get(key) is not None:
                getattr(writer, f"add_{key}_token_id")(tokenizer[key])
        writer.add_add_bos_token(False)
        if tokenizer.get("chat_template"):
            writer.add_chat_template(tokenizer["chat_template"])

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, value in stack_experts(tensors).items():
        if family == "llama" and re.search(r"\.(q_proj|k_proj)\.", name):
            heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
            value = llama_cpp_permute(value, heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        value = value.squeeze()  # llama.cpp squeezes: the [1, D] shared-expert gate is stored as [D]
        if gguf_name in raw_tensors:
            writer.add_tensor(gguf_name, raw_tensors[gguf_name][0], raw_dtype=raw_tensors[gguf_name][1])
        elif value.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and value.shape[-1] % block_size == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, value)
    for gguf_name, value in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def qwen_tokenizer_metadata(directory):
    """The tokenizer metadata llama.cpp's converter writes for a Qwen2 tokenizer directory
    (tokenizer.json + tokenizer_config.json), padded to Qwen2.5's 151936 embedding rows."""
    directory = Path(directory)
    tj = json.loads((directory / "tokenizer.json").read_text("utf-8"))
    tc = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
    reverse = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {t["id"]: t for t in tj["added_tokens"]}
    tokens, types = [], []
    for i in range(151936):
        if i in added:
            content = added[i]["content"]
            looks_special = content.startswith("<|") and content.endswith("|>")
            tokens.append(content)
            control = added[i]["special"] or looks_special
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"pre": "qwen2", "tokens": tokens, "types": types, "merges": merges, "bos": 151643, "eos": 151645,
            "pad": 151643, "chat_template": tc["chat_template"]}


def small_config(model_type, **overrides):  # a config.json dict of a small random model
    return {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": True, **overrides}


def random_gguf(path, family, config, **kwargs):
    """A GGUF file of a random model with this config (config.json dict)."""
    shapes = expected_shapes(config_from_dict(config))
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    return write_gguf(path, family, config, tensors, **kwargs)
