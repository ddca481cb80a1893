"""Tiny random models of every family, built in transformers and saved with save_pretrained,
so the tests can push them through qwen_np's own loader. Imported by the tests (not a test)."""

import numpy as np

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


def tiny_model(family, directory, dtype=None, max_shard_size=None, **overrides):
    """Builds a random `family` model, saves it to `directory`; returns the transformers model
    (float32, eager attention, eval mode) to compare against."""
    torch, transformers = require_reference()
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config).eval()
    save = model if dtype is None else getattr(transformers, model_name)(config).to(dtype).eval()
    if dtype is not None:
        save.load_state_dict(model.state_dict())
        model.load_state_dict(save.float().state_dict())  # the reference sees the rounded weights
        save = save.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    save.save_pretrained(directory, **kwargs)
    return model


def reference_logits(model, input_ids, **kwargs):
    torch, _ = require_reference()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids)), **kwargs).logits.float().numpy()
