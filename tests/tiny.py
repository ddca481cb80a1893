"""Tiny random models of every family, built in transformers and saved with save_pretrained,
so the tests can push them through qwen_np's own loader. Imported by the tests (not a test)."""

import json
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from conftest import require_reference

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)

FAMILIES = {  # name -> (config class, model class, extra config)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**MOE, "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": True, "head_dim": 24}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),  # a Qwen2 decoder without the q/k/v biases
}


def tiny_model(family, directory, dtype=None, max_shard_size=None, stacked_experts=False, **overrides):
    """Builds a random `family` model, saves it to `directory`; returns the transformers model
    (float32, eager attention, eval mode) to compare against. stacked_experts: save the experts as
    transformers 5 holds them (save_original_format=False), not one tensor per expert and matrix."""
    torch, transformers = require_reference()
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norm weights at 1: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    save = model if dtype is None else getattr(transformers, model_name)(config).to(dtype).eval()
    if dtype is not None:
        save.load_state_dict(model.state_dict())
        model.load_state_dict(save.float().state_dict())  # the reference sees the rounded weights
        save = save.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if stacked_experts:
        kwargs["save_original_format"] = False
    save.save_pretrained(directory, **kwargs)
    return model


def reference_logits(model, input_ids, **kwargs):
    torch, _ = require_reference()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids)), **kwargs).logits.float().numpy()


def write_spelling_model(directory, tokenizer_dir, answer, starts, end_token, hidden_size=32):
    """Writes a qwen2 checkpoint (with the real tokenizer files of `tokenizer_dir`) that always
    answers `answer`, then `end_token`, whenever the prompt ends with one of the `starts` tokens.

    Its one layer adds nothing (o_proj and down_proj are zero), so the logits depend on the last
    token only: the embedding of a start token is basis vector 0, that of the answer's i-th token
    basis vector i, and the LM head maps vector i to the answer's next token (to `end_token` after
    the last). The answer's tokens must be distinct. Needs no torch. Returns the answer's token ids."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    directory, tokenizer_dir = Path(directory), Path(tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode(answer, add_special_tokens=False).ids
    if len(set(ids)) != len(ids) or len(ids) >= hidden_size or set(ids) & set(starts):
        raise ValueError(f"cannot spell {answer!r} with distinct tokens in {hidden_size} dimensions")
    V, D, F = 151936, hidden_size, 8
    embed, head = np.zeros((V, D), np.float16), np.zeros((V, D), np.float16)
    embed[list(starts), 0] = 1
    for i, (token, following) in enumerate(zip(ids, ids[1:] + [end_token])):
        embed[token, i + 1] = 1
        head[token, i] = 10  # RMSNorm scales vector i to length sqrt(D): logit 10 * sqrt(D), all others 0
    head[following, len(ids)] = 10
    zeros = lambda *shape: np.zeros(shape, np.float16)  # noqa: E731
    layer = "model.layers.0."
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": np.ones(D, np.float16),
               layer + "input_layernorm.weight": np.ones(D, np.float16),
               layer + "post_attention_layernorm.weight": np.ones(D, np.float16),
               **{layer + f"self_attn.{p}_proj.{w}": zeros(D, D) if w == "weight" else zeros(D)
                  for p in "qkv" for w in ("weight", "bias")},
               layer + "self_attn.o_proj.weight": zeros(D, D), layer + "mlp.gate_proj.weight": zeros(F, D),
               layer + "mlp.up_proj.weight": zeros(F, D), layer + "mlp.down_proj.weight": zeros(D, F)}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = dict(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, eos_token_id=151643)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, directory / name)
    return ids


def edit_config(directory, **changes):
    """Rewrites directory/config.json with `changes`; a change to None deletes the key."""
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    for key, value in changes.items():
        if value is None:
            del raw[key]
    (directory / "config.json").write_text(json.dumps(raw))


def write_older_config(directory):
    """Rewrites directory/config.json as older checkpoints write it: rope_theta and rope_scaling
    (with "type") at the top level, torch_dtype for dtype."""
    raw = json.loads((directory / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if "dtype" in raw:
        raw["torch_dtype"] = raw.pop("dtype")
    (directory / "config.json").write_text(json.dumps(raw))


def drop_tensor(directory, name):
    """Rewrites directory/model.safetensors without the tensor `name`."""
    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors")


def write_vocab_and_merges(source, directory):  # a checkpoint's tokenizer as vocab.json + merges.txt, no tokenizer.json
    model = json.loads((source / "tokenizer.json").read_text("utf-8"))["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), "utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    shutil.copyfile(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory
