"""The model configuration: one frozen dataclass with config.json's own field names.

`read_config` accepts both formats found in released checkpoints: the older one with
`rope_theta` / `rope_scaling` at the top level and `torch_dtype`, and the newer one with a
`rope_parameters` dict and `dtype`. Unknown keys are ignored; defaults are the reference's
(transformers' `Qwen2Config`, `Qwen3Config`, `Qwen2MoeConfig`, `Qwen3MoeConfig`, `LlamaConfig`).
"""

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class QwenNPError(ValueError):
    """The one error type of qwen_np: bad files, bad configs, bad arguments."""


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
DEFAULT_KV_HEADS = {"qwen2": 32, "qwen3": 32, "qwen2_moe": 16, "qwen3_moe": 4}  # the reference's; llama: none
DEFAULT_MAX_POSITIONS = {"llama": 2048}  # the reference's; the Qwen families: 32768
DEFAULT_SPECIAL_IDS = {"llama": dict(bos_token_id=1, eos_token_id=2)}  # the reference's; the Qwen families: none
DEFAULT_MOE = {  # the reference's values for MoE keys that config.json leaves out
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)}
ACTIVATIONS = ("silu", "swish")  # hidden_act values the reference maps to SiLU, the only one Qwen uses
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


def is_int(value, least=0):  # an int or NumPy integer (not True/False) of at least `least`
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


def is_number(value):  # a finite int or float, NumPy's too (not True/False), that a float can hold
    try:
        return (is_int(value, -math.inf) or isinstance(value, (float, np.floating))) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float (JSON allows 1e400 written out as digits)
        return False


VALUE_KINDS = {  # what a key must hold where config.json has it (null takes the default) -> (test, keys)
    "a positive integer": (lambda v: is_int(v, 1), (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
        "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "original_max_position_embeddings")),
    # num_experts 0: an MoE config whose every layer is a dense MLP, as the reference builds it.
    "an integer >= 0": (is_int, ("max_window_layers", "shared_expert_intermediate_size", "num_experts")),
    "a number > 0": (lambda v: is_number(v) and v > 0, (
        "rope_theta", "factor", "low_freq_factor", "high_freq_factor", "attention_factor")),
    "a number >= 0": (lambda v: is_number(v) and v >= 0, ("rms_norm_eps", "beta_fast", "beta_slow", "mscale",
                                                          "mscale_all_dim")),
    "true or false": (lambda v: isinstance(v, bool), (
        "tie_word_embeddings", "use_sliding_window", "attention_bias", "qkv_bias", "mlp_bias", "norm_topk_prob",
        "truncate")),
    # Token ids may be negative: old Llama configs say pad_token_id -1 for "none".
    "a token id or a list of token ids": (lambda v: is_int(v, -math.inf) or isinstance(v, list) and all(
        is_int(i, -math.inf) for i in v), ("bos_token_id", "eos_token_id", "pad_token_id")),
    "a list of layer indices": (lambda v: isinstance(v, list) and all(map(is_int, v)), ("mlp_only_layers",)),
    "a list of 'full_attention' and 'sliding_attention'": (
        lambda v: isinstance(v, list) and all(t in ("full_attention", "sliding_attention") for t in v),
        ("layer_types",)),
}


# Counts that the loader turns into per-layer and per-expert lists: a corrupt value past these (far above
# any model: Qwen3-235B has 94 layers of 128 experts) would exhaust memory before a tensor is compared.
PLAUSIBLE_COUNTS = {"num_hidden_layers": 100_000, "num_experts": 1_000_000}
PLAUSIBLE_EXPERT_MLPS = 100_000  # num_hidden_layers x num_experts (Qwen3-235B: 94 x 128 = 12,032 expert MLPs)
PLAUSIBLE_SIZE = 2 ** 40  # any other size or length: past it a value is corrupt (and NumPy's int64 overflows at 2**63)
PLAUSIBLE_NUMBER = 1e30  # a number (rope_theta, factor, eps...) lies within 1e-30..1e30, or is 0 where 0 is allowed


def check_values(raw, source):
    """Every key that qwen_np reads holds a value of the kind the reference expects."""
    for kind, (test, keys) in VALUE_KINDS.items():
        for key in keys:
            if raw.get(key) is not None and not test(raw[key]):
                raise QwenNPError(f"{source}: {key} must be {kind}, got {raw[key]!r}")
    sizes = {key: PLAUSIBLE_SIZE for kind in ("a positive integer", "an integer >= 0") for key in VALUE_KINDS[kind][1]}
    for key, most in {**sizes, **PLAUSIBLE_COUNTS}.items():
        if raw.get(key) is not None and raw[key] > most:
            raise QwenNPError(f"{source}: {key}={reprlib.repr(raw[key])} is not a plausible value (more than "
                              f"{most:,}): the file is corrupt")
    for key in VALUE_KINDS["a number > 0"][1] + VALUE_KINDS["a number >= 0"][1]:  # (rope_theta 1e-320: NaN logits)
        value = raw.get(key)
        if value is not None and value != 0 and not 1 / PLAUSIBLE_NUMBER <= value <= PLAUSIBLE_NUMBER:
            raise QwenNPError(f"{source}: {key}={value!r} is not a plausible value (outside 1e-30..1e30): "
                              f"the file is corrupt")
    layers, experts = raw.get("num_hidden_layers"), raw.get("num_experts")
    if layers is not None and experts is not None and layers * experts > PLAUSIBLE_EXPERT_MLPS:
        raise QwenNPError(f"{source}: num_hidden_layers={layers} x num_experts={experts} is not a plausible "
                          f"number of experts (more than {PLAUSIBLE_EXPERT_MLPS:,}): the file is corrupt")


@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False  # q/k/v biases (Qwen2 and Qwen2-MoE have them; Qwen3, Qwen3-MoE, Llama: o_proj too)
    mlp_bias: bool = False  # biases in the MLP's projections (only Llama checkpoints may have them)
    sliding_window: int | None = None  # None unless use_sliding_window is on
    layer_types: tuple = ()  # "full_attention" or "sliding_attention" for each layer
    # Mixture of experts (num_experts == 0 for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    # Token ids and the dtype the checkpoint was saved in (informational: we compute in float32)
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    dtype: str | None = None

    def is_sparse_layer(self, i):
        """Reference rule: layer i has experts unless listed in mlp_only_layers or off the step."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


def read_config(path):
    """Reads config.json (a file or the directory holding it) into a Config."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw = read_json(path)
    if raw is None:
        problem = "is not a file" if path.exists() else "does not exist"
        raise QwenNPError(f"no config.json found: {path} {problem}{directory_hint(path.parent)}")
    return config_from_dict(raw, source=str(path))


def directory_hint(directory):  # -> what to pass instead of a directory without config.json, if we can tell
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if ggufs:  # a GGUF repository: --model takes one of its files
        return f" (it holds GGUF files: pass one of them, such as {directory / ggufs[0]})"
    snapshots = sorted(p.parent for p in directory.glob("snapshots/*/config.json"))
    if snapshots:  # a model folder of the Hub's cache
        where = snapshots[0] if len(snapshots) == 1 else directory / "snapshots" / "<commit>"
        return f" (this looks like a model folder of the Hugging Face cache: pass {where})"
    checkpoints = sorted(p.parent for p in directory.glob("*/config.json"))
    if checkpoints:  # a folder of checkpoints
        return f" (it holds checkpoint directories: pass one of them, such as {checkpoints[0]})"
    return ""


def parse_json(text):  # -> the value of a JSON text; ValueError for any text Python cannot take in
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # Python refuses to convert an integer of more than 4300 digits
        raise ValueError("it holds an integer of thousands of digits") from None


def is_present(path):  # -> True for a file, False where there is none (or a directory); else an error
    # A link whose file is gone (a Hugging Face cache blob deleted) or a pipe in a file's place is
    # not taken for "no such file": that would hide the problem (and reading a pipe blocks).
    path = Path(path)
    if path.is_file():
        return True
    if path.is_symlink():
        try:
            path.stat()
        except OSError as e:
            raise QwenNPError(f"cannot read {path}: {e.strerror}") from None
    if path.exists() and not path.is_dir():
        raise QwenNPError(f"{path} is not a regular file (a pipe or a device?)")
    return False


def read_json(path):
    """A JSON file's object, or None when the file does not exist."""
    path = Path(path)
    if not is_present(path):
        return None
    try:
        raw = parse_json(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and the rest of parse_json's
        raise QwenNPError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise QwenNPError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


def config_from_dict(raw, source="config"):
    """Builds a Config from a config.json dict, applying each family's reference defaults and rules."""
    if not isinstance(raw, dict):
        raise QwenNPError(f"{source}: config_from_dict takes the dict config.json holds (json.load's result, or a "
                          f"transformers config's to_dict()), got {type(raw).__name__}; read_config reads a file")
    model_type = raw.get("model_type")
    if "num_local_experts" in raw and "num_experts" not in raw:  # the name transformers 5 writes for Qwen3-MoE
        raw = {**raw, "num_experts": raw["num_local_experts"]}
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QwenNPError(f"{source}: unsupported model_type {model_type!r}; "
                          f"qwen_np supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    refuse_quantized(raw, source)
    missing = [k if k not in raw else f"{k} (null)" for k in REQUIRED_KEYS if raw.get(k) is None]
    if missing:
        raise QwenNPError(f"{source}: missing required key(s) {', '.join(missing)}")
    raw = without_ignored_keys(raw, model_type)
    check_values(raw, source)
    if raw.get("hidden_act") is not None and raw["hidden_act"] not in ACTIVATIONS:
        raise QwenNPError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported: qwen_np's MLP is SwiGLU "
                          f"with SiLU ({' or '.join(ACTIVATIONS)}), as in every Qwen checkpoint")

    def get(key, default):  # a key that is present but null takes the default, as in the reference
        value = raw.get(key)
        return default if value is None else value

    n_layers = raw["num_hidden_layers"]
    n_heads = raw["num_attention_heads"]
    # Qwen3 declares head_dim with default 128; the others derive it from the hidden size.
    head_dim = get("head_dim", 128 if model_type == "qwen3" else raw["hidden_size"] // n_heads)
    # num_key_value_heads: the family's default when absent, one per query head when null.
    kv_heads = raw.get("num_key_value_heads", DEFAULT_KV_HEADS.get(model_type)) or n_heads
    use_sliding = bool(raw.get("use_sliding_window", False))
    sliding_window = raw.get("sliding_window", 4096) if use_sliding else None  # an explicit null: no window
    layer_types = tuple(raw["layer_types"]) if raw.get("layer_types") else default_layer_types(
        model_type, n_layers, sliding_window, get("max_window_layers", 28))
    if n_heads % kv_heads:
        absent = "" if "num_key_value_heads" in raw else f" (absent: the reference's default for {model_type})"
        raise QwenNPError(f"{source}: num_attention_heads={n_heads} is not a multiple of "
                          f"num_key_value_heads={kv_heads}{absent}")
    if head_dim < 2 or head_dim % 2:  # derived, it is 0 when there are more heads than hidden dimensions
        raise QwenNPError(f"{source}: head_dim={head_dim} must be a positive even number (RoPE rotates pairs "
                          f"of dimensions)")
    if len(layer_types) != n_layers:
        raise QwenNPError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    max_positions = get("max_position_embeddings", DEFAULT_MAX_POSITIONS.get(model_type, 32768))
    rope = read_rope_parameters(raw, source, max_positions)
    if rope["rope_type"] == "dynamic" and head_dim == 2:  # its base grows as a power head_dim / (head_dim - 2)
        raise QwenNPError(f"{source}: rope type 'dynamic' needs a head_dim above 2, got {head_dim}")
    attention_bias = has_attention_bias(model_type, get)

    moe_defaults = DEFAULT_MOE.get(model_type, dict(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0))
    num_experts = get("num_experts", moe_defaults["num_experts"])
    top_k = get("num_experts_per_tok", moe_defaults["num_experts_per_tok"]) if num_experts else 0
    if num_experts and not 0 < top_k <= num_experts:
        raise QwenNPError(f"{source}: num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")

    return Config(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=attention_bias,
        mlp_bias=bool(get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=sliding_window,
        layer_types=layer_types,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=get("moe_intermediate_size", moe_defaults["moe_intermediate_size"]),
        shared_expert_intermediate_size=get("shared_expert_intermediate_size", 5632)
        if model_type == "qwen2_moe" else 0,
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        decoder_sparse_step=get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(get("mlp_only_layers", ())),
        # Absent, the family's default; null, none (as the reference reads them).
        bos_token_id=raw.get("bos_token_id", DEFAULT_SPECIAL_IDS.get(model_type, {}).get("bos_token_id")),
        eos_token_id=raw.get("eos_token_id", DEFAULT_SPECIAL_IDS.get(model_type, {}).get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )


def refuse_quantized(raw, source):
    """A quantized safetensors checkpoint (transformers' quantization_config, MLX's quantization) is refused by name."""
    key = next((k for k in ("quantization_config", "quantization") if raw.get(k)), None)
    if key:
        quantization = raw[key]
        what = f"quant_method {quantization['quant_method']!r}" if isinstance(quantization, dict) and \
            "quant_method" in quantization else reprlib.repr(quantization)
        raise QwenNPError(f"{source}: this checkpoint is quantized ({key}: {what}); "
                          "qwen_np reads float32, float16 and bfloat16 checkpoints, and quantized GGUF files")


def without_ignored_keys(raw, model_type):  # -> raw without the keys the reference ignores for this family
    # Dropped unchecked: the MoE keys in a dense model, the window's when it is off. Llama has no
    # window; Qwen3-MoE's covers every layer (no layer_types).
    ignored = set(() if model_type.endswith("_moe") else MOE_KEYS)
    if not raw.get("use_sliding_window") or model_type == "llama":
        ignored |= {"use_sliding_window", "sliding_window", "max_window_layers"}
    if model_type in ("llama", "qwen3_moe"):
        ignored |= {"layer_types", "max_window_layers"}
    return {k: v for k, v in raw.items() if k not in ignored}


def has_attention_bias(model_type, get):  # -> whether q/k/v have biases; get(key, default) reads config.json
    if model_type == "qwen2":
        return True  # Qwen2 always has q/k/v biases, whatever the config says
    if model_type == "qwen2_moe":
        return bool(get("qkv_bias", True))
    return bool(get("attention_bias", False))


def default_layer_types(model_type, n_layers, sliding_window, max_window_layers):
    """Which layers use sliding-window attention when config.json has no layer_types (reference rules)."""
    if sliding_window is None:
        sliding = [False] * n_layers
    elif model_type == "qwen2_moe":  # every other layer, from layer 0, below max_window_layers
        sliding = [(i + 1) % 2 == 1 and i < max_window_layers for i in range(n_layers)]
    elif model_type == "qwen3_moe":  # every layer
        sliding = [True] * n_layers
    else:  # qwen2, qwen3: the layers from max_window_layers on
        sliding = [i >= max_window_layers for i in range(n_layers)]
    return tuple("sliding_attention" if s else "full_attention" for s in sliding)


def read_rope_parameters(raw, source, max_positions):
    """One rope dict from either format: `rope_scaling` + top-level `rope_theta`, or `rope_parameters`.
    `max_positions` is the model's max_position_embeddings (yarn's and llama3's default original length)."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}  # the reference's priority
    if not isinstance(rope, dict):
        raise QwenNPError(f"{source}: rope_scaling / rope_parameters must be an object, got {rope!r}")
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = raw.get("rope_theta", 10000.0)
    if rope["rope_theta"] is None:  # the reference fails on it too
        raise QwenNPError(f"{source}: rope_theta is null; it must be a number > 0")
    rope.pop("type", None)
    if rope["rope_type"] not in ROPE_TYPES:
        raise QwenNPError(f"{source}: unsupported rope type {rope['rope_type']!r}; "
                          f"qwen_np supports {', '.join(ROPE_TYPES)}")
    if rope["rope_type"] in ("yarn", "llama3"):
        # A top-level original_max_position_embeddings wins, as in the reference.
        original = raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = original or max_positions
    if rope["rope_type"] == "yarn" and "factor" in rope and rope["factor"] is None:
        # "factor": null (DeepSeek-V3's way): the reference stretches by max_position_embeddings
        # over the original length. A config with no factor at all it refuses, as `needs` does below.
        rope["factor"] = max_positions / rope["original_max_position_embeddings"]
    needs = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),  # as the reference validates them
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    for key in needs.get(rope["rope_type"], ()):
        if rope.get(key) is None:
            raise QwenNPError(f"{source}: rope type {rope['rope_type']!r} needs a {key!r}")
    check_values(rope, f"{source}: rope parameters")
    if rope["rope_type"] == "yarn" and rope["rope_theta"] <= 1:  # its ramp divides by log(rope_theta)
        raise QwenNPError(f"{source}: rope type 'yarn' needs a rope_theta > 1, got {rope['rope_theta']!r}")
    return rope
