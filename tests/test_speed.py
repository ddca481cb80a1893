"""What the speed of qwen_np rests on, checked without timing anything (the machine is shared):
every activation is float32, a decode step copies no weight, the KV cache keeps its keys and
values position-minor, loading makes no second copy of the weights, freed temporaries are
reused without page faults after loading, and the blocked attention equals the reference's on
prompts longer than a block."""

import functools
import inspect
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from conftest import ROOT, embeddings_huge_page_kb

import qwen_np
from qwen_np import model as model_module
from qwen_np import ops
from qwen_np.bench import SMOKE_SHAPES, write_checkpoint
from qwen_np.generate import keep_rows
from qwen_np.model import empty_cache

# Random checkpoints of every family (no reference needed), with the less common paths switched
# on: YaRN and a sliding window for Qwen2, a shared expert for Qwen2-MoE.
CHECKPOINTS = {
    "qwen2": dict(SMOKE_SHAPES["tiny-qwen2"], use_sliding_window=True, sliding_window=8, max_window_layers=1,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen3": SMOKE_SHAPES["tiny-qwen3"],
    "qwen3_moe": SMOKE_SHAPES["tiny-moe"],
    "qwen2_moe": {**{k: v for k, v in SMOKE_SHAPES["tiny-moe"].items() if k != "head_dim"},
                  "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                  "shared_expert_intermediate_size": 48, "norm_topk_prob": False},
}


@functools.cache
def random_model(family, root, low_memory=False):
    if not (root / family).is_dir():
        write_checkpoint(root / family, CHECKPOINTS[family])
    return qwen_np.load(root / family, low_memory=low_memory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return lambda family, low_memory=False: random_model(family, root, low_memory)


def arrays(value):  # every NumPy array or scalar inside nested tuples, lists and dicts
    if isinstance(value, (np.ndarray, np.generic)):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from arrays(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from arrays(v)


@pytest.mark.parametrize("family, low_memory", [(f, False) for f in sorted(CHECKPOINTS)]
                         + [("qwen2", True), ("qwen2_moe", True)])
def test_every_activation_is_float32(family, low_memory, models, monkeypatch):
    # Every operator and wiring function is wrapped to check what it returns: floating-point
    # results must be float32 (masks may be bool, expert indices integer). A float64 anywhere
    # (a Python scalar, an np.zeros without dtype) would reach one of these outputs. With
    # low_memory the matrices are bf16 bits (uint16): what the operators return is float32 still.
    m = models(family, low_memory)
    called, wrong = set(), []

    def checked(name, f):
        def wrapper(*args, **kwargs):
            out = f(*args, **kwargs)
            called.add(name)
            wrong.extend(f"{name} returned {a.dtype}" for a in arrays(out)
                         if a.dtype.kind in "fc" and a.dtype != np.float32)
            return out
        return wrapper

    functions = {name: f for module in (ops, model_module) for name, f in vars(module).items()
                 if inspect.isfunction(f) and f.__module__ == module.__name__}
    for name, f in functions.items():
        for module in (ops, model_module):  # model.py imported the operators by name: patch both
            if hasattr(module, name):
                monkeypatch.setattr(module, name, checked(name, f))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.vocab_size, (2, 20))
    mask = np.ones((2, 20), int)
    mask[1, :5] = 0  # left padding in the second row
    logits, cache, router = qwen_np.forward(m.params, m.config, ids, attention_mask=mask, return_router=True)
    for _ in range(2):
        logits, cache = qwen_np.forward(m.params, m.config, logits[:, -1:].argmax(-1), cache)
    logits_last, _ = qwen_np.forward(m.params, m.config, ids, last_only=True)

    assert not wrong, sorted(set(wrong))
    assert logits.dtype == logits_last.dtype == np.float32
    assert all(a.dtype == np.float32 for a in cache.keys + cache.values)
    if low_memory:
        assert all(a.dtype == (np.uint16 if a.ndim == 2 else np.float32) for a in arrays(m.params))
    else:
        assert all(a.dtype == np.float32 for a in arrays(m.params))
    expected = {"linear", "rms_norm", "attention", "softmax", "apply_rope", "mlp", "decoder_layer", "attention_block"}
    if "moe" in family:
        expected |= {"moe_route", "moe_experts", "sparse_moe_block"}
    assert expected <= called, f"not exercised: {expected - called}"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_decode_step_copies_no_weight(family, tmp_path):
    # Wide enough that the smallest weight matrix (k_proj, an expert's matrix) is 128 KB, while
    # one token's activations are a few KB: a single weight copied would show.
    raw = dict(CHECKPOINTS[family], hidden_size=256, intermediate_size=512, head_dim=64, moe_intermediate_size=128,
               vocab_size=1024)
    write_checkpoint(tmp_path, raw)
    m = qwen_np.load(tmp_path)
    P, C = m.params, m.config
    logits, cache = qwen_np.forward(P, C, np.arange(40)[None], empty_cache(C, 1, 64), last_only=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        logits, cache = qwen_np.forward(P, C, logits[:, -1:].argmax(-1), cache)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    smallest = P["model"]["layers"][0]["self_attn"]["k_proj"]["weight"].nbytes  # as small as any projection here
    assert smallest == 128 * 1024
    assert peak < smallest / 4, f"a decode step allocated {peak} bytes at its peak; the smallest weight has {smallest}"
    assert cache.length == 41 and cache.keys[0].shape[2] == 64  # written in place, not re-allocated


def test_cache_keeps_keys_and_values_position_minor(models):
    # Decoding reads each head's keys and values as row-major [Dh, S] matrices (see empty_cache):
    # the stride between positions is one float, through prefill, growth and dropping finished rows.
    m = models("qwen3")

    def position_minor(cache):
        return all(k.strides[2] == k.itemsize and v.strides[2] == v.itemsize and k.shape == v.shape
                   for k, v in zip(cache.keys, cache.values))

    cache = empty_cache(m.config, 2, 8)
    assert position_minor(cache)
    _, cache = qwen_np.forward(m.params, m.config, np.ones((2, 6), int), cache)
    _, grown = qwen_np.forward(m.params, m.config, np.ones((2, 5), int), cache)  # 11 > 8: the cache grows
    assert grown.keys[0].shape[2] == 16 and position_minor(grown)
    np.testing.assert_array_equal(grown.keys[0][:, :, :6], cache.keys[0][:, :, :6])  # copied as it was
    np.testing.assert_array_equal(grown.values[0][:, :, :6], cache.values[0][:, :, :6])
    assert position_minor(keep_rows(grown, np.array([False, True])))


def test_weights_are_in_the_systems_default_pages(tmp_path):
    # NumPy asks for huge pages for large arrays; the loader's weights do not (see fresh_array).
    write_checkpoint(tmp_path, dict(CHECKPOINTS["qwen3"], hidden_size=256, vocab_size=8192))
    assert embeddings_huge_page_kb(tmp_path) == 0


def traced_peak_of_load(path, monkeypatch):  # -> (model, the largest memory NumPy held while loading, in bytes)
    # The weights' own buffers are memory maps (see fresh_array), which tracemalloc does not see:
    # here they come from np.empty, so that the peak counts them.
    monkeypatch.setattr(qwen_np.weights, "fresh_array", lambda count, dtype: np.empty(count, dtype))
    tracemalloc.start()
    try:
        return qwen_np.load(path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def weight_bytes(params):
    return sum(a.nbytes for a in {id(a): a for a in arrays(params)}.values())  # a tied matrix counts once


def test_load_makes_no_second_copy(tmp_path, monkeypatch):
    # tracemalloc sees NumPy's buffers: the peak while loading stays near the weights themselves.
    # (bf16 checkpoints: test_bf16_is_widened_in_chunks_into_float32)
    write_checkpoint(tmp_path, dict(CHECKPOINTS["qwen3"], hidden_size=256, intermediate_size=512, vocab_size=4096))
    m, peak = traced_peak_of_load(tmp_path, monkeypatch)
    assert peak < 1.2 * weight_bytes(m.params), f"loading peaked at {peak} bytes"


def test_bf16_is_widened_in_chunks_into_float32(tmp_path, reference, monkeypatch):
    from tiny import tiny_model

    torch, _ = reference
    monkeypatch.setattr(qwen_np.weights, "CHUNK", 1000)  # several chunks per matrix
    model = tiny_model("qwen2", tmp_path, dtype=torch.bfloat16, vocab_size=4096)
    m, peak = traced_peak_of_load(tmp_path, monkeypatch)
    # Beyond the float32 weights: a chunk per reading thread, the headers and the threads' own
    # Python objects (50-110 KB measured); reading a whole 512 KB bf16 embedding before widening
    # it would show.
    assert peak - weight_bytes(m.params) < 250_000, f"loading peaked at {peak} bytes"
    for name, expected in model.state_dict().items():  # the reference holds the bf16 values as float32
        node = m.params
        for part in name.split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        assert node.dtype == np.float32
        np.testing.assert_array_equal(node, expected.numpy(), err_msg=name)


FAULTS_PER_ROUND = """
import json, resource, sys
import numpy as np
import qwen_np
if sys.argv[1] != "-":
    qwen_np.load(sys.argv[1])

def faults_of_round():  # page faults while making and freeing eight 3 MB arrays, as a forward pass does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(3 << 18, np.float32) for _ in range(8)]
    del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps([faults_of_round() for _ in range(4)]))
"""


def test_loading_keeps_freed_memory_for_reuse(tmp_path):
    # After qwen_np.load, freed temporaries are reused: the next ones cost no page faults. With
    # glibc's defaults the same rounds fault on every page every time (the memory went back to
    # the kernel), which is what made a prefill 15% slower and the low-memory mode 3x slower.
    if not sys.platform.startswith("linux"):
        pytest.skip("page-fault counts and glibc's mallopt are Linux's")
    write_checkpoint(tmp_path, SMOKE_SHAPES["tiny-qwen2"])

    def rounds(checkpoint):
        done = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, checkpoint], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        return json.loads(done.stdout)

    pages = 8 * (3 << 20) // 4096
    default = rounds("-")
    if min(default[1:]) < pages / 2:  # the control: here glibc's defaults give the memory back
        pytest.skip(f"this C library keeps freed memory by itself (page faults per round: {default})")
    kept = rounds(str(tmp_path))
    assert max(kept[1:]) < pages / 20, kept


@pytest.mark.parametrize("arguments", [(1.5,), (-1,), (2**31,), ("32MB",), (1 << 20, None)])
def test_keep_freed_memory_takes_byte_counts_only(arguments):
    # mallopt takes C ints: a str would arrive as a pointer and -1 as a huge size, set process-wide.
    with pytest.raises(qwen_np.QwenNPError, match=r"_threshold must be a number of bytes, an integer from 0 to "
                                                  r"2\*\*31 - 1, got "):
        qwen_np.keep_freed_memory(*arguments)
    qwen_np.keep_freed_memory(np.int64(32 << 20), 256 << 20)  # NumPy integers are byte counts too


def naive_attention(q, k, v, mask):  # the textbook form: repeated k/v, full [B, H, T, S] scores
    n_rep = q.shape[1] // k.shape[1]
    k, v = ops.repeat_kv(k, n_rep), ops.repeat_kv(v, n_rep)
    scores = np.where(mask, (q @ k.swapaxes(-1, -2)) / np.sqrt(q.shape[-1]), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("window", [None, 40])
def test_blocked_attention_equals_full_attention(window):
    # More queries than a block, cached positions before them, left padding, a sliding window.
    rng = np.random.default_rng(0)
    B, H, K, T, S, Dh = 2, 6, 2, 2 * ops.QUERY_BLOCK + 37, 2 * ops.QUERY_BLOCK + 90, 16
    q = rng.standard_normal((B, H, T, Dh), dtype=np.float32)
    k, v = rng.standard_normal((2, B, K, S, Dh), dtype=np.float32)
    allowed = ops.causal_mask(T, S) if window is None else ops.sliding_window_mask(T, S, window)
    valid = np.ones((B, S), bool)
    valid[1, :70] = False
    mask = (allowed[None, None] & valid[:, None, None]) | np.eye(T, S, k=S - T, dtype=bool)
    out = ops.attention(q, k, v, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, naive_attention(q, k, v, mask), atol=2e-6)


def test_long_contexts_take_fewer_queries_per_block(monkeypatch):
    # Where QUERY_BLOCK queries would give more than SCORES_BYTES of scores, attention takes fewer at
    # a time, so its memory does not grow with the context; the result stays the same.
    rng = np.random.default_rng(1)
    B, H, K, T, S, Dh = 2, 6, 2, 100, 300, 16
    q = rng.standard_normal((B, H, T, Dh), dtype=np.float32)
    k, v = rng.standard_normal((2, B, K, S, Dh), dtype=np.float32)
    mask = np.broadcast_to(ops.causal_mask(T, S)[None, None], (B, 1, T, S))
    default = ops.SCORES_BYTES
    monkeypatch.setattr(ops, "SCORES_BYTES", 4 * B * H * S * 7)  # room for the scores of 7 queries
    rows, blocked = [], ops.grouped_attention

    def spy(q, k, v, mask):  # [B, K, G, rows, Dh], ...
        rows.append(q.shape[-2])
        return blocked(q, k, v, mask)

    monkeypatch.setattr(ops, "grouped_attention", spy)
    out = ops.attention(q, k, v, mask)
    assert max(rows) == 7 and sum(rows) == T
    np.testing.assert_allclose(out, naive_attention(q, k, v, mask), atol=2e-6)
    rows.clear()
    monkeypatch.setattr(ops, "SCORES_BYTES", default)
    ops.attention(q, k, v, mask)
    assert rows == [T]  # within the budget: one block of all the queries (fewer than QUERY_BLOCK)


def test_softmax_in_place_equals_softmax():
    x = np.random.default_rng(0).standard_normal((3, 5, 7), dtype=np.float32)
    expected = ops.softmax(x.copy())
    np.testing.assert_allclose(expected.sum(-1), 1, rtol=1e-6)
    out = ops.softmax(x, out=x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_long_padded_prompt_matches_reference(family, tmp_path, reference):
    # A prompt longer than a query block, left-padded, then continued from the cache.
    from tiny import reference_logits, tiny_model

    torch, _ = reference
    model = tiny_model(family, tmp_path, max_position_embeddings=1024)
    m = qwen_np.load(tmp_path)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, ops.QUERY_BLOCK + 100))
    mask = np.ones(ids.shape, int)
    mask[1, :9] = 0
    expected = reference_logits(model, ids, attention_mask=torch.as_tensor(mask))
    head, cache = qwen_np.forward(m.params, m.config, ids[:, :-3], attention_mask=mask[:, :-3])
    tail, _ = qwen_np.forward(m.params, m.config, ids[:, -3:], cache)
    got = np.concatenate([head, tail], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
