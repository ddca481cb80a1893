"""Mixture of experts: routing against a dense reference, and Qwen2-MoE / Qwen3-MoE against transformers."""

import json

import numpy as np
import pytest
from safetensors import safe_open

import qwen_np
from conftest import require_reference
from qwen_np import ops
from tiny import drop_tensor, edit_config, reference_logits, tiny_model

rng = np.random.default_rng(1)
TOL = dict(rtol=1e-4, atol=1e-4)


def random_experts(E, D, F):
    return [{name: {"weight": rng.standard_normal(shape).astype(np.float32)}
             for name, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F)))}
            for _ in range(E)]


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_routing_equals_dense_reference(top_k, norm_topk_prob):
    N, D, F, E = 9, 8, 12, 5
    x = rng.standard_normal((N, D)).astype(np.float32)
    gate = rng.standard_normal((E, D)).astype(np.float32)
    experts = random_experts(E, D, F)
    chosen, weights, logits = ops.moe_route(x, gate, top_k, norm_topk_prob)
    sparse = ops.moe_experts(x, experts, chosen, weights)

    # Dense reference: every expert on every token, weighted by a mask of the top-k weights.
    probs = ops.softmax(x @ gate.T)
    kth = np.sort(probs, axis=-1)[:, -top_k][:, None]
    mask_weights = np.where(probs >= kth, probs, 0.0)
    if norm_topk_prob:
        mask_weights = mask_weights / mask_weights.sum(-1, keepdims=True)
    dense = sum(mask_weights[:, e, None] * ops.mlp(x, **experts[e]) for e in range(E))
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)

    assert chosen.shape == weights.shape == (N, top_k)
    assert np.all(np.diff(weights, axis=-1) <= 0)  # best first
    if norm_topk_prob:
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    elif top_k < E:
        assert np.all(weights.sum(-1) < 1.0)


def test_experts_that_receive_no_token_are_never_run():
    x = rng.standard_normal((4, 8)).astype(np.float32)
    experts = random_experts(3, 8, 6)
    experts[2] = None  # would fail if called
    chosen = np.array([[0], [1], [0], [1]])
    out = ops.moe_experts(x, experts, chosen, np.ones((4, 1), np.float32))
    np.testing.assert_allclose(out[0], ops.mlp(x[:1], **experts[0])[0], rtol=1e-5, atol=1e-5)


def compare(family, tmp_path, x, **overrides):
    ref = tiny_model(family, tmp_path, **overrides)
    model = qwen_np.load(tmp_path)
    ours, _, router = qwen_np.forward(model.params, model.config, x, return_router=True)
    np.testing.assert_allclose(ours, reference_logits(ref, x), **TOL)
    return ref, model, router


CASES = {
    "qwen2_moe shared expert, no renorm, top-2": ("qwen2_moe", {}),
    "qwen2_moe top-1 with renorm": ("qwen2_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True}),
    "qwen2_moe zero-wide shared expert": ("qwen2_moe", {"shared_expert_intermediate_size": 0}),
    "qwen3_moe renorm, top-2": ("qwen3_moe", {}),
    "qwen2_moe without experts: every layer dense": ("qwen2_moe", {"num_experts": 0}),
    "qwen3_moe without experts: every layer dense": ("qwen3_moe", {"num_experts": 0}),
    "qwen3_moe no renorm, top-4": ("qwen3_moe", {"norm_topk_prob": False, "num_experts_per_tok": 4}),
    "qwen2_moe sparse step 2 with mlp_only_layers": ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2,
                                                                   "mlp_only_layers": [3]}),
    "qwen3_moe sparse step 2 with mlp_only_layers": ("qwen3_moe", {"num_hidden_layers": 5, "decoder_sparse_step": 2,
                                                                   "mlp_only_layers": [1]}),
    # step 3, where the reference's (i + 1) % step counts differ from i's or (i - 1)'s: layer 2 only
    "qwen3_moe sparse step 3": ("qwen3_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 3}),
    "qwen2_moe one expert: still sparse": ("qwen2_moe", {"num_experts": 1, "num_experts_per_tok": 1}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, on the zero-wide expert
def test_moe_model_matches_reference(tmp_path, case):
    family, overrides = CASES[case]
    x = rng.integers(0, 128, (2, 16))  # a batch of two prompts
    _, model, router = compare(family, tmp_path, x, **overrides)
    config = model.config
    sparse = [config.is_sparse_layer(i) for i in range(config.num_hidden_layers)]
    assert [r is not None for r in router] == sparse
    assert [("experts" in layer["mlp"]) for layer in model.params["model"]["layers"]] == sparse
    if "mlp_only_layers" in overrides:
        assert not all(sparse) and any(sparse)  # dense and sparse layers mix


def test_prompt_where_some_experts_receive_no_token(tmp_path):
    x = np.array([[5, 5, 5]])  # three identical tokens at the first layer pick the same two experts
    _, model, router = compare("qwen2_moe", tmp_path, x, num_experts=8)
    assert len(np.unique(router[0][0])) < 8


def test_router_statistics_match_reference_router_logits(tmp_path):
    torch, _ = require_reference()
    x = rng.integers(0, 128, (2, 10))
    ref, model, router = compare("qwen3_moe", tmp_path, x, norm_topk_prob=False, num_experts_per_tok=3)
    with torch.no_grad():
        out = ref(torch.as_tensor(x), output_router_logits=True)
    for layer, logits in zip(router, out.router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, 3, dim=-1)
        chosen, weights = layer
        np.testing.assert_array_equal(chosen.reshape(-1, 3), top_i.numpy())
        np.testing.assert_allclose(weights.reshape(-1, 3), top_w.numpy(), rtol=1e-5)


@pytest.mark.parametrize("family, overrides", [("qwen2_moe", {}), ("qwen3_moe", {}),
                                              ("qwen2_moe", {"shared_expert_intermediate_size": 0})])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, on the zero-wide expert
def test_low_memory_gives_the_default_logits(tmp_path, family, overrides):
    # Router, experts, shared expert and its gate are all matrices: bf16 bits, widened where used
    # (a zero-wide shared expert's weights have no rows).
    torch, _ = require_reference()  # skips without the reference (fails in CI)
    tiny_model(family, tmp_path, dtype=torch.bfloat16, **overrides)
    default, low = qwen_np.load(tmp_path), qwen_np.load(tmp_path, low_memory=True)
    assert low.params["model"]["layers"][0]["mlp"]["gate"]["weight"].dtype == np.uint16
    x = np.random.default_rng(1).integers(0, 128, (2, 16))
    # The same weights, multiplied in another order (the default keeps tall matrices column-major).
    np.testing.assert_allclose(qwen_np.forward(low.params, low.config, x)[0],
                               qwen_np.forward(default.params, default.config, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_experts_stacked_as_transformers_5_saves_them(tmp_path, family):
    # save_pretrained(..., save_original_format=False) writes a sparse layer's experts as two
    # tensors, mlp.experts.gate_up_proj [E, 2F, D] and mlp.experts.down_proj [E, D, F], which
    # transformers loads; so does qwen_np, each expert's matrices being views of them.
    ref = tiny_model(family, tmp_path / "stacked", stacked_experts=True, num_hidden_layers=3, mlp_only_layers=[1])
    ref.save_pretrained(tmp_path / "per_expert")  # the same weights, one tensor per expert and matrix
    with safe_open(tmp_path / "stacked" / "model.safetensors", "np") as f:
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"} <= set(f.keys())
        assert not any(".experts.0." in name for name in f.keys())
    x = rng.integers(0, 128, (2, 16))
    for options in ({}, {"mmap": True}):
        model = qwen_np.load(tmp_path / "stacked", **options)
        np.testing.assert_allclose(qwen_np.forward(model.params, model.config, x)[0], reference_logits(ref, x), **TOL)
        experts = model.params["model"]["layers"][2]["mlp"]["experts"]
        assert len(experts) == 6 and not experts[5]["up_proj"]["weight"].flags.owndata  # a view: no copy
    low = [qwen_np.load(tmp_path / name, low_memory=True) for name in ("stacked", "per_expert")]
    assert low[0].params["model"]["layers"][0]["mlp"]["experts"][3]["down_proj"]["weight"].dtype == np.uint16
    np.testing.assert_array_equal(*(qwen_np.forward(m.params, m.config, x)[0] for m in low))
    edit_config(tmp_path / "stacked", moe_intermediate_size=16)
    with pytest.raises(qwen_np.QwenNPError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj' has "
                                                  r"shape \[6, 64, 64\] but the config implies \[6, 32, 64\]"):
        qwen_np.load(tmp_path / "stacked")


def test_default_return_value_is_unchanged(tmp_path):
    tiny_model("qwen3_moe", tmp_path)
    model = qwen_np.load(tmp_path)
    result = qwen_np.forward(model.params, model.config, np.array([[1, 2, 3]]))
    assert len(result) == 2


def test_missing_expert_tensor_is_named(tmp_path):
    tiny_model("qwen2_moe", tmp_path)
    drop_tensor(tmp_path, "model.layers.1.mlp.experts.4.up_proj.weight")
    with pytest.raises(qwen_np.QwenNPError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.4\.up_proj"):
        qwen_np.load(tmp_path)


def test_top_k_larger_than_number_of_experts(tmp_path):
    tiny_model("qwen3_moe", tmp_path)
    edit_config(tmp_path, num_experts_per_tok=7)  # 6 experts
    with pytest.raises(qwen_np.QwenNPError, match=r"num_experts_per_tok=7 must be between 1 and num_experts=6"):
        qwen_np.load(tmp_path)


def test_mlp_only_layers_that_are_not_a_list_are_a_clear_error(tmp_path):
    tiny_model("qwen3_moe", tmp_path)
    edit_config(tmp_path, mlp_only_layers=1)  # one index, not a list of them: no TypeError from iterating it
    with pytest.raises(qwen_np.QwenNPError, match=r"mlp_only_layers must be a list of layer indices, got 1"):
        qwen_np.load(tmp_path)


def test_published_qwen3_moe_config_names(tmp_path):
    """Released Qwen3-MoE config.json files say num_experts; transformers 5 writes num_local_experts."""
    tiny_model("qwen3_moe", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_local_experts"] == 6
    edit_config(tmp_path, num_experts=6, num_local_experts=None)
    assert qwen_np.load(tmp_path).config.num_experts == 6


def test_qwen2_moe_sliding_window_rule(tmp_path):
    x = rng.integers(0, 128, (1, 20))
    _, model, _ = compare("qwen2_moe", tmp_path, x, num_hidden_layers=4, use_sliding_window=True,
                          sliding_window=4, max_window_layers=3)
    # the reference: every other layer from layer 0, below max_window_layers
    assert model.config.layer_types == ("sliding_attention", "full_attention", "sliding_attention", "full_attention")


def test_qwen3_moe_window_covers_every_layer_whatever_layer_types_say(tmp_path):
    # transformers' Qwen3-MoE reads neither layer_types nor max_window_layers: with use_sliding_window on,
    # every layer attends within the window.
    x = rng.integers(0, 128, (1, 20))
    _, model, _ = compare("qwen3_moe", tmp_path, x, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                          max_window_layers=1, layer_types=["full_attention"] * 3)
    assert json.loads((tmp_path / "config.json").read_text())["layer_types"] == ["full_attention"] * 3
    assert model.config.layer_types == ("sliding_attention",) * 3


def test_an_implausible_number_of_experts_is_refused_before_any_list_is_built(tmp_path):
    tiny_model("qwen3_moe", tmp_path)
    edit_config(tmp_path, num_experts=2**31, num_local_experts=None)
    with pytest.raises(qwen_np.QwenNPError, match=r"num_experts=2147483648 is not a plausible value"):
        qwen_np.load(tmp_path)
    # Each count plausible, but together more expert MLPs than any model has: refused before the
    # loader lists their tensors (with 200 layers of a million experts that list would exhaust memory).
    edit_config(tmp_path, num_experts=60_000, num_hidden_layers=2)
    with pytest.raises(qwen_np.QwenNPError, match=r"num_hidden_layers=2 x num_experts=60000 is not a plausible "
                                                  r"number of experts \(more than 100,000\)"):
        qwen_np.load(tmp_path)
