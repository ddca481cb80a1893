"""Random combinations of the config options real checkpoints use, against transformers.

The other tests check one option at a time; here each case draws a whole config at random (sizes,
head counts, tied or not, a rope type with its optional keys, a sliding window with its layers,
the MoE options), writes it in the newer or the older config.json format (and the experts one
tensor per matrix, or stacked as transformers 5 holds them), and checks that qwen_np
gives transformers' logits, its greedy tokens with the KV cache, and its logits for a left-padded
batch; and what a GGUF file can say of such a model, through a GGUF file. The seeds are fixed, so
a failure repeats.
"""

import json
import random
import sys

import numpy as np
import pytest

import qwen_np
from qwen_np import model as qwen_model
from tiny import reference_logits, tiny_model, write_older_config

FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
CASES_PER_FAMILY = 10
# A mixture-of-experts token whose router scores for its k-th and (k+1)-th experts are this close
# (a near tie) may go to either expert, by rounding alone: then the engines may rightly differ.
NEAR_TIE = 1e-5


def random_rope(rng):  # -> rope_parameters: a rope type with some of its optional keys
    rope = {"rope_type": rng.choice(["default", "linear", "dynamic", "yarn", "llama3"]),
            "rope_theta": rng.choice([500.0, 1e4, 1e6])}
    if rope["rope_type"] in ("linear", "dynamic"):
        rope["factor"] = rng.choice([1.5, 2.0, 4.0])
    if rope["rope_type"] == "yarn":
        rope["factor"] = rng.choice([2.0, 4.0, 8.0])
        optional = {"original_max_position_embeddings": [16, 32], "beta_fast": [16.0, 64.0], "beta_slow": [0.5, 2.0],
                    "mscale": [0.707, 1.0], "mscale_all_dim": [0.0, 0.707, 1.0], "attention_factor": [0.8, 1.0],
                    "truncate": [False, True]}
        rope.update({key: rng.choice(values) for key, values in optional.items() if rng.random() < 0.4})
    if rope["rope_type"] == "llama3":
        rope.update(factor=rng.choice([2.0, 8.0]), low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=rng.choice([16, 32]))
    return rope


def random_config(rng, family):  # -> the keyword arguments of the family's transformers config
    kv_heads = rng.choice([1, 2, 4])
    heads, head_dim = kv_heads * rng.choice([1, 2, 3]), rng.choice([8, 16, 24])
    layers = rng.randint(1, 4)
    config = dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  hidden_size=heads * head_dim, intermediate_size=rng.choice([40, 64]),
                  vocab_size=rng.choice([96, 128]), max_position_embeddings=rng.choice([32, 64]),
                  tie_word_embeddings=rng.random() < 0.5, rms_norm_eps=rng.choice([1e-6, 1e-3]),
                  rope_parameters=random_rope(rng))
    if family in ("qwen3", "qwen3_moe"):  # head_dim need not be hidden_size / heads
        config.update(head_dim=head_dim, hidden_size=rng.choice([32, 64]), attention_bias=rng.random() < 0.3)
    if rng.random() < 0.4:
        config.update(use_sliding_window=True, sliding_window=rng.choice([4, 7, 16]),
                      max_window_layers=rng.randint(0, layers))
        if family in ("qwen2", "qwen3") and rng.random() < 0.3:  # the MoE families have no layer_types
            config["layer_types"] = [rng.choice(["full_attention", "sliding_attention"]) for _ in range(layers)]
    if family.endswith("_moe"):
        config.update(num_experts=rng.choice([4, 8]), num_experts_per_tok=rng.choice([1, 2, 3]),
                      moe_intermediate_size=rng.choice([16, 32]), norm_topk_prob=rng.random() < 0.5,
                      decoder_sparse_step=rng.choice([1, 2]), mlp_only_layers=rng.choice([[], [layers - 1]]))
        if family == "qwen2_moe":
            config["shared_expert_intermediate_size"] = rng.choice([24, 48])
    return config


def check_no_near_tie(model, input_ids, monkeypatch, described, **kwargs):
    """Fails, naming the seed, if some token of this forward pass has its k-th and (k+1)-th router
    scores closer than NEAR_TIE in some layer (a model without experts passes)."""
    margins = [np.inf]
    route = qwen_model.moe_route

    def measured(x, gate, top_k, norm_topk_prob):
        scores = np.sort(x @ gate.T, axis=-1)  # [N, E], ascending
        margins.append(float((scores[:, -top_k] - scores[:, -top_k - 1]).min()))
        return route(x, gate, top_k, norm_topk_prob)

    with monkeypatch.context() as patch:
        patch.setattr(qwen_model, "moe_route", measured)
        qwen_np.forward(model.params, model.config, input_ids, **kwargs)
    assert min(margins) > NEAR_TIE, f"{described}: a near tie in the router ({min(margins):.1e}); pick another seed"


@pytest.mark.parametrize("family, case", [(family, case) for family in FAMILIES for case in range(CASES_PER_FAMILY)])
def test_a_random_config_matches_transformers(tmp_path, monkeypatch, reference, family, case):
    torch, _ = reference
    seed = FAMILIES.index(family) * 1000 + case
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = random_config(rng, family)
    dtype = rng.choice([None, torch.bfloat16, torch.float16])
    # Every other MoE case saves its experts stacked, as transformers 5 holds them.
    ref = tiny_model(family, tmp_path, dtype=dtype, stacked_experts=family.endswith("_moe") and case % 2 == 1, **config)
    if rng.random() < 0.5:
        write_older_config(tmp_path)
    model = qwen_np.load(tmp_path)
    V, context = config["vocab_size"], config["max_position_embeddings"]
    described = f"seed {seed}: {json.dumps(config)}, saved as {dtype}"

    # Logits of one sequence, past max_position_embeddings (dynamic RoPE stretches there).
    input_ids = np.array([[rng.randrange(V) for _ in range(rng.randint(context // 2, 2 * context))]])
    check_no_near_tie(model, input_ids, monkeypatch, described)
    logits, _ = qwen_np.forward(model.params, model.config, input_ids)
    np.testing.assert_allclose(logits, reference_logits(ref, input_ids), atol=1e-4, rtol=1e-4, err_msg=described)

    # Greedy tokens, decoded with the KV cache, as transformers' generate picks them; the prompt is
    # prefilled in chunks of 1 to 5 tokens, by the case number (generate's PREFILL_CHUNK).
    monkeypatch.setattr(sys.modules["qwen_np.generate"], "PREFILL_CHUNK", 1 + case % 5)
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 16))]
    new = context - len(prompt)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    check_no_near_tie(model, out.numpy(), monkeypatch, described)
    tokens = list(qwen_np.generate(model, prompt, max_new_tokens=new, temperature=0, eos_token_id=[]))
    assert tokens == out[0, len(prompt):].tolist(), described

    # A left-padded batch: the logits of the real tokens (padding rows are the caller's to ignore).
    lengths = [rng.randint(1, 16) for _ in range(3)]
    T = max(lengths)
    batch = np.array([[0] * (T - n) + [rng.randrange(V) for _ in range(n)] for n in lengths])
    real = np.arange(T)[None, :] >= T - np.array(lengths)[:, None]  # [3, T]
    check_no_near_tie(model, batch, monkeypatch, described, attention_mask=real)
    logits, _ = qwen_np.forward(model.params, model.config, batch, attention_mask=real)
    want = reference_logits(ref, batch, attention_mask=torch.as_tensor(real.astype(np.int64)))
    np.testing.assert_allclose(logits[real], want[real], atol=1e-4, rtol=1e-4, err_msg=described)


@pytest.mark.parametrize("family, case", [(family, case) for family in FAMILIES for case in range(4)])
def test_a_random_structure_through_gguf_matches_transformers(tmp_path, monkeypatch, reference, family, case):
    # The same, through a float32 GGUF file written as llama.cpp's converter writes it, for what a
    # GGUF file can say: the sizes, head counts and head_dim, tied or not, the experts and the
    # shared expert. llama.cpp renormalises the top-k weights for Qwen3-MoE and never for Qwen2-MoE,
    # so the reference model is given the norm_topk_prob the real checkpoints of each family have.
    from gguf_files import read_safetensors, write_gguf  # needs the gguf package: skips (fails in CI) without
    torch, _ = reference
    seed = 10000 + FAMILIES.index(family) * 1000 + case
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = random_config(rng, family)
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "decoder_sparse_step",
                "mlp_only_layers", "attention_bias"):
        config.pop(key, None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    if family.endswith("_moe"):
        config["norm_topk_prob"] = family == "qwen3_moe"
    ref = tiny_model(family, tmp_path / "hf", **config)
    write_gguf(tmp_path / "model.gguf", family, ref.config.to_dict(), read_safetensors(tmp_path / "hf"))
    model = qwen_np.load(tmp_path / "model.gguf")
    input_ids = np.array([[rng.randrange(config["vocab_size"]) for _ in range(24)]])
    described = f"seed {seed}: {json.dumps(config)}"
    check_no_near_tie(model, input_ids, monkeypatch, described)
    logits, _ = qwen_np.forward(model.params, model.config, input_ids)
    np.testing.assert_allclose(logits, reference_logits(ref, input_ids), atol=1e-4, rtol=1e-4, err_msg=described)
